"""One command per paper table / figure: plan, run what is missing (submitit), collect, render.

    python -m tools.tables table1 --dry-run                 # every run, its folder and state; totals
    python -m tools.tables table1 --dry-run --step-times bench/       # + GPU-hours (tools.bench --out files)
    python -m tools.tables table1 --jobs 4                  # local executor, 4 parallel runs
    python -m tools.tables table1 --launcher slurm --partition gpu --gpus-per-run 1 --time 720
    python -m tools.tables table1 --collect-only            # render from what exists
    python -m tools.tables table5                           # efficiency (timed, not copied)

Tables go to OUTPUT/tables/<name>/<name>.{md,csv,tex} (+ plots .png/.pdf). SPEC is a name in
configs/tables/ or a path to a spec file.
"""
import argparse
import json
import os
import sys
from pathlib import Path

from engine.cli import UserError, require_at_least, run_cli
from tools.tables.spec import REPO


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tools.tables", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="table spec: a name in configs/tables/ (table1, figure3, ...) or a YAML path")
    p.add_argument("--output", default=os.environ.get("OUTPUT", "output"), help="results root (default: $OUTPUT or output)")
    p.add_argument("--data", default=os.environ.get("DATA", str(REPO / "data")), help="datasets root (default: $DATA or <repo>/data)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="list the runs, their folders and states, and totals; run nothing, write nothing")
    mode.add_argument("--collect-only", action="store_true", help="render from the finished runs; launch nothing")
    p.add_argument("--step-times", nargs="+", default=None, metavar="FILE",
                   help="tools.bench --out files (or folders of them): adds GPU-hours to --dry-run")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local")
    p.add_argument("--jobs", type=int, default=None, help="local: parallel runs (default: one per visible GPU, else 1)")
    p.add_argument("--partition", default=None, help="slurm partition")
    p.add_argument("--gpus-per-run", type=int, default=1, help="slurm: GPUs per run")
    p.add_argument("--cpus-per-run", type=int, default=8, help="slurm: CPUs per run")
    p.add_argument("--time", type=int, default=None, help="slurm: time limit per run in minutes")
    p.add_argument("--array-parallelism", type=int, default=64, help="slurm: array tasks running at once")
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--no-wait", action="store_true", help="slurm: return after submitting (render later with --collect-only)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the spec's seeds")
    p.add_argument("--datasets", nargs="+", default=None, help="override the spec's datasets (names it lists)")
    p.add_argument("--settings", type=int, nargs="+", default=None,
                   help="override the spec's settings (imbalance factors or shots), e.g. to run one factor first")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--tex-paper", action="store_true", help="LaTeX: the paper's value next to ours in each cell")
    p.add_argument("--efficiency-dataset", default=None, help="table5: dataset to time (default: the spec's, eurosat)")
    p.add_argument("--cpu-shots", type=int, default=4, help="table5 without a GPU: training images per class (subset)")
    p.add_argument("--quiet", action="store_true", help="--dry-run: totals only, no run list")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                   help="KEY VALUE opts for every run (part of every run folder's name); must come last")
    return require_at_least(p.parse_args(argv), gpus_per_run=0, cpus_per_run=1, time=1, array_parallelism=1,
                            seeds=0, cpu_shots=1)


def _fmt_int(n):
    return f"{n:,}"


def dry_run(plan, step_times_path=None, quiet=False, out=print):
    from tools.tables.plan import load_step_times
    step_times = load_step_times(step_times_path) if step_times_path else None
    if not quiet:
        for u in plan.units:
            for i, step in enumerate(u.steps):
                steps = "?" if u.train_steps is None else u.train_steps
                cost = f"  training steps {steps}" if i == 0 else f"  eval of {u.steps[0].folder}"
                out(f"{step.state():8s} {step.folder}{cost}")
    t = plan.totals(step_times)
    s = t["runs_by_state"]
    out(f"{plan.spec.name}: {_fmt_int(t['training_runs'])} training runs + {_fmt_int(t['eval_runs'])} evaluation runs "
        f"= {_fmt_int(t['runs'])} runs; training steps {_fmt_int(t['training_steps'])} (estimated from "
        f"configs/tables/datasets.yaml), left {_fmt_int(t['training_steps_left'])}; runs done {s['done']}, "
        f"running {s['running']}, partial {s['partial']}, missing {s['missing']}"
        + (f"; {t['runs_without_estimate']} training run(s) without a step estimate (dataset not in "
           f"configs/tables/datasets.yaml)" if t["runs_without_estimate"] else ""))
    if step_times is not None:
        miss = t["gpu_hours_missing_trainers"]
        out(f"{plan.spec.name}: GPU-hours (training steps x ms/step of {len(step_times['files'])} bench file(s), "
            f"{step_times.get('device', '?')}): {t['gpu_hours']:.1f}"
            + (f"; no step time for {', '.join(miss)}" if miss else ""))
    return t


def main(argv=None):
    args = parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}")
    if Path(args.spec).stem == "table5":
        from tools.tables.efficiency import main as eff_main
        return eff_main(args)
    from tools.tables import build_plan, collect, launch, load_spec, render_all
    from tools.tables.results import runs_on_other_weights
    overrides = {k: v for k, v in (("seeds", args.seeds), ("settings", args.settings)) if v} or None
    if args.datasets:
        listed = {d.name: {"name": d.name, "config": d.config, "opts": list(d.opts)}
                  for d in load_spec(args.spec, overrides).datasets}
        unknown = [d for d in args.datasets if d not in listed]
        if unknown:
            raise UserError(f"--datasets: {', '.join(unknown)} not in the spec's datasets ({', '.join(listed)})")
        overrides = dict(overrides or {}, datasets=[listed[d] for d in args.datasets])
    spec = load_spec(args.spec, overrides)
    plan = build_plan(spec, args.output, args.data, args.opts)
    if args.dry_run:
        dry_run(plan, args.step_times, args.quiet)
        return 0
    rc = 0
    if not args.collect_only:
        stale = runs_on_other_weights(plan)
        if stale:
            path, found, want = stale[0]
            raise UserError(f"{len(stale)} finished run(s) under {plan.output} were made with other backbone weights "
                            f"than this plan's runs load (first: {path} records sha256 {str(found)[:12]}, the weights "
                            f"file now has {want[:12]}): they are not this plan's runs, and the launcher would take them as done; run "
                            f"into a fresh --output, or point CLIP_WEIGHTS_DIR / MODEL.BACKBONE.PATH at the weights "
                            f"they used")
        slurm = {"partition": args.partition, "gpus_per_run": args.gpus_per_run, "cpus_per_run": args.cpus_per_run,
                 "time_min": args.time, "array_parallelism": args.array_parallelism, "account": args.account,
                 "qos": args.qos}
        report = launch(plan, launcher=args.launcher, jobs=args.jobs, slurm=slurm, wait=not args.no_wait)
        out_dir = Path(plan.output) / "tables" / spec.name
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "launch_report.json").write_text(json.dumps(report, indent=1))
        if args.launcher == "slurm" and args.no_wait:
            print(f"submitted; render later with: python -m tools.tables {args.spec} --collect-only")
            return 0
        failed = [o for o in report["outcomes"] if o["status"] == "failed"] + report["job_failures"]
        rc = 1 if failed else 0
    refused = []
    cells = collect(plan, warn=lambda m: print(f"warning: {m}", file=sys.stderr), refused=refused)
    out_dir = Path(plan.output) / "tables" / spec.name
    paths = render_all(plan, cells, out_dir, with_plots=not args.no_plots, tex_paper=args.tex_paper)
    states = plan.states()
    done = sum(1 for v in states.values() if v == "done")
    print((out_dir / f"{spec.name}.md").read_text())
    print(f"{spec.name}: {done} of {len(states)} units done; wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    if refused:   # the tables are written (those cells missing), but the run is not clean
        print(f"{spec.name}: {len(refused)} results.json left out (see the warnings above)", file=sys.stderr)
        rc = rc or 1
    return rc


if __name__ == "__main__":
    run_cli(main)
