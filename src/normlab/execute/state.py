"""Where each run of a study folder stands: done, diverged, failed, running (where), queued,
unfinished or to run. Read from the store, the leases and (for SLURM) the queue.

Cost: one stat per run and lease, and one `squeue` call when the study was submitted to SLURM.
"""

from __future__ import annotations

from pathlib import Path

from normlab.execute.slurm import squeue_states, submitted_jobs
from normlab.runs.lease import current_owner
from normlab.runs.store import read_result

STATE_ORDER = ("done", "diverged", "failed", "running", "queued", "unfinished", "to run")


def run_states(out_dir: str | Path, run_ids: list[str]) -> dict[str, str]:
    """run_id -> its state; "running (HOST)" names where a running run is."""
    out_dir = Path(out_dir)
    jobs = submitted_jobs(out_dir)
    queue = squeue_states() if jobs else None
    states = {}
    for run_id in run_ids:
        run_dir = out_dir / "runs" / run_id
        owner = current_owner(out_dir, run_id)
        job = (queue or {}).get(jobs.get(run_id, ""))
        if (run_dir / "result.json").exists() and owner is None:
            status = read_result(run_dir / "result.json").status
            states[run_id] = "done" if status == "completed" else status
        elif owner is not None:
            states[run_id] = f"running ({owner.host})"
        elif job is not None and job[0] == "RUNNING":
            states[run_id] = f"running ({job[1]})"
        elif job is not None:
            states[run_id] = "queued"
        else:
            states[run_id] = "unfinished" if run_dir.exists() else "to run"
    return states


def states_summary(out_dir: str | Path, run_ids: list[str]) -> str:
    """One line of counts per state, then one line per run that is running or queued."""
    states = run_states(out_dir, run_ids)
    counts = {state: 0 for state in STATE_ORDER}
    for state in states.values():
        counts[state.split(" ")[0]] += 1
    lines = ["runs: " + ", ".join(f"{n} {state}" for state, n in counts.items() if n)]
    lines += [f"  {run_id[:12]}  {state}" for run_id, state in states.items()
              if state.startswith(("running", "queued"))]
    return "\n".join(lines)
