"""Table 5 (efficiency), measured: one training epoch and one pass over the test set of MaPLe, MMA and LAMP
with their real configs on the LT-B2N base split of a dataset (EuroSAT, imb 10, by default), trainable
parameters and peak memory, in the paper's layout, beside the paper's numbers. HM-A / HM-M are the
Average column of Table 1 at imb 10 from the runs that exist under the same output root ("–" otherwise).

Without a GPU the epoch runs on a subset (``--cpu-shots``, default 4 training images per class) and the
table says so. Spec: configs/tables/table5.yaml (methods, dataset, imbalance factor, paper numbers).
"""
import argparse
import csv
import json
import os
import resource
import time
from pathlib import Path

from tools.tables.render import _md_table, fmt
from tools.tables.spec import SPEC_DIR, SpecError, _check_trainer_config, _safe_name, read_yaml

KEYS = {"name", "title", "dataset", "setting", "seed", "methods", "hm_from", "paper"}


def load_efficiency_spec(path=None):
    path = Path(path or SPEC_DIR / "table5.yaml")
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec is a mapping")
    unknown = set(raw) - KEYS
    if unknown:
        raise SpecError(f"{path}: unknown key(s) {sorted(unknown)} (known: {sorted(KEYS)})")
    for m in raw.get("methods") or []:
        if not isinstance(m, dict) or not {"label", "trainer", "config"} <= set(m):
            raise SpecError(f"{path}: a method needs label, trainer and config, got {m}")
        _check_trainer_config(_safe_name(m["trainer"], "trainer", str(path)), _safe_name(m["config"], "config", str(path)),
                              str(path))
    raw.setdefault("name", path.stem)
    raw["path"] = path
    return raw


def read_efficiency_paper(path):
    """{(row, metric): (value text, line)} of table5_paper.csv (columns row,metric,value,line)."""
    out = {}
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            out[(rec["row"], rec["metric"])] = (rec["value"], int(rec["line"]))
    return out


def measure(method, dataset, setting, seed, data_root, out_dir, extra_opts, cpu_shots):
    """Build the trainer exactly as a run's step does (the config's own epochs and schedule), then time its first
    epoch and one test pass."""
    import torch

    import datasets  # noqa: F401  (registers the datasets)
    import trainers  # noqa: F401  (registers the trainers)
    from engine.config import build_cfg
    from engine.runs import build_trainer, dataset_config_file, trainer_config_file

    cuda = torch.cuda.is_available()
    shots = 100 if cuda else cpu_shots
    run_dir = os.path.join(out_dir, "runs", method["trainer"])
    ns = argparse.Namespace(
        root=data_root, seed=seed, trainer=method["trainer"], output_dir=run_dir,
        dataset_config_file=dataset_config_file(dataset), config_file=trainer_config_file(method["trainer"], method["config"]),
        opts=["DATASET.NUM_SHOTS", str(shots), "DATASET.IMB_FACTOR", str(setting), "DATASET.SUBSAMPLE_CLASSES", "base",
              "DATASET.CACHE_DIR", os.path.join(out_dir, "cache")]
        + list(method.get("opts") or []) + list(extra_opts))
    cfg = build_cfg(ns)
    trainer = build_trainer(cfg, {"config": method["config"], "experiment": "efficiency"})
    params = trainer.count_trainable_parameters()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if params:
        trainer.start_training()
        trainer.before_epoch()
        if cuda:
            torch.cuda.synchronize()
        tic = time.perf_counter()
        trainer.run_epoch()
        if cuda:
            torch.cuda.synchronize()
        train_s = time.perf_counter() - tic
    else:
        train_s = 0.0
    tic = time.perf_counter()
    trainer.test()
    if cuda:
        torch.cuda.synchronize()
    test_s = time.perf_counter() - tic
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"label": method["label"], "trainer": method["trainer"], "config": method["config"],
            "train_images": len(trainer.dataset.train_x), "test_images": len(trainer.dm.test_loader.dataset),
            "train_epoch_min": train_s / 60, "test_pass_min": test_s / 60, "trainable_params": params,
            "peak_memory_mib": peak, "peak_memory_kind": "CUDA allocated" if cuda else "process max RSS (cumulative)",
            "device": torch.cuda.get_device_name() if cuda else "cpu", "shots_cap": shots}


def hm_from_table(spec, output, data_root):
    """{row label: (HM-A, HM-M)} from the Average column of ``hm_from`` (e.g. table1 at imb 10)."""
    src = spec.get("hm_from")
    if not src:
        return {}
    from tools.tables import build_plan, collect, load_spec
    plan = build_plan(load_spec(src["table"]), output, data_root)
    cells = collect(plan)
    out = {}
    for m in spec["methods"]:
        row = src.get("rows", {}).get(m["label"], m["label"])
        a = cells.get((int(src["setting"]), row, "__average__", "hm_acc"))
        f = cells.get((int(src["setting"]), row, "__average__", "hm_f1"))
        out[m["label"]] = (a.mean if a else None, f.mean if f else None)
    return out


def render(spec, rows, hms, paper):
    headers = ["Method", "Time / epoch", "Tun. Params", "HM-A", "HM-M", "Test pass", "Peak memory", "Train / test images"]
    lines, p_lines = [], []
    for r in rows:
        a, f = hms.get(r["label"], (None, None))
        lines.append([r["label"], f"{r['train_epoch_min']:.2f}min ({r['train_epoch_min'] * 60:.1f}s)", f"{r['trainable_params'] / 1000:.0f}K", fmt(a), fmt(f),
                      f"{r['test_pass_min']:.2f}min ({r['test_pass_min'] * 60:.1f}s)", f"{r['peak_memory_mib']:.0f} MiB", f"{r['train_images']} / {r['test_images']}"])
        p_lines.append([r["label"]] + [paper.get((r["label"], k), ("–", 0))[0]
                                       for k in ("time_per_epoch", "params", "hm_acc", "hm_f1")] + ["", "", ""])
    r0 = rows[0] if rows else {}
    note = (f"Measured on {r0.get('device', '?')}; dataset {spec['dataset']} LT-B2N base split, imb {spec['setting']}, "
            f"seed {spec.get('seed', 1)}; one training epoch and one pass over the base test set; "
            f"peak memory: {r0.get('peak_memory_kind', '')}. HM-A / HM-M: {spec['hm_from']['table']} Average at "
            f"imb {spec['hm_from']['setting']} from the existing runs." if spec.get("hm_from") else "")
    if r0 and r0.get("device") == "cpu":
        note += (f" CPU: the training set is a subset (at most {r0['shots_cap']} images per class before the long-tail "
                 "profile), so the times are not comparable with the paper's GPU epoch.")
    out = [f"# {spec.get('title', spec['name'])}", "", note, "", _md_table(headers, lines), ""]
    if paper:
        lines_used = sorted({v[1] for v in paper.values()})
        out += [f"Paper (lines {lines_used[0]}–{lines_used[-1]} of lamp_paper.txt; the paper does not say which "
                "GPU):", "", _md_table(headers, p_lines), ""]
    return "\n".join(out)


def main(args):
    """Entry from ``python -m tools.tables table5`` (args: the parsed tools.tables arguments)."""
    spec = load_efficiency_spec(args.spec if args.spec.endswith(".yaml") else None)
    dataset = args.efficiency_dataset or spec["dataset"]
    if args.dry_run:
        for m in spec["methods"]:
            print(f"measure  {m['label']}: {m['trainer']} / {m['config']} on {dataset} (LT-B2N base, imb "
                  f"{spec['setting']}): one epoch + one test pass")
        print(f"{spec['name']}: {len(spec['methods'])} measurements (no runs are stored); needs {dataset} under "
              f"{args.data} and the CLIP weights; HM-A / HM-M from {spec.get('hm_from', {}).get('table', '-')}")
        return 0
    out_dir = Path(args.output) / "tables" / spec["name"]
    rows = []
    if not args.collect_only:
        for m in spec["methods"]:
            print(f"[measure] {m['label']} ({m['trainer']} / {m['config']})", flush=True)
            rows.append(measure(m, dataset, spec["setting"], int(spec.get("seed", 1)), args.data, str(out_dir),
                                args.opts, args.cpu_shots))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "measurements.json").write_text(json.dumps(rows, indent=1))
    else:
        path = out_dir / "measurements.json"
        if not path.is_file():
            raise FileNotFoundError(f"no measurements yet: {path} (run without --collect-only)")
        rows = json.loads(path.read_text())
    spec["dataset"] = dataset
    paper = read_efficiency_paper(spec["path"].parent / spec["paper"]) if spec.get("paper") else {}
    text = render(spec, rows, hm_from_table(spec, args.output, args.data), paper)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{spec['name']}.md").write_text(text)
    print(text)
    return 0
