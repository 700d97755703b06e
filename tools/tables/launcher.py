"""Launch the unfinished units of a plan through submitit (local executor or SLURM).

Local: N jobs ("lanes"), one per GPU when GPUs are visible (``CUDA_VISIBLE_DEVICES`` per job, set by
submitit), each given every pending unit (starting at a different offset). A lane takes a unit's step by
locking ``<run folder>/.table.lock`` (``flock``, released by the kernel when the process dies), so a run is
never executed twice at once, and a killed job's run is free for the next launch. SLURM: one array task per
unit (``--array-parallelism`` at a time), same locking; a preempted or timed-out task is requeued and resumes
(``SlurmLane``), and job states come from squeue, not sacct (tools/tables/slurm_jobs.py). Each step is
``engine.runs.main(argv)`` in the job's process (the run API's step, the same the per-method scripts run); its
log is ``log.txt`` in its run folder; a failure writes ``table_error.log`` next to it and does not stop the
other units.
"""
import contextlib
import datetime
import io
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

from engine.cli import UserError
from engine.runs import finished, release, try_lock
from tools.tables.spec import REPO

ERROR_LOG = "table_error.log"
DEFAULT_TIMEOUT_MIN = 7 * 24 * 60


def _job_info():
    try:
        import submitit
        env = submitit.JobEnvironment()
        return {"job_id": env.job_id, "job_log": str(env.paths.stderr)}
    except Exception:  # not inside a submitit job (tests call run_lane directly)
        return {"job_id": "", "job_log": ""}


class _Tee(io.TextIOBase):
    """stderr that still goes where it went, and is also kept (to find train.py's ``error:`` line)."""

    def __init__(self, stream):
        self.stream, self.kept = stream, io.StringIO()

    def write(self, text):
        self.kept.write(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


def error_line(text):
    """The last ``error: ...`` line a step printed (engine.cli's one-line errors), or ''."""
    lines = [l.strip() for l in text.splitlines() if l.strip().startswith("error:")]
    return lines[-1] if lines else ""


def run_step(step, info):
    """Run one step (train.py's arguments) in this process; returns (ok, message). A failure's message is the
    step's ``error:`` line (the reason), or the last line of a crash's traceback."""
    import datasets  # noqa: F401  (registers the datasets; the repository root is on sys.path: PYTHONPATH)
    import trainers  # noqa: F401  (registers the trainers)
    from engine.runs import main
    tee = _Tee(sys.stderr)
    try:
        with contextlib.redirect_stderr(tee):
            rc = main(list(step["argv"]))
        if rc == 0 and finished(step["folder"]):
            return True, ""
        reason = error_line(tee.kept.getvalue())
        message = f"train.py exited with code {rc}" + (f": {reason}" if reason else "")
    except Exception:  # a crash of one run must not stop the lane
        message = traceback.format_exc()
    os.makedirs(step["folder"], exist_ok=True)
    with open(os.path.join(step["folder"], ERROR_LOG), "a") as f:
        f.write(f"[{datetime.datetime.now().isoformat(timespec='seconds')}] job {info['job_id']} "
                f"pid {os.getpid()} on {socket.gethostname()}\n{message}\njob log: {info['job_log']}\n")
    return False, message.strip().splitlines()[-1] if message.strip() else "failed"


def run_unit(unit, lane):
    """Run the unfinished steps of one unit (a training run then its evaluations)."""
    info = _job_info()
    for step in unit["steps"]:
        if finished(step["folder"]):
            continue
        fd = try_lock(step["folder"])
        if fd is None:
            return {"unit": unit["key"], "status": "busy", "folder": step["folder"], "lane": lane, "pid": os.getpid()}
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "lane": lane,
                                     "job_id": info["job_id"], "job_log": info["job_log"],
                                     "started": time.time()}).encode())
            if finished(step["folder"]):  # finished while we waited
                continue
            ok, message = run_step(step, info)
        finally:
            release(fd)
        if not ok:
            return {"unit": unit["key"], "status": "failed", "folder": step["folder"], "lane": lane,
                    "pid": os.getpid(), "message": message,
                    "log": os.path.join(step["folder"], "log.txt"),
                    "error_log": os.path.join(step["folder"], ERROR_LOG), "job_log": info["job_log"]}
    return {"unit": unit["key"], "status": "done", "lane": lane, "pid": os.getpid()}


def run_lane(units, lane):
    """A job's body: every given unit in order (a failed or busy unit does not stop the others). In a SLURM job
    torch uses the CPUs the job was given (SLURM_CPUS_PER_TASK) unless OMP_NUM_THREADS says otherwise: where
    the cluster does not pin tasks to CPUs, torch would start one thread per core of the node in every job."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if cpus.isdigit() and int(cpus) > 0 and "OMP_NUM_THREADS" not in os.environ:
        import torch
        torch.set_num_threads(int(cpus))
    return [run_unit(u, lane) for u in units]


class SlurmLane:
    """``run_lane`` as a submitit Checkpointable: a SLURM task that is preempted or reaches its time limit gets
    submitit's signal, is requeued with the same units, and its runs resume from their last epoch checkpoint
    (run state lives in the run folders, so resubmitting the same call is the checkpoint)."""

    def __call__(self, units, lane):
        return run_lane(units, lane)

    def checkpoint(self, units, lane):
        import submitit
        return submitit.helpers.DelayedSubmission(self, units, lane)


def unit_payload(unit):
    return {"key": unit.key, "steps": [{"folder": s.folder, "argv": list(s.argv)} for s in unit.steps]}


def visible_gpus():
    """GPU ids for the local executor: CUDA_VISIBLE_DEVICES when set, else nvidia-smi's list, else []."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [int(x) for x in env.split(",") if x.strip().isdigit()]
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return list(range(sum(1 for line in out.splitlines() if line.startswith("GPU "))))
    return []


def slurm_parameters(opts, name):
    """submitit parameters of a SLURM launch (``opts``: partition, gpus_per_run, time_min, cpus_per_run,
    array_parallelism, mem_gb, account, qos)."""
    params = {"slurm_job_name": f"table-{name}", "timeout_min": int(opts.get("time_min") or DEFAULT_TIMEOUT_MIN),
              "gpus_per_node": int(opts.get("gpus_per_run", 1)), "tasks_per_node": 1, "nodes": 1,
              "cpus_per_task": int(opts.get("cpus_per_run", 8)),
              "slurm_array_parallelism": int(opts.get("array_parallelism", 64)),
              "slurm_setup": [f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}"]}
    if opts.get("partition"):
        params["slurm_partition"] = opts["partition"]
    if opts.get("mem_gb"):
        params["mem_gb"] = int(opts["mem_gb"])
    extra = {k: opts[k] for k in ("account", "qos") if opts.get(k)}
    if extra:
        params["slurm_additional_parameters"] = extra
    return params


def _result(job):
    """(the lane's outcomes, None) or (None, the exception of a job that died)."""
    try:
        return job.result(), None
    except Exception as err:
        return None, err


def _rotate(items, k):
    return items[k:] + items[:k] if items else items


def launch(plan, launcher="local", jobs=None, slurm=None, wait=True, log=print, poll_s=2.0, rounds=3):
    """Submit every unit of ``plan`` that is neither done nor running; returns a report dict.

    Local launches wait for their jobs and then for units another launch is running; SLURM launches return
    after submission unless ``wait``. A unit that was busy (e.g. a source run shared by Tables 3 and 4 that
    another launch was training) and is still unfinished once free is submitted again (up to ``rounds``).
    """
    import submitit

    if jobs is not None and int(jobs) < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    states = plan.states()
    pending = [u for u in plan.units if states[u.key] not in ("done", "running")]
    elsewhere = [u.key for u in plan.units if states[u.key] == "running"]
    folder = Path(plan.output) / "tables" / "_submitit" / plan.spec.name
    report = {"table": plan.spec.name, "launcher": launcher, "pending": len(pending), "running_elsewhere": elsewhere,
              "skipped_done": sum(1 for v in states.values() if v == "done"), "jobs": [], "outcomes": [],
              "job_failures": []}
    if elsewhere:
        log(f"[launch] {len(elsewhere)} unit(s) already running elsewhere (locked); not started again")
    if not pending:
        log("[launch] nothing to submit")
    else:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        payload = [unit_payload(u) for u in pending]
        if launcher == "local":
            gpus = visible_gpus()
            n = int(max(1, len(gpus)) if jobs is None else jobs)
            n = max(1, min(n, len(payload)))
            executor = submitit.LocalExecutor(folder=folder)
            submitted = []
            for lane in range(n):
                params = {"timeout_min": DEFAULT_TIMEOUT_MIN, "gpus_per_node": 0}
                if gpus:
                    params.update(gpus_per_node=1, visible_gpus=[gpus[lane % len(gpus)]])
                executor.update_parameters(**params)
                submitted.append(executor.submit(run_lane, _rotate(payload, lane * len(payload) // n), lane))
            log(f"[launch] {len(payload)} unit(s) on {n} local job(s)" + (f", GPUs {gpus[:n]}" if gpus else ", CPU"))
        elif launcher == "slurm":
            from tools.tables.slurm_jobs import track
            executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
            executor.update_parameters(**slurm_parameters(slurm or {}, plan.spec.name))
            submitted_at = time.time()
            try:
                submitted = executor.map_array(SlurmLane(), [[p] for p in payload], list(range(len(payload))))
            except submitit.core.utils.FailedJobError as err:   # sbatch said no: partition, account, resources
                reason = " ".join(str(err).split())
                raise UserError(f"sbatch refused the SLURM jobs of {plan.spec.name}: {reason}") from err
            submitted = track(submitted, executor.folder, submitted_at)   # job state from squeue, not sacct
            log(f"[launch] {len(payload)} unit(s) as a SLURM array (job {submitted[0].job_id.split('_')[0]}); "
                f"logs under {folder}")
        else:
            raise ValueError(f"unknown launcher {launcher!r} (local or slurm)")
        report["jobs"] = [j.job_id for j in submitted]
        if launcher == "slurm" and not wait:
            return report
        try:
            results = [(job, _result(job)) for job in submitted]
        except KeyboardInterrupt:
            if launcher == "local":  # Ctrl-C stops the local runs too (they resume at the next launch)
                for job in submitted:
                    job.cancel(check=False)
                log("[launch] interrupted: local jobs cancelled; relaunch to finish (runs resume from checkpoints)")
            else:
                log(f"[launch] interrupted: the SLURM jobs keep running ({', '.join(report['jobs'])})")
            raise
        for job, (outcome, err) in results:
            if err is None:
                report["outcomes"] += outcome
            else:  # the job itself died (killed, out of memory, ...)
                report["job_failures"].append({"job_id": job.job_id, "error": str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__,
                                               "state": job.state, "job_log": str(job.paths.stderr)})
    # Units run by another launch (or skipped as busy): wait until nobody holds their locks.
    busy = set(elsewhere) | {o["unit"] for o in report["outcomes"] if o["status"] == "busy"}
    by_key = {u.key: u for u in plan.units}
    while wait and any(by_key[k].state() == "running" for k in busy):
        time.sleep(poll_s)
    for o in report["outcomes"]:
        if o["status"] == "failed":
            log(f"[failed] {o['folder']}: {o['message']} (log: {o['log']}; error: {o['error_log']}"
                + (f"; job log: {o['job_log']}" if o.get("job_log") else "") + ")")
    for f in report["job_failures"]:
        log(f"[failed] job {f['job_id']} died ({f['state']}): {f['error']} (job log: {f['job_log']})")
    again = [by_key[k] for k in sorted(busy) if wait and by_key[k].state() != "done"]
    if again and rounds > 1:
        log(f"[launch] {len(again)} unit(s) were busy elsewhere and are still unfinished: submitting them again")
        sub = type(plan)(plan.spec, plan.output, again, plan.members)
        more = launch(sub, launcher, jobs, slurm, wait, log, poll_s, rounds - 1)
        report["jobs"] += more["jobs"]
        report["outcomes"] = [o for o in report["outcomes"] if o["status"] != "busy"] + more["outcomes"]
        report["job_failures"] += more["job_failures"]
    return report
