"""Paper tables and figures from one spec each: load -> plan -> launch -> collect -> render.

    from tools.tables import load_spec, build_plan, launch, collect, render_all
    spec = load_spec("table1")                      # or a path, or a dict (an ad-hoc spec)
    plan = build_plan(spec, output="output", data_root="data")
    plan.totals()                                   # runs, training steps (read-only)
    launch(plan, launcher="local", jobs=2)          # submitit; only unfinished, unlocked runs
    cells = collect(plan)                           # {(setting, row, group, metric): Cell}
    render_all(plan, cells, "output/tables/table1") # .md / .csv / .tex (+ paper numbers) and plots

Nothing in ``engine/`` imports this package. Command line: ``python -m tools.tables --help``.
"""
from tools.tables.plan import build_plan, load_step_times  # noqa: F401
from tools.tables.results import collect  # noqa: F401
from tools.tables.spec import Spec, SpecError, build_spec, load_spec  # noqa: F401


def launch(plan, **kw):
    from tools.tables.launcher import launch as _launch
    return _launch(plan, **kw)


def render_all(plan, cells, out_dir, with_plots=True, tex_paper=False):
    """Write the table files (and plots) of ``plan`` into ``out_dir``; returns the written paths.
    ``tex_paper``: the paper's value next to ours in the LaTeX table."""
    from tools.tables.render import read_paper, write_all
    paper = read_paper(plan.spec.paper) if plan.spec.paper else None
    plots = []
    if with_plots:
        from pathlib import Path
        from tools.tables.plots import plot_all
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        plots = plot_all(plan, cells, out_dir)
    return write_all(plan.spec, cells, out_dir, paper, plots, tex_paper) + plots
