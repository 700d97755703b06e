"""The table launcher's SLURM path on a real one-node cluster (scripts/slurm_local.sh: slurm-wlm + munge, no
accounting daemon, so no sacct): one job array per table, job state from squeue, scancel then relaunch, and
preempted / requeued tasks that resume from their epoch checkpoint.

The module brings the cluster up itself (and down again if it started it). It needs root and Debian's
slurm-wlm; without them it skips, except under LTPL_REQUIRE_SLURM=1 (.ci/run), where that is a failure."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers_run import REPO, TINY

SCRIPT = REPO / "scripts" / "slurm_local.sh"
REQUIRED = os.environ.get("LTPL_REQUIRE_SLURM") == "1"
SLURM_ARGS = ["--launcher", "slurm", "--gpus-per-run", "0", "--cpus-per-run", "1", "--no-plots"]


def _unavailable(reason):
    if REQUIRED:
        pytest.fail(f"{reason} (LTPL_REQUIRE_SLURM=1: the SLURM tests must run here)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        _unavailable("the local SLURM cluster (scripts/slurm_local.sh) runs as root")
    if not REQUIRED and not shutil.which("sbatch"):
        _unavailable("slurm-wlm is not installed (bash scripts/slurm_local.sh up installs it)")
    was_up = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True).returncode == 0
    up = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=900)
    if up.returncode != 0:
        _unavailable(f"bash scripts/slurm_local.sh up failed:\n{up.stdout[-2000:]}\n{up.stderr[-2000:]}")
    env_line = subprocess.run(["bash", str(SCRIPT), "env"], capture_output=True, text=True, check=True).stdout
    conf = re.fullmatch(r"export SLURM_CONF=(\S+)\s*", env_line).group(1)
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf        # the launcher, sbatch and the jobs find this cluster
    yield conf
    if before is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = before
    if not was_up:
        subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, timeout=120)


def _spec(tmp, name, seeds, epochs):
    spec = {"name": name, "regime": "lt_b2n", "settings": [10], "seeds": seeds, "datasets": ["synthetic_shapes"],
            "opts": TINY + ["OPTIM.MAX_EPOCH", str(epochs), "OPTIM.WARMUP_EPOCH", "0"],
            "methods": [{"label": "CoOp+LA", "trainer": "CoOp", "config": "vit_b16_ep50_ctxv1", "loss": "la",
                         "opts": ["OPTIM.LR", "0.05", "DATALOADER.TRAIN_X.BATCH_SIZE", "8"]}],
            "layout": {"metrics": ["hm_acc", "base_acc", "new_acc"], "average": "last"}}
    path = Path(tmp) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _cli(spec, out, root, *extra):
    from tools.tables.__main__ import main
    return main([str(spec), "--output", str(out), "--data", str(root), *SLURM_ARGS, *extra])


def _launcher(spec, out, root, *extra):
    """The launcher in its own process (so a test can act on the cluster while it waits)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "tools.tables", str(spec), "--output", str(out), "--data",
                             str(root), *SLURM_ARGS, *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _report(out, name):
    return json.loads((Path(out) / "tables" / name / "launch_report.json").read_text())


def _plan(spec, out, root):
    from tools.tables import build_plan, load_spec
    return build_plan(load_spec(str(spec)), str(out), str(root))


def _lock_info(folder):
    return json.loads((Path(folder) / ".table.lock").read_text())


def _wait_for(condition, timeout, what, launcher=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if launcher is not None and launcher.poll() is not None:
            pytest.fail(f"the launcher exited ({launcher.returncode}) before {what}:\n{launcher.stdout.read()}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def _start_requeued(task):
    """Wait until ``task`` is pending again after a requeue, then start it: SLURM holds a requeued job for
    about two minutes (its BeginTime), which an operator may lift."""
    def pending():
        out = subprocess.run(["squeue", "-h", "-j", task, "-o", "%T|%r"], capture_output=True, text=True).stdout
        return out.strip().split("|") if out.strip().startswith("PENDING") else None
    state = _wait_for(pending, 120, f"{task} requeued")
    if state[1] == "BeginTime":
        subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], check=True)


@pytest.fixture(scope="module")
def first_table(cluster, root, tmp_path_factory):
    base = tmp_path_factory.mktemp("slurm_table")
    spec = _spec(base, "slurm_synth", [1, 2], 20)   # ~15 s a unit: long enough to scancel a running one
    out = base / "out"
    assert _cli(spec, out, root) == 0
    return {"spec": spec, "out": out, "base": base}


def test_cluster_has_no_accounting_and_state_comes_from_squeue(cluster, tmp_path):
    from submitit.slurm.slurm import SlurmJob
    from tools.tables.slurm_jobs import GONE, SqueueSlurmJob, squeue_states
    info = subprocess.run(["sinfo", "-h", "-o", "%P %a %T"], capture_output=True, text=True, check=True).stdout
    assert info.split()[1] == "up" and info.split()[2] in ("idle", "mixed", "allocated")
    job_id = subprocess.run(["sbatch", "--parsable", "-o", str(tmp_path / "%j.out"), "--wrap", "sleep 300"],
                            capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip()
    try:
        sacct = subprocess.run(["sacct", "-j", job_id], capture_output=True, text=True)
        assert sacct.returncode != 0 and "accounting storage is disabled" in sacct.stdout + sacct.stderr
        job = SqueueSlurmJob(folder=tmp_path, job_id=job_id)
        assert job.watcher.get_state(job_id, mode="force") in ("PENDING", "RUNNING") and not job.done()
        plain = SlurmJob(folder=tmp_path, job_id=job_id)   # submitit's own watcher asks sacct: it never learns
        assert plain.watcher.get_state(job_id, mode="force") == "UNKNOWN"
    finally:
        subprocess.run(["scancel", job_id], check=True)
    _wait_for(lambda: job.done(force_check=True), 60, f"job {job_id} seen cancelled")
    assert job.state == "CANCELLED"
    assert not plain.watcher.is_done(job_id, mode="force")   # without sacct a cancelled job looks unfinished
    assert squeue_states(["99999999"]) == {"99999999": GONE}


def test_result_of_an_earlier_job_with_the_same_id_is_not_taken(tmp_path):
    """Job ids restart when a cluster's state is wiped: a result file older than the submission is removed."""
    from tools.tables.slurm_jobs import SqueueSlurmJob, track
    folder = tmp_path / "%j"
    old, new = SqueueSlurmJob(folder=folder, job_id="7_0"), SqueueSlurmJob(folder=folder, job_id="7_1")
    for job in (old, new):
        job.paths.result_pickle.parent.mkdir(parents=True)
        job.paths.result_pickle.write_bytes(b"x")
    submitted_at = time.time()
    os.utime(old.paths.result_pickle, (submitted_at - 60, submitted_at - 60))
    os.utime(new.paths.result_pickle, (submitted_at + 1, submitted_at + 1))
    tracked = track([old, new], folder, submitted_at)
    assert [type(j) for j in tracked] == [SqueueSlurmJob] * 2 and [j.job_id for j in tracked] == ["7_0", "7_1"]
    assert not old.paths.result_pickle.exists() and new.paths.result_pickle.exists()


def test_table_runs_as_one_job_array(first_table, root):
    out, spec = first_table["out"], first_table["spec"]
    report = _report(out, "slurm_synth")
    assert report["launcher"] == "slurm" and report["pending"] == 2 and not report["job_failures"]
    arrays = {j.split("_")[0] for j in report["jobs"]}
    assert len(arrays) == 1 and sorted(report["jobs"]) == [f"{min(arrays)}_{i}" for i in range(2)]
    assert sorted(o["status"] for o in report["outcomes"]) == ["done", "done"]
    plan = _plan(spec, out, root)
    assert set(plan.states().values()) == {"done"}
    ran_in = {_lock_info(s.folder)["job_id"] for u in plan.units for s in u.steps}
    assert ran_in == set(report["jobs"])            # every run ran inside one of the array's tasks
    md = (out / "tables/slurm_synth/slurm_synth.md").read_text()
    assert "| CoOp+LA |" in md


def test_request_the_cluster_cannot_meet_is_one_error(cluster, root, tmp_path):
    """A job array sbatch refuses (here more CPUs per run than the node has) stops the launch with one line."""
    from engine.cli import UserError
    spec = _spec(tmp_path, "slurm_refused", [1], 1)
    with pytest.raises(UserError, match=r"^sbatch refused the SLURM jobs of slurm_refused: .*More processors"):
        _cli(spec, tmp_path / "out", root, "--cpus-per-run", "512")
    assert set(_plan(spec, tmp_path / "out", root).states().values()) == {"missing"}


def test_scancel_then_relaunch_finishes_without_rerunning(first_table, root):
    spec, out = first_table["spec"], first_table["base"] / "out_cancel"
    plan = _plan(spec, out, root)
    first, second = plan.units                      # --array-parallelism 1: tasks 0 and 1 run one after another
    launcher = _launcher(spec, out, root, "--array-parallelism", "1")
    try:
        _wait_for(lambda: first.state() == "done" and second.state() == "running", 300,
                  "the first unit done and the second running", launcher)
        array = _lock_info(second.steps[0].folder)["job_id"].split("_")[0]
        subprocess.run(["scancel", array], check=True)
        launcher.wait(timeout=180)                  # it learns the task died (from squeue) and stops waiting
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 1
    failures = _report(out, "slurm_synth")["job_failures"]
    assert [(f["job_id"], f["state"]) for f in failures] == [(f"{array}_1", "CANCELLED")]
    assert second.state() != "done"
    finished = {s.folder: os.stat(Path(s.folder) / "results.json").st_mtime_ns for s in first.steps}
    assert _cli(spec, out, root) == 0
    report = _report(out, "slurm_synth")
    assert report["pending"] == 1 and report["skipped_done"] == 1 and len(report["jobs"]) == 1
    assert [o["unit"] for o in report["outcomes"]] == [second.key]
    assert {f: os.stat(Path(f) / "results.json").st_mtime_ns for f in finished} == finished   # not rerun
    assert set(plan.states().values()) == {"done"}
    ref = (first_table["out"] / "tables/slurm_synth/slurm_synth.csv").read_text()
    assert (out / "tables/slurm_synth/slurm_synth.csv").read_text() == ref


@pytest.mark.parametrize("how, epochs", [("submitit_signal", 8), ("scontrol_requeue", 20)])
def test_preempted_task_is_requeued_and_resumes_from_its_checkpoint(cluster, root, tmp_path, how, epochs):
    """``submitit_signal``: the signal SLURM sends before a task's time limit (submitit requeues the task
    itself, at once; with ``--time 10`` submitit counts any signal as a time-out, after which only a
    checkpointable task is requeued); ``scontrol_requeue``: SLURM kills the task (KillWait after the SIGTERM
    submitit ignores, so more epochs) and requeues it, as a preemption in requeue mode does."""
    from submitit.slurm.slurm import SlurmJobEnvironment
    spec = _spec(tmp_path, "slurm_resume", [1], epochs)
    out = tmp_path / "out"
    (unit,) = _plan(spec, out, root).units
    train = Path(unit.steps[0].folder)
    launcher = _launcher(spec, out, root, *(["--time", "10"] if how == "submitit_signal" else []))
    try:
        _wait_for(lambda: glob.glob(str(train / "*" / "checkpoint")) and not (train / "results.json").exists(),
                  300, "the first epoch checkpoint", launcher)
        task = _lock_info(train)["job_id"]
        if how == "submitit_signal":
            subprocess.run(["scancel", f"--signal={SlurmJobEnvironment.USR_SIG}", task], check=True)
        else:
            subprocess.run(["scontrol", "requeue", task], check=True)
        _start_requeued(task)
        launcher.wait(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, launcher.stdout.read()
    report = _report(out, "slurm_resume")
    assert report["jobs"] == [task] and not report["job_failures"]
    assert [o["status"] for o in report["outcomes"]] == ["done"]
    resumed = re.findall(r"epoch (\d+) of (\d+) already done", (train / "log.txt").read_text())
    assert len(resumed) == 1 and 1 <= int(resumed[0][0]) < epochs and int(resumed[0][1]) == epochs
    assert json.loads((train / "results.json").read_text())["results"]["test"]["accuracy"] >= 0
    if how == "submitit_signal":
        err = next((out / "tables/_submitit/slurm_resume").glob(f"{task}/{task}_0_log.err")).read_text()
        assert f"Caught signal SIG{SlurmJobEnvironment.USR_SIG}" in err and "this job is timed-out" in err
        assert "DUE TO JOB REQUEUE" in err and "not requeued" not in err


def test_demo_report_names_the_launcher(tmp_path):
    from tools.demo_report import launch_text
    assert launch_text(tmp_path) is None
    report = tmp_path / "tables" / "demo" / "launch_report.json"
    report.parent.mkdir(parents=True)
    report.write_text(json.dumps({"launcher": "slurm", "pending": 3, "skipped_done": 1, "jobs": ["7_0", "7_1", "7_2"]}))
    assert launch_text(tmp_path).startswith("Runs launched through SLURM: 3 task(s) of job array 7; 3 unit(s)")
    report.write_text(json.dumps({"launcher": "local", "pending": 2, "skipped_done": 0, "jobs": ["11", "12"]}))
    assert launch_text(tmp_path).startswith("Runs launched through submitit's local executor: 2 job(s); 2 unit(s)")


@pytest.mark.parametrize("args, env, message", [
    (["--launcher", "pbs"], {}, "error: --launcher must be local or slurm, got 'pbs'"),
    (["--launcher"], {}, "error: --launcher needs a value (local or slurm)"),
    (["--jobs", "2"], {}, "error: unknown argument '--jobs' (usage: bash scripts/demo.sh [--launcher local|slurm])"),
    (["--launcher", "slurm"], {"SLURM_CONF": "/nonexistent/slurm.conf"},
     "error: --launcher slurm: SLURM_CONF is /nonexistent/slurm.conf, which is not a file"),
    (["--launcher=slurm"], {"SLURM_CONF": "DEAD"},   # a cluster whose controller does not answer
     "error: --launcher slurm: no SLURM cluster answers sinfo; start the local one with: bash scripts/slurm_local.sh up"),
])
def test_demo_launcher_flag_is_checked_before_any_setup(tmp_path, args, env, message):
    """scripts/demo.sh --launcher: a bad value, or slurm with no cluster answering, is one error line (exit 2)
    before the demo creates anything."""
    if env.get("SLURM_CONF") == "DEAD":
        if not shutil.which("sinfo"):
            _unavailable("slurm-wlm is not installed (sinfo)")
        env["SLURM_CONF"] = str(tmp_path / "dead.conf")
        Path(env["SLURM_CONF"]).write_text("ClusterName=dead\nSlurmctldHost=localhost\nSlurmctldPort=9\n"
                                           "AuthType=auth/none\nNodeName=x CPUs=1\nPartitionName=p Nodes=x\n")
    env = {**os.environ, "DEMO_OUTPUT": str(tmp_path / "demo"), **env}
    out = subprocess.run(["bash", str(REPO / "scripts/demo.sh"), *args], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [message], out.stderr
    assert not (tmp_path / "demo").exists()
