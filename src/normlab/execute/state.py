"""Where each run of a study folder stands: done, diverged, failed, running (where), queued,
unfinished or to run. Read from the store, the leases and (for SLURM) the queue.

Cost: one stat per run and lease, and one `squeue` call when the study was submitted to SLURM.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from normlab.execute.slurm import squeue_states, submitted_jobs
from normlab.runs.lease import current_owner
from normlab.runs.store import read_result

STATE_ORDER = ("done", "diverged", "failed", "running", "queued", "unfinished", "to run")
WITH_RESULT = ("done", "diverged", "failed")  # the states of a run that has its result.json


@dataclass(frozen=True)
class RunState:
    """One run's state (one of STATE_ORDER) and, for a running run, where it runs."""

    kind: str
    where: str = ""

    def __post_init__(self) -> None:
        if self.kind not in STATE_ORDER:
            raise ValueError(f"unknown run state {self.kind!r}; known: {STATE_ORDER}")

    def __str__(self) -> str:
        return f"{self.kind} ({self.where})" if self.where else self.kind


def run_states(out_dir: str | Path, run_ids: list[str]) -> dict[str, RunState]:
    """run_id -> its state, for every run of `run_ids` whatever stage it is at.

    A live lease means running (on its host), whether or not the folder exists yet; then a
    result.json gives done, diverged or failed; then the SLURM queue gives running (on its
    node) or queued; then a folder without result is unfinished (interrupted, or its writer
    died), and no folder at all is to run.
    """
    out_dir = Path(out_dir)
    jobs = submitted_jobs(out_dir)
    queue = squeue_states() if jobs else None
    states = {}
    for run_id in run_ids:
        run_dir = out_dir / "runs" / run_id
        owner = current_owner(out_dir, run_id)
        job = (queue or {}).get(jobs.get(run_id, ""))
        if owner is not None:
            states[run_id] = RunState("running", owner.host)
        elif (run_dir / "result.json").exists():
            status = read_result(run_dir / "result.json").status
            states[run_id] = RunState("done" if status == "completed" else status)
        elif job is not None and job[0] == "RUNNING":
            states[run_id] = RunState("running", job[1])
        elif job is not None:
            states[run_id] = RunState("queued")
        else:
            states[run_id] = RunState("unfinished" if run_dir.exists() else "to run")
    return states


def without_result(states: dict[str, RunState]) -> dict[str, RunState]:
    """The runs of `states` that have no result (yet): running, queued, unfinished, to run."""
    return {run_id: state for run_id, state in states.items()
            if state.kind not in WITH_RESULT}


def states_summary(states: dict[str, RunState]) -> str:
    """One line of counts per state (of `run_states`), then one line per run that is running
    or queued."""
    counts = {kind: sum(s.kind == kind for s in states.values()) for kind in STATE_ORDER}
    lines = ["runs: " + ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)]
    lines += [f"  {run_id[:12]}  {state}" for run_id, state in states.items()
              if state.kind in ("running", "queued")]
    return "\n".join(lines)
