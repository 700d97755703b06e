"""Claims C1-C4 (issue 16) from the finished runs of the world benchmark and the world ablation.

    python -m tools.world_claims --output OUTPUT [--data DATA] [--seeds 1 2 3] [--opts KEY VALUE ...]

The runs are those of ``configs/tables/world_benchmark.yaml`` and ``configs/tables/world_ablation.yaml``
(``bash scripts/tables/world_benchmark.sh`` / ``world_ablation.sh`` with the same ``--output`` and ``--opts``):
their folders come from the table library (``tools.tables.build_plan``), their numbers from each run's
``results.json`` (the base run: ``results[test]`` and ``load_diagnostics``; the new-class run:
``results[test]``). Prints a markdown section; runs that are not finished are left out (and counted).

Conventions (printed with the section): CONVENTIONS below.
"""
import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.cli import UserError, require_at_least, run_cli  # noqa: E402
from engine.metrics import harmonic_mean  # noqa: E402
from tools.collect_results import mean_std  # noqa: E402

BENCHMARK, ABLATION = "world_benchmark", "world_ablation"
WORLD_DATASETS = ("world_shapes", "world_clutter", "world_textures")
LAMP, CANDLE, COOP_LA = "LAMP", "Candle", "CoOp+LA"
NO_LBO = "LAMP w/o LBO"
MEAN = "Mean"
HOLDS, FAILS, UNMEASURED = "holds", "does not hold", "not measured"

CONVENTIONS = (
    "Every comparison is paired by seed. Per seed and dataset, HM-A = HM(base accuracy, new accuracy) and HM-M = "
    "HM(base macro-F1, new macro-F1) of that seed's two runs (the tables' HM cells are the HM of the seed means, "
    "so they can differ slightly). The Mean column is, per seed, the mean over the datasets (seeds with every "
    "dataset finished). A cell is mean ± sample std (ddof=1) over seeds; Δ = a − b per seed, then its mean ± "
    "std, over the seeds where both sides finished. Each claim ends with a verdict: its stated rule applied to "
    "the mean paired differences of the Mean column; \"not measured\" when a difference it needs has no paired "
    "seed.")


# ---- pure computations (tests/test_world_benchmark.py checks them on hand-computed numbers) ---------------

def cv(freq):
    """Coefficient of variation of per-entry selection frequencies: population std / mean over the entries
    (0 = every entry equally often); None without any selection (no frequencies or all zero)."""
    if not freq or not sum(freq):
        return None
    m = sum(freq) / len(freq)
    return math.sqrt(sum((f - m) ** 2 for f in freq) / len(freq)) / m


@dataclass
class Paired:
    """Two per-seed series ({seed: value}) compared seed by seed."""
    a: dict
    b: dict

    @property
    def seeds(self):
        return sorted(set(self.a) & set(self.b))

    @property
    def diffs(self):
        return {s: self.a[s] - self.b[s] for s in self.seeds}

    def mean_diff(self):
        """Mean over the paired seeds of a − b; None without a paired seed."""
        return mean_std(list(self.diffs.values()))[0]


def dataset_mean(per_dataset, datasets):
    """{seed: mean over ``datasets``} for the seeds that have a value on every one of them."""
    seeds = set.intersection(*[set(per_dataset.get(d, {})) for d in datasets]) if datasets else set()
    return {s: sum(per_dataset[d][s] for d in datasets) / len(datasets) for s in sorted(seeds)}


def verdict(ok):
    """True -> holds, False -> does not hold, None (a needed difference without paired seeds) -> not measured."""
    return UNMEASURED if ok is None else (HOLDS if ok else FAILS)


def all_of(values, test):
    """test(v) for every value; None when any value is None (not measured)."""
    values = list(values)
    if not values or any(v is None for v in values):
        return None
    return all(test(v) for v in values)


def gain_claim(gains):
    """"The gain in HM-M exceeds the gain in HM-A and grows with imbalance": ``gains`` = {setting: (gain in
    HM-A, gain in HM-M)} (mean paired differences). Holds when, at every setting, gain_M > 0 and gain_M >
    gain_A, and gain_M at the largest setting > gain_M at the smallest; None when a gain is missing."""
    if not gains or any(g is None for pair in gains.values() for g in pair):
        return None
    lo, hi = min(gains), max(gains)
    return all(m > 0 and m > a for a, m in gains.values()) and gains[hi][1] > gains[lo][1]


def best_label(series_by_label):
    """The label whose series ({seed: value}) has the highest mean; None when none has a value."""
    means = {k: mean_std(list(v.values()))[0] for k, v in series_by_label.items()}
    means = {k: m for k, m in means.items() if m is not None}
    return max(means, key=means.get) if means else None


# ---- reading the runs -----------------------------------------------------------------------------------

def _read(folder):
    path = os.path.join(folder, "results.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_runs(plan):
    """({(setting, row label, dataset, seed): run}, units finished, units) of a plan; a run holds the base
    and new results (``spec.eval_key``) and the base run's load diagnostics."""
    key = plan.spec.eval_key
    runs, finished = {}, 0
    for u in plan.members:
        recs = [_read(s.folder) for s in u.steps]
        if any(r is None or key not in (r.get("results") or {}) for r in recs):
            continue
        finished += 1
        runs[(u.setting, u.row.label, u.steps[0].dataset, u.seed)] = {
            "base": recs[0]["results"][key], "new": recs[1]["results"][key],
            "load": recs[0].get("load_diagnostics") or {}}
    return runs, finished, len(plan.members)


def hm_acc(run):
    return harmonic_mean(run["base"].get("accuracy"), run["new"].get("accuracy"))


def hm_f1(run):
    return harmonic_mean(run["base"].get("macro_f1"), run["new"].get("macro_f1"))


def tail_head_gap(run):
    tail, head = run["base"].get("tail_acc"), run["base"].get("head_acc")
    return None if tail is None or head is None else tail - head


def layer_cv(layer):
    return lambda run: cv((run["load"].get(layer) or {}).get("freq"))


def all_layers_cv(layers):
    def f(run):
        values = [layer_cv(l)(run) for l in layers]
        return None if not values or any(v is None for v in values) else sum(values) / len(values)
    return f


class Source:
    """The finished runs of one plan, as per-seed series by dataset plus the Mean over datasets."""

    def __init__(self, plan):
        self.plan = plan
        self.datasets = [d.name for d in plan.spec.datasets]
        self.runs, self.finished, self.total = load_runs(plan)

    def series(self, setting, label, fn):
        out = {}
        for d in self.datasets:
            out[d] = {}
            for s in self.plan.spec.seeds:
                run = self.runs.get((setting, label, d, s))
                value = None if run is None else fn(run)
                if value is not None:
                    out[d][s] = value
        out[MEAN] = dataset_mean(out, self.datasets)
        return out

    def paired(self, setting, label_a, label_b, fn):
        a, b = self.series(setting, label_a, fn), self.series(setting, label_b, fn)
        return {g: Paired(a[g], b[g]) for g in self.datasets + [MEAN]}


# ---- markdown ---------------------------------------------------------------------------------------------

def _ms(values, digits, signed=False):
    m, sd = mean_std(list(values))
    return "–" if m is None else f"{m:{'+' if signed else ''}.{digits}f} ± {sd:.{digits}f}"


def _per_seed(p, digits):
    d = p.diffs
    return ", ".join(f"s{s} {v:+.{digits}f}" for s, v in d.items()) if d else "–"


def _table(first, lines, groups, names, digits=2):
    """lines: [(label, {group: Paired})]; columns per group: a, b, Δ = a − b; then the Mean's Δ per seed."""
    header = [first]
    for _, glabel in groups:
        header += [f"{glabel} {names[0]}", f"{glabel} {names[1]}", f"{glabel} Δ"]
    header.append(f"Δ per seed ({MEAN})")
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for label, pairs in lines:
        cells = [label]
        for g, _ in groups:
            p = pairs[g]
            cells += [_ms(p.a.values(), digits), _ms(p.b.values(), digits), _ms(p.diffs.values(), digits, True)]
        cells.append(_per_seed(pairs[MEAN], digits))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _groups(source):
    from tools.tables.spec import dataset_info
    info = dataset_info()
    return [(d, info.get(d, {}).get("label", d)) for d in source.datasets] + [(MEAN, MEAN)]


def _fmt(x, digits=2):
    return "–" if x is None else f"{x:+.{digits}f}"


def claim_c1(abl):
    setting = abl.plan.spec.settings[0]
    layers = sorted({l for (st, label, _, _), run in abl.runs.items() if st == setting and label == LAMP
                     for l in run["load"]}, key=int)
    out = [f"### C1: LBO balances the pool's load (imb {setting})", "",
           "Per LAMP layer: coefficient of variation (population std / mean) of the pool entries' selection "
           "frequencies in the last training epoch, LAMP (LBO on) vs LAMP w/o LBO (`TRAINER.LAMP.USE_LBO False`); "
           "Δ = LAMP − w/o LBO (lower = more balanced).", ""]
    if not layers:
        return out + ["No finished LAMP run with load diagnostics.", "", f"Verdict: **{UNMEASURED}**."], None
    lines = [(f"L{l}", abl.paired(setting, LAMP, NO_LBO, layer_cv(l))) for l in layers]
    lines.append(("all layers (mean)", abl.paired(setting, LAMP, NO_LBO, all_layers_cv(layers))))
    out += [_table("Layer", lines, _groups(abl), ("LAMP", "w/o LBO"), digits=3), ""]
    overall = lines[-1][1][MEAN].mean_diff()
    lower = [p[MEAN].mean_diff() for _, p in lines[:-1]]
    n_lower = sum(1 for d in lower if d is not None and d < 0)
    ok = None if overall is None else overall < 0
    out += [f"Rule: holds when the mean paired Δ of the all-layer mean CV (Mean over datasets) is < 0 "
            f"(here {_fmt(overall, 3)}; lower with LBO in {n_lower} of {len(layers)} layers). "
            f"Verdict: **{verdict(ok)}**.", ""]
    return out, ok


def claim_c2(abl):
    setting = abl.plan.spec.settings[0]
    variants = [r.label for r in abl.plan.spec.rows if r.method == LAMP and r.label != LAMP]
    out = [f"### C2: every LAMP component helps (imb {setting})", "",
           "Δ = variant − LAMP (full), per seed; HM-A / HM-M per seed as above.", ""]
    lines, oks = [], {}
    for v in variants:
        pa = abl.paired(setting, v, LAMP, hm_acc)
        pm = abl.paired(setting, v, LAMP, hm_f1)
        lines += [(f"{v} HM-A", pa), (f"{v} HM-M", pm)]
        oks[v] = all_of([pa[MEAN].mean_diff(), pm[MEAN].mean_diff()], lambda d: d < 0)
    out += [_table("Variant, metric", lines, _groups(abl), ("variant", "LAMP")), ""]
    for v, ok in oks.items():
        out.append(f"- {v}: {verdict(ok)}")
    ok = all_of(oks.values(), bool)
    out += ["", "Rule: a component helps when switching it off lowers both HM-A and HM-M (mean paired Δ of the "
            f"Mean < 0); the claim holds when all of them help. Verdict: **{verdict(ok)}**.", ""]
    return out, ok


def claim_c3(bench):
    spec = bench.plan.spec
    baselines = [r.label for r in spec.rows if r.label.endswith("+LA")]
    out = ["### C3: LAMP vs the best +LA baseline and vs Candle", "",
           "Best +LA baseline at each imbalance factor: the +LA row with the highest mean HM-A (Mean over datasets, "
           "then over seeds). Δ = LAMP − baseline, per seed.", ""]
    beats, gains = [], {"best +LA": {}, CANDLE: {}}
    for setting in spec.settings:
        best = best_label({b: bench.series(setting, b, hm_acc)[MEAN] for b in baselines})
        lines = []
        for ref_name, ref in (("best +LA", best), (CANDLE, CANDLE)):
            if ref is None:
                gains[ref_name][setting] = (None, None)
                beats += [None]
                continue
            pa, pm = bench.paired(setting, LAMP, ref, hm_acc), bench.paired(setting, LAMP, ref, hm_f1)
            lines += [(f"vs {ref} HM-A", pa), (f"vs {ref} HM-M", pm)]
            ga, gm = pa[MEAN].mean_diff(), pm[MEAN].mean_diff()
            gains[ref_name][setting] = (ga, gm)
            beats += [ga, gm]
        out += [f"imb {setting}: best +LA baseline **{best or '–'}**", ""]
        if lines:
            out += [_table("Comparison", lines, _groups(bench), ("LAMP", "baseline")), ""]
    ok_beats = all_of(beats, lambda d: d > 0)
    out += [f"- (a) LAMP above the best +LA baseline and Candle in HM-A and HM-M at every imbalance factor "
            f"(rule: every mean paired Δ of the Mean > 0): **{verdict(ok_beats)}**"]
    oks = {"a": ok_beats}
    for ref_name, g in gains.items():
        ok = gain_claim(g)
        oks[ref_name] = ok
        text = "; ".join(f"imb {s}: HM-A {_fmt(a)}, HM-M {_fmt(m)}" for s, (a, m) in sorted(g.items()))
        out.append(f"- (b) vs {ref_name}: LAMP's gain in macro-F1 (HM-M) exceeds its gain in accuracy (HM-A) and "
                   f"grows with imbalance (rule: at every imbalance factor gain HM-M > 0 and > gain HM-A, and gain "
                   f"HM-M at the largest factor > at the smallest; gains = mean paired Δ of the Mean; {text}): "
                   f"**{verdict(ok)}**")
    return out + [""], oks


def claim_c4(bench):
    spec = bench.plan.spec
    out = ["### C4: head bias on the base classes, LAMP vs CoOp+LA", "",
           "Gap = base tail accuracy − base head accuracy (head: the top 20% of base classes by training images); "
           "Δ = LAMP − CoOp+LA, per seed (> 0: LAMP less head-biased).", ""]
    lines, diffs = [], []
    for setting in spec.settings:
        p = bench.paired(setting, LAMP, COOP_LA, tail_head_gap)
        lines.append((f"imb {setting}", p))
        diffs.append(p[MEAN].mean_diff())
    out += [_table("Setting", lines, _groups(bench), ("LAMP", "CoOp+LA")), ""]
    ok = all_of(diffs, lambda d: d > 0)
    out += ["Rule: holds when the mean paired Δ of the gap (Mean over datasets) is > 0 at every imbalance factor "
            f"(here {', '.join(_fmt(d) for d in diffs)}). Verdict: **{verdict(ok)}**.", ""]
    return out, ok


def claims(output, data="data", opts=(), overrides=None, settings=None):
    """(markdown, {claim: verdict}) from the runs of world_benchmark and world_ablation under ``output``.
    ``overrides``: top-level spec keys applied to both specs (e.g. {"seeds": [1]}); ``settings``: the
    benchmark's imbalance factors to use (default: the spec's)."""
    from tools.tables import build_plan, load_spec
    bench_overrides = dict(overrides or {}, **({"settings": list(settings)} if settings else {})) or None
    bench = Source(build_plan(load_spec(BENCHMARK, bench_overrides), output, data, opts))
    abl = Source(build_plan(load_spec(ABLATION, overrides), output, data, opts))
    for source, needed in ((bench, (LAMP, CANDLE, COOP_LA)), (abl, (LAMP, NO_LBO))):
        missing = sorted(set(needed) - {r.label for r in source.plan.spec.rows})
        if missing:
            raise UserError(f"{source.plan.spec.name}: the claims need the row(s) {missing}, which the spec lacks")
    if not bench.runs and not abl.runs:
        raise UserError(f"no finished runs of {BENCHMARK} or {ABLATION} under {bench.plan.output}"
                        + (f" with --opts {' '.join(opts)}" if opts else "")
                        + f"; run bash scripts/tables/{BENCHMARK}.sh and {ABLATION}.sh first")
    out = ["## World benchmark claims", "",
           f"Runs under `{bench.plan.output}`: {BENCHMARK} {bench.finished} of {bench.total} units finished, "
           f"{ABLATION} {abl.finished} of {abl.total} (a unit: base training + new-class test). "
           + CONVENTIONS, ""]
    verdicts = {}
    for name, (lines, ok) in (("C1", claim_c1(abl)), ("C2", claim_c2(abl)), ("C3", claim_c3(bench)),
                              ("C4", claim_c4(bench))):
        out += lines
        verdicts[name] = {k: verdict(v) for k, v in ok.items()} if isinstance(ok, dict) else verdict(ok)
    return "\n".join(out), verdicts


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.world_claims", description=__doc__ + "\n" + CONVENTIONS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=os.environ.get("OUTPUT", "output"),
                   help="results root of the two world tables (default: $OUTPUT or output)")
    p.add_argument("--data", default=os.environ.get("DATA", "data"), help="datasets root (default: $DATA or data)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the specs' seeds")
    p.add_argument("--datasets", nargs="+", default=None, choices=WORLD_DATASETS,
                   help="only these world datasets (the Mean column is then over them)")
    p.add_argument("--settings", type=int, nargs="+", default=None,
                   help="only these imbalance factors of the benchmark (verdicts then rule on these alone)")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                   help="the KEY VALUE opts the tables were run with (part of the run folders); must come last")
    a = require_at_least(p.parse_args(argv), seeds=0)
    overrides = {k: v for k, v in (("seeds", a.seeds), ("datasets", a.datasets)) if v} or None
    text, _ = claims(a.output, a.data, a.opts, overrides, a.settings)
    print(text)
    return 0


if __name__ == "__main__":
    run_cli(main)
