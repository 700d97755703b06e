"""Collect: the ``results.json`` files of a plan's runs -> one value per table cell.

Conventions (tools/collect_results.py, docs/protocol.md): metrics are averaged over seeds first; HM-A / HM-M
are the harmonic mean of the seed-averaged base and new accuracy / macro-F1. The ``±`` of an HM cell is the
sample std (ddof=1) over seeds of the per-seed HM (seeds with both a base and a new result); of a plain
metric, the sample std of that metric. ``hm_mean`` = (HM-A + HM-M) / 2. An average column is the plain mean
of the per-dataset means (no std) and is empty unless every dataset has a value; with ``layout.average_hm:
of_averages`` its HM cells are instead the HM of its average base and new (VaMP's convention).

Only the planned run goes into a cell: each ``results.json`` is checked against the run the plan expects
(``Step.expected``: trainer, dataset, seed, split, imbalance factor, shots, loss, config folder / variant
tag); a mismatch, or a file that does not parse, is left out with one warning naming the file and the field.
"""
import json
import os
from dataclasses import dataclass, field

from engine.metrics import harmonic_mean
from tools.collect_results import mean_std

AVERAGE = "__average__"
RESULT_KEYS = {"acc": "accuracy", "f1": "macro_f1", "head_acc": "head_acc", "tail_acc": "tail_acc"}


@dataclass
class Cell:
    mean: float = None
    std: float = None
    n: int = 0            # seeds that contributed
    of: int = 0           # seeds the spec asks for
    seeds: list = field(default_factory=list)


def _same(field, found, want):
    if field == "imb_factor":
        try:
            return float(found) == float(want)
        except (TypeError, ValueError):
            return False
    if field in ("seed", "num_shots"):
        return isinstance(found, int) and not isinstance(found, bool) and found == want
    return found == want


def check_record(rec, step):
    """The first field of ``rec`` (a results.json) that disagrees with the run ``step`` of the plan:
    (field, found, expected), or None when every planned field agrees (a missing field disagrees)."""
    for field_name, want in step.expected().items():
        found = rec.get(field_name, "<missing>")
        if not _same(field_name, found, want):
            return field_name, found, want
    return None


def runs_on_other_weights(plan):
    """The finished runs of ``plan`` whose results.json records other backbone weights (sha256) than the plan's
    runs load: [(results.json path, recorded sha256, planned sha256)]. The launcher would take them as done."""
    stale = []
    for u in plan.members or plan.units:
        for step in u.steps:
            path = os.path.join(step.folder, "results.json")
            want = step.expected().get("backbone_sha256") if os.path.isfile(path) else None
            if not want:
                continue
            try:
                with open(path) as f:
                    found = json.load(f).get("backbone_sha256", "<missing>")
            except (OSError, ValueError, AttributeError):
                continue   # corrupt: collect warns about it
            if found != want:
                stale.append((path, found, want))
    return stale


def _read(step, eval_key, warn, refused):
    """The results of one run, or None: missing, corrupt (warned) or not the planned run (warned, excluded)."""
    path = os.path.join(step.folder, "results.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            rec = json.load(f)
        if not isinstance(rec, dict):
            raise ValueError(f"a JSON {type(rec).__name__}, not an object")
    except (OSError, ValueError) as err:
        warn(f"{path}: corrupt results.json ({' '.join(str(err).split())}); its cell is missing")
        refused.append(path)
        return None
    bad = check_record(rec, step)
    if bad is not None:
        field_name, found, want = bad
        warn(f"{path}: {field_name} is {found!r}, the plan expects {want!r}; not this cell's run, excluded")
        refused.append(path)
        return None
    res = (rec.get("results") or {}).get(eval_key)
    if res is None:
        warn(f"{path} has no results[{eval_key!r}] (has {sorted(rec.get('results') or {})})")
    return res


def _metric_cell(per_seed, of):
    values = {s: v for s, v in per_seed.items() if v is not None}
    m, sd = mean_std(list(values.values()))
    return Cell(m, sd, len(values), of, sorted(values))


def collect(plan, warn=lambda msg: None, refused=None):
    """{(setting, row label, group key, metric): Cell} for every cell of the spec's layout (plus head/tail).
    ``refused``: a list that gets the path of every results.json left out (corrupt or not the planned run)."""
    refused = [] if refused is None else refused
    spec = plan.spec
    of = len(spec.seeds)
    # raw[(setting, row, dataset)][seed] = {"base": res, "new": res} or {"all": res}
    raw = {}
    for u in plan.members or plan.units:
        for i, step in enumerate(u.steps):
            res = _read(step, spec.eval_key, warn, refused)
            if spec.b2n:
                part = "base" if i == 0 else "new"
            else:
                part = "all"
            raw.setdefault((u.setting, u.row.label, step.dataset), {}).setdefault(u.seed, {})[part] = res
    cells = {}
    groups = [g for g, _ in spec.groups() if g != AVERAGE]
    metrics = _all_metrics(spec)
    for setting in spec.settings:
        for row in spec.rows:
            for g in groups:
                seeds = raw.get((setting, row.label, g), {})
                for metric in metrics:
                    cells[(setting, row.label, g, metric)] = _cell(spec, seeds, metric, of)
            if spec.average != "none":
                targets = [d.name for d in spec.datasets]
                for metric in metrics:
                    vals = [cells[(setting, row.label, d, metric)].mean for d in targets]
                    n = min(cells[(setting, row.label, d, metric)].n for d in targets)
                    cells[(setting, row.label, AVERAGE, metric)] = Cell(
                        None if any(v is None for v in vals) else sum(vals) / len(vals), None, n, of)
                if spec.b2n and spec.average_hm == "of_averages":
                    _hm_of_averages(cells, (setting, row.label, AVERAGE), of)
    return cells


def _hm_of_averages(cells, key, of):
    """The Average column's HM cells as the HM of the average base and new (VaMP's convention), not the mean
    of the per-dataset HMs; hm_mean = the mean of the two."""
    hms = []
    for hm, base, new in (("hm_acc", "base_acc", "new_acc"), ("hm_f1", "base_f1", "new_f1")):
        b, n = cells[key + (base,)], cells[key + (new,)]
        value = harmonic_mean(b.mean, n.mean) if b.mean is not None and n.mean is not None else None
        cells[key + (hm,)] = Cell(value, None, min(b.n, n.n), of)
        hms.append(cells[key + (hm,)])
    cells[key + ("hm_mean",)] = Cell(None if any(h.mean is None for h in hms) else sum(h.mean for h in hms) / 2,
                                     None, min(h.n for h in hms), of)


def _all_metrics(spec):
    if spec.b2n:
        return ["base_acc", "new_acc", "hm_acc", "base_f1", "new_f1", "hm_f1", "hm_mean", "base_head_acc", "base_tail_acc"]
    return ["acc", "f1", "head_acc", "tail_acc"]


def _get(res, key):
    return None if res is None else res.get(RESULT_KEYS[key])


def _cell(spec, seeds, metric, of):
    if not spec.b2n:
        return _metric_cell({s: _get(v.get("all"), metric) for s, v in seeds.items()}, of)
    if metric in ("base_acc", "new_acc", "base_f1", "new_f1", "base_head_acc", "base_tail_acc"):
        part, key = metric.split("_", 1)
        return _metric_cell({s: _get(v.get(part), key) for s, v in seeds.items()}, of)
    keys = {"hm_acc": ["acc"], "hm_f1": ["f1"], "hm_mean": ["acc", "f1"]}[metric]
    hms = []
    for key in keys:
        base = {s: _get(v.get("base"), key) for s, v in seeds.items()}
        new = {s: _get(v.get("new"), key) for s, v in seeds.items()}
        mb = mean_std([x for x in base.values() if x is not None])[0]
        mn = mean_std([x for x in new.values() if x is not None])[0]
        paired = {s: harmonic_mean(base[s], new[s]) for s in seeds if base[s] is not None and new[s] is not None}
        hms.append((harmonic_mean(mb, mn) if mb is not None and mn is not None else None, paired))
    if any(h is None for h, _ in hms):
        return Cell(None, None, 0, of)
    common = sorted(set.intersection(*[set(p) for _, p in hms]))
    per_seed = [sum(p[s] for _, p in hms) / len(hms) for s in common]
    return Cell(sum(h for h, _ in hms) / len(hms), mean_std(per_seed)[1], len(common), of, common)
