"""`--executor slurm`: a study's runs as one SLURM array job, through submitit.

Each array task runs one spec with `execute_run` (so it claims the run's lease first, and a
run done or held elsewhere is skipped). Resources come from `SlurmResources` (flags, or a
small JSON file with the same names). submitit writes one log per array task, i.e. per run,
under `<out>/slurm/`. On preemption or time-out submitit signals the task; `SlurmRun`
releases the run's lease and asks to be requeued, and the requeued task resumes the run from
its checkpoint (train/checkpoint.py).

The submitting process waits for the array: a run is over when submitit's result file for its
task exists; a task that leaves the queue without one (cancelled, node lost) is reported as
lost, and running the same command again resumes it. `<out>/slurm/submitted.json` maps each
run to its last SLURM job id, for `normlab show`.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from normlab.execute.base import Executor
from normlab.runs.lease import release_held_leases
from normlab.runs.live import LiveLog
from normlab.runs.result import RunResult
from normlab.runs.spec import RunSpec
from normlab.runs.tasks import ProgressFn, execute_run, get_task
from normlab.utils.atomic import atomic_write_json
from normlab.utils.config import ConfigError, interval_problem
from normlab.utils.optional import import_extra

SLURM_DIR = "slurm"
SUBMITTED_FILE = "submitted.json"
ENV_PREFIX = "NORMLAB_"


@dataclass(frozen=True)
class SlurmResources:
    """What one array task (one run) asks SLURM for."""

    partition: str | None = None
    gpus_per_task: int = 0
    cpus_per_task: int = 1
    mem_gb: float | None = None
    time_min: int = 60
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    array_parallelism: int = 256

    def __post_init__(self) -> None:
        problems = [p for p in (
            interval_problem("slurm gpus_per_task", self.gpus_per_task, 0, kind=int,
                             low_open=False),
            interval_problem("slurm cpus_per_task", self.cpus_per_task, 1, kind=int,
                             low_open=False),
            self.mem_gb is not None and interval_problem("slurm mem_gb", self.mem_gb, 0.0),
            interval_problem("slurm time_min", self.time_min, 1, kind=int, low_open=False),
            interval_problem("slurm array_parallelism", self.array_parallelism, 1, kind=int,
                             low_open=False),
        ) if p]
        for name in ("partition", "account", "qos", "constraint"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                problems.append(f"The 'slurm {name}' setting must be a non-empty string; "
                                f"got {value!r}.")
        if problems:
            raise ConfigError(problems)

    @classmethod
    def from_settings(cls, config: str | Path | None = None,
                      overrides: Mapping[str, Any] | None = None) -> SlurmResources:
        """The defaults, then the JSON file `config`, then `overrides` (None values skipped)."""
        values: dict[str, Any] = {}
        if config is not None:
            try:
                values = json.loads(Path(config).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as err:
                raise ConfigError(f"The '--slurm-config' setting must name a readable JSON "
                                  f"file; got {str(config)!r} ({err}).") from err
            allowed = [f.name for f in fields(cls)]
            unknown = [key for key in values if key not in allowed]
            if unknown:
                raise ConfigError([f"The SLURM setting {key!r} in {config} is unknown; "
                                   f"allowed: {', '.join(allowed)}." for key in unknown])
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return replace(cls(), **values)

    def submitit_parameters(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "partition": self.partition, "cpus_per_task": self.cpus_per_task,
            "time": self.time_min, "account": self.account, "qos": self.qos,
            "constraint": self.constraint, "array_parallelism": self.array_parallelism,
            "mem": f"{self.mem_gb}GB" if self.mem_gb is not None else None,
            "gpus_per_task": self.gpus_per_task or None,
        }
        return {k: v for k, v in params.items() if v is not None}


class SlurmRun:
    """What each array task calls: one spec into the store; checkpointable for submitit."""

    def __init__(self, out_dir: Path, task_modules: Sequence[str],
                 environment: Mapping[str, str], live: LiveLog | None = None) -> None:
        self.out_dir = str(out_dir)
        self.task_modules = list(task_modules)
        self.environment = dict(environment)
        self.live = live

    def __call__(self, spec: RunSpec) -> RunResult | None:
        os.environ.update(self.environment)
        for module in self.task_modules:
            importlib.import_module(module)
        result = execute_run(spec, self.out_dir, live=self.live)
        if self.live is not None:
            self.live.wait()
        return result

    def checkpoint(self, spec: RunSpec) -> Any:
        """On preemption or time-out: free the run for the requeued task, which resumes it."""
        import submitit

        release_held_leases()
        return submitit.helpers.DelayedSubmission(self, spec)

    __submitit_checkpoint__ = checkpoint


class SlurmExecutor(Executor):
    """Submits the specs as one array job and yields each run's result as its task ends."""

    def __init__(self, resources: SlurmResources | None = None, poll_s: float = 5.0,
                 job_name: str = "normlab") -> None:
        self.resources = resources or SlurmResources()
        self.poll_s = poll_s
        self.job_name = job_name

    def run(self, specs: Sequence[RunSpec], out_dir: Path,
            on_progress: ProgressFn | None = None, live: LiveLog | None = None
            ) -> Iterator[tuple[RunSpec, RunResult | None]]:
        if not specs:
            return
        submitit = import_submitit()
        out_dir = Path(out_dir)
        executor = submitit.SlurmExecutor(folder=out_dir / SLURM_DIR / "%j")
        executor.update_parameters(job_name=self.job_name, **self.resources.submitit_parameters())
        modules = sorted({get_task(spec.task).__module__ for spec in specs})
        environment = {k: v for k, v in os.environ.items()
                       if k.startswith(ENV_PREFIX) or k == "PYTHONPATH"}
        jobs = executor.map_array(SlurmRun(out_dir, modules, environment, live), list(specs))
        record_submission(out_dir, {spec.run_id: job.job_id
                                    for spec, job in zip(specs, jobs, strict=True)})
        print(f"normlab: submitted {len(jobs)} runs as SLURM array job "
              f"{jobs[0].job_id.split('_')[0]}; logs in {out_dir / SLURM_DIR}", file=sys.stderr)
        yield from self._wait(list(zip(specs, jobs, strict=True)))

    def _wait(self, submitted: list[tuple[RunSpec, Any]]
              ) -> Iterator[tuple[RunSpec, RunResult | None]]:
        remaining = {job.job_id: (spec, job) for spec, job in submitted}
        absent_before: set[str] = set()
        while remaining:
            queued = squeue_states()  # before the result files: a task ending meanwhile is seen
            absent: set[str] = set()
            for job_id, (spec, job) in list(remaining.items()):
                if job.paths.result_pickle.exists():
                    del remaining[job_id]
                    try:
                        result = job.result()
                    except Exception as err:  # the task itself failed (not the run)
                        print(f"normlab: run {spec.run_id} (SLURM job {job_id}) ended with an "
                              f"error: {err}", file=sys.stderr)
                        continue
                    yield spec, result
                elif queued is not None and job_id not in queued:
                    absent.add(job_id)
                    if job_id in absent_before:  # gone from the queue on two polls in a row
                        del remaining[job_id]
                        print(f"normlab: run {spec.run_id} (SLURM job {job_id}) left the queue "
                              f"without a result (cancelled or lost); run the same command "
                              f"again to resume it.", file=sys.stderr)
            absent_before = absent
            if remaining:
                time.sleep(self.poll_s)


def import_submitit() -> Any:
    return import_extra("submitit", "slurm")


def record_submission(out_dir: Path, job_ids: Mapping[str, str]) -> None:
    """Add run -> SLURM job id entries to `<out>/slurm/submitted.json`."""
    path = out_dir / SLURM_DIR / SUBMITTED_FILE
    known = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    atomic_write_json(path, {**known, **job_ids})


def submitted_jobs(out_dir: Path) -> dict[str, str]:
    path = Path(out_dir) / SLURM_DIR / SUBMITTED_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def squeue_states() -> dict[str, tuple[str, str]] | None:
    """job id ("123_4" for array tasks) -> (state, nodes) of this user's queued and running
    jobs; None when squeue cannot be asked."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-u", str(os.getuid()), "-o", "%i|%T|%N"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    states = {}
    for line in out.splitlines():
        job_id, state, nodes = [*line.split("|"), "", ""][:3]
        states[job_id.strip()] = (state.strip(), nodes.strip())
    return states
