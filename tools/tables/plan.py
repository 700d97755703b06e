"""Plan: the runs a spec needs, their folders, their ``train.py`` arguments, their state and their cost.

A *unit* is what one job executes in order: for B2N a training run on the base classes and the evaluation
of that model on the new classes; for XD / DG one training run on the source dataset and one evaluation per
target. Folders, arguments and states come from the run API (engine/runs.py), the same one the per-method
scripts use, with the variant opts in the folder name (``<config>[_la]<variant_tag(opts)>``), so a table
reuses the runs the per-method scripts made and vice versa (for the same opts).

Nothing here writes: the state of a run is read from its folder (``results.json``, the lock file).
"""
import functools
import json
import math
import os
from dataclasses import dataclass, field

import yaml

import trainers  # noqa: F401  (the methods' registry entries: whether they train, how their steps are counted)
from engine.config import load_yaml, read_config_file
from engine.registry import TRAINER_REGISTRY
from engine.runs import (LOCK_NAME, DataRef, RunConfig, Step, b2n_steps, config_folder, experiment_name,  # noqa: F401
                         lock_held, transfer_steps)
from lt_sampling.profiles import exp_profile
from tools.tables.spec import PLANNER_KEYS, REPO, SpecError, dataset_info

ENGINE_DEFAULTS = {"OPTIM.MAX_EPOCH": 10, "DATALOADER.TRAIN_X.BATCH_SIZE": 32}  # engine/config.py


# results.json fields a collected run must agree on with its plan (tools/tables/results.py checks them)
CHECKED_FIELDS = ("trainer", "dataset", "seed", "subsample_classes", "imb_factor", "num_shots", "loss", "config",
                  "backbone_sha256")


@dataclass
class Unit:
    key: str                # unique id inside a plan (= the training folder)
    row: object
    setting: int
    seed: int
    steps: list
    train_steps: int        # estimated optimizer steps of the training run (0: nothing to train; None: unknown)
    train_classes: int
    identity: tuple = field(default=())
    config: str = None      # the trainer config of this unit's runs (the row's, or its config_by_dataset entry)

    def state(self):
        """done | running | partial | missing (read-only)."""
        if all(s.done for s in self.steps):
            return "done"
        if any(lock_held(s.folder) for s in self.steps):
            return "running"
        if any(os.path.isdir(s.folder) for s in self.steps):
            return "partial"
        return "missing"


def folder_tag(row, spec_opts=(), extra_opts=(), config=None):
    """The config folder of a row's runs (every opt named, run-neutral ones too: table folders always have)."""
    return config_folder(config or row.config, row.loss, list(spec_opts) + list(row.opts) + list(extra_opts),
                         neutral_in_tag=True)


def experiment(spec, setting):
    return experiment_name(spec.regime, setting)


def _config_value(trainer, config, key, opts, default=None):
    opts = list(opts)
    for k, v in zip(opts[0::2], opts[1::2]):
        if k == key:
            try:
                return yaml.safe_load(v)
            except yaml.YAMLError:
                return v
    node = _trainer_yaml(trainer, config)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return ENGINE_DEFAULTS.get(key, default)
        node = node[part]
    return node


@functools.lru_cache(maxsize=None)
def _trainer_yaml(trainer, config):
    return read_config_file(REPO / "configs" / "trainers" / trainer / f"{config}.yaml") or {}


@functools.lru_cache(maxsize=None)
def train_images(dataset, regime, setting, all_classes=False, cap=None):
    """(classes, images) of a training run, from configs/tables/datasets.yaml, equal class sizes assumed:
    per-class cap (100 or the shots; ``cap``: a DATASET.NUM_SHOTS opt, -1 = every image), then the long-tailed
    profile the data pipeline draws (lt_sampling's exponential profile) over the classes."""
    info = dataset_info().get(dataset)
    if info is None:  # e.g. a dataset of an ad-hoc spec: the run is planned, its cost is unknown
        return None
    classes = info["classes"] if all_classes else math.ceil(info["classes"] / 2)
    per_class = info["train_images"] // info["classes"]
    default_cap = setting if regime == "fewshot" else 100
    n_max = per_class if cap is not None and cap < 0 else min(cap or default_cap, per_class)
    if regime == "fewshot":
        return classes, classes * n_max
    return classes, sum(exp_profile(n_max, classes, setting))


def estimate_steps(row, dataset_cfg_name, regime, setting, opts, all_classes=False, config=None):
    """(training steps, training classes); (None, None) for a dataset not in configs/tables/datasets.yaml.
    ``config``: the unit's trainer config (default the row's). The method counts its steps
    (``MethodInfo.train_steps``; 0 for a method that does not train)."""
    config = config or row.config
    info = TRAINER_REGISTRY.info(row.trainer)
    shots = dict(zip(list(opts)[0::2], list(opts)[1::2])).get("DATASET.NUM_SHOTS")
    size = train_images(dataset_cfg_name, regime, setting, all_classes, int(shots) if shots else None)
    if size is None:
        return (None if info.trains else 0), None
    classes, images = size
    if not info.trains:
        return 0, classes
    value = lambda key, default=None: _config_value(row.trainer, config, key, opts, default)  # noqa: E731
    return info.train_steps(value, images, classes, _dataset_cfg_name(dataset_cfg_name)), classes


@functools.lru_cache(maxsize=None)
def _dataset_cfg_name(config):
    return (load_yaml(REPO / "configs" / "datasets" / f"{config}.yaml", "config file") or {}).get(
        "DATASET", {}).get("NAME", config)


@dataclass
class Plan:
    spec: object
    output: str
    units: list             # what to run: one unit per training folder
    members: list = None    # what the table reads: one unit per (row, setting, seed[, dataset]); two rows that
                            # are the same run (a sweep's default and the main row) share the folder

    def steps(self):
        return [s for u in self.units for s in u.steps]

    def states(self):
        return {u.key: u.state() for u in self.units}

    def totals(self, step_times=None):
        """Counts for --dry-run: runs, training runs, training steps, GPU-hours (when step times are given)."""
        states = self.states()
        run_states = [s.state() for s in self.steps()]
        out = {"units": len(self.units), "training_runs": len(self.units),
               "eval_runs": sum(len(u.steps) - 1 for u in self.units),
               "runs": sum(len(u.steps) for u in self.units),
               "training_steps": sum(u.train_steps or 0 for u in self.units),
               "runs_without_estimate": sum(u.train_steps is None for u in self.units),
               "by_state": {s: sum(1 for v in states.values() if v == s)
                            for s in ("done", "running", "partial", "missing")},
               "runs_by_state": {s: run_states.count(s) for s in ("done", "running", "partial", "missing")}}
        # a unit whose training run finished (its evaluation may still be missing) has no training left
        out["training_steps_left"] = sum(u.train_steps or 0 for u in self.units
                                         if states[u.key] != "done" and u.steps[0].state() != "done")
        if step_times is not None:
            hours, missing = 0.0, set()
            for u in self.units:
                ms = step_ms(step_times, u.row.trainer, u.config or u.row.config, u.train_classes)
                if ms is None or u.train_steps is None:
                    if u.train_steps or u.train_steps is None:
                        missing.add(u.row.trainer)
                    continue
                hours += u.train_steps * ms / 3.6e6
            out["gpu_hours"] = hours
            out["gpu_hours_missing_trainers"] = sorted(missing)
        return out


def build_plan(spec, output="output", data_root="data", extra_opts=()):
    """Every unit of ``spec`` under ``output`` (nothing is read or written but the configs)."""
    extra_opts = list(extra_opts or [])
    if len(extra_opts) % 2:
        raise SpecError(f"--opts must be KEY VALUE pairs, got {extra_opts}")
    moved = [k for k in extra_opts[0::2] if k in PLANNER_KEYS]
    if moved:
        raise SpecError(f"--opts may not set {', '.join(moved)} (use --output / --data)")
    out = os.path.abspath(output)
    data = os.path.abspath(data_root)
    units, identities, members = {}, {}, []
    for setting in spec.settings:
        for row in spec.rows:
            opts = list(spec.opts) + list(row.opts) + extra_opts
            opts_key = tuple(sorted(zip(opts[0::2], opts[1::2])))

            def run_config(cfg):
                return RunConfig(row.trainer, cfg, folder_tag(row, spec.opts, extra_opts, cfg), row.loss, tuple(opts))

            def ref(ds):
                return DataRef(ds.name, ds.config, tuple(_inside_data(ds, data)))

            for seed in spec.seeds:
                if spec.b2n:
                    for ds in spec.datasets:
                        cfg = row.config_for(ds.name)
                        steps = b2n_steps(run_config(cfg), out, data, spec.regime, setting, ref(ds), seed)
                        n, classes = estimate_steps(row, ds.config, spec.regime, setting, opts, config=cfg)
                        _add(units, identities, members, Unit(steps[0].folder, row, setting, seed, steps, n, classes,
                                                              (row.trainer, cfg, row.loss, opts_key, ds), cfg))
                else:
                    src = spec.source
                    cfg = row.config_for(src.name)      # the targets are evaluated with the source run's config
                    steps = transfer_steps(run_config(cfg), out, data, spec.regime, setting, ref(src),
                                           [ref(ds) for ds in spec.datasets], seed)
                    n, classes = estimate_steps(row, src.config, "lt_b2n", setting, opts, all_classes=True, config=cfg)
                    _add(units, identities, members, Unit(steps[0].folder, row, setting, seed, steps, n, classes,
                                                          (row.trainer, cfg, row.loss, opts_key, src), cfg))
    return Plan(spec, out, list(units.values()), members)


def _inside_data(dataset, data):
    """The dataset's opts with its DATASET.ROOT (a folder inside --data, relative or absolute) made absolute;
    a root that leaves --data is an error."""
    opts = list(dataset.opts)
    for i in range(0, len(opts), 2):
        if opts[i] == "DATASET.ROOT":
            path = os.path.normpath(os.path.join(data, opts[i + 1]))
            if os.path.commonpath([path, data]) != data:
                raise SpecError(f"dataset {dataset.name}: DATASET.ROOT {opts[i + 1]} leaves --data {data}")
            opts[i + 1] = path
    return opts


def _add(units, identities, members, unit):
    """Two rows with the same folder must be the same run (e.g. a sweep's default value and the main row)."""
    other = identities.get(unit.key)
    if other is not None and other != unit.identity:
        raise SpecError(f"two different runs map to one folder {unit.key}: {other} vs {unit.identity}")
    identities[unit.key] = unit.identity
    units.setdefault(unit.key, unit)
    members.append(unit)


def load_step_times(paths):
    """Step times from ``python -m tools.bench ... --out FILE`` (one JSON object per bench run: ``trainer``,
    ``config`` (config file name), ``classes``, ``batch``, ``ms_per_step``, ...). ``paths``: one path or a list;
    a folder means every ``*.json`` in it; a file may also hold a list of such objects. Returns
    ``{"device": ..., "entries": [...]}``."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for p in paths:
        files += sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".json")) if os.path.isdir(p) else [p]
    entries = []
    for path in files:
        with open(path) as f:
            data = json.load(f)
        for e in data if isinstance(data, list) else [data]:
            if not isinstance(e, dict) or not {"trainer", "ms_per_step"} <= set(e):
                raise ValueError(f"{path} is not a tools.bench --out file (needs 'trainer' and 'ms_per_step')")
            e = dict(e)
            e["config"] = os.path.splitext(os.path.basename(str(e.get("config") or "")))[0]
            entries.append(e)
    if not entries:
        raise ValueError(f"no step times in {', '.join(map(str, paths))}")
    devices = sorted({str(e.get("device", "?")) for e in entries})
    return {"device": ", ".join(devices), "entries": entries, "files": files}


def step_ms(step_times, trainer, config, classes):
    """ms per training step for (trainer, config): the entry with the nearest class count; entries without a
    config match any config of the trainer; None when the file has no entry for the trainer."""
    entries = [e for e in step_times["entries"] if e.get("trainer") == trainer]
    exact = [e for e in entries if e.get("config") == config]
    entries = exact or [e for e in entries if not e.get("config")] or entries
    if not entries:
        return None
    if classes is None:
        return float(entries[0]["ms_per_step"])
    best = min(entries, key=lambda e: abs(int(e.get("classes", classes)) - classes))
    return float(best["ms_per_step"])
