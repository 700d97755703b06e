"""SLURM job state for the table launcher without ``sacct``.

submitit learns whether a SLURM job ended from ``sacct``, which needs the accounting daemon (slurmdbd); clusters
without one (scripts/slurm_local.sh's, many small ones) answer "accounting storage is disabled", and a job that
died without writing its result (cancelled, killed, out of memory) then stays "UNKNOWN" forever and
``job.result()`` never returns. Here the state comes from ``squeue --states=all``, which the controller answers
from memory: a job it lists is in the state it shows; a job it no longer knows ended more than ``MinJobAge``
ago. Jobs that wrote their result are still recognised by their result file first, as submitit does.
"""
import subprocess
import time
from pathlib import Path

from submitit.core import logger
from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

# States after which a job neither runs nor runs again (a requeued or preempted job goes back to PENDING).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                "OUT_OF_MEMORY"}
GONE = "GONE"   # no longer known to the controller: it ended (MinJobAge ago)


def squeue_states(main_ids):
    """{"<job>" or "<job>_<task>": state} for the given job ids, from squeue (array tasks one by one);
    a queried job squeue does not know maps to ``GONE``. None when squeue itself failed."""
    ids = sorted({str(i) for i in main_ids})
    if not ids:
        return {}
    cmd = ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T", "--jobs=" + ",".join(ids)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        logger.get_logger().warning(f"squeue failed ({err}); job states may be stale")
        return None
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:   # every queried job purged: rc 1
        logger.get_logger().warning(f"squeue failed: {proc.stderr.strip()}; job states may be stale")
        return None
    states = {}
    for line in proc.stdout.splitlines():
        job_id, _, state = line.strip().partition("|")
        if job_id:
            states[job_id] = state.strip().split()[0] if state.strip() else "UNKNOWN"
    listed = {j.split("_")[0] for j in states}
    states.update({i: GONE for i in ids if i not in listed})
    return states


class SqueueWatcher(SlurmInfoWatcher):
    """submitit's shared job-state poller, reading ``squeue`` instead of ``sacct``."""

    def update(self):
        pending = self._registered - self._finished
        if not pending:
            return
        self._num_calls += 1
        states = squeue_states({j.split("_")[0] for j in pending})
        if states is not None:
            for job_id in pending:
                # missing: purged (squeue --array lists every task of an array it still knows, pending ones too)
                self._info_dict[job_id] = {"JobID": job_id, "State": states.get(job_id, GONE)}
        self._last_status_check = time.time()
        for job_id in pending:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)

    def is_done(self, job_id, mode="standard"):
        state = self.get_state(job_id, mode=mode).upper()
        return state == GONE or state in FINAL_STATES


class SqueueSlurmJob(SlurmJob):
    watcher = SqueueWatcher(delay_s=15)   # at most this long between two squeue calls


def track(jobs, folder, submitted_at):
    """The submitted jobs as ``SqueueSlurmJob`` (same id and folder). A result file older than the submission
    belongs to an earlier job that had the same id (ids restart when a cluster's state is wiped) and is
    removed, so it is not taken for this job's result."""
    tracked = []
    for job in jobs:
        new = SqueueSlurmJob(folder=folder, job_id=job.job_id)
        result = Path(new.paths.result_pickle)
        if result.exists() and result.stat().st_mtime < submitted_at:
            result.unlink()
        tracked.append(new)
    return tracked
