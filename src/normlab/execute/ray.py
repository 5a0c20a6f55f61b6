"""`--executor ray`: one Ray task per run, on an existing cluster or a local one.

Each task runs one spec with `execute_run` (so it claims the run's lease first) and asks Ray for
its share of a GPU (`gpus_per_run`, fractions allowed) and CPUs. A task whose worker process or
node is lost is retried by Ray (`max_retries`); the retry takes over the lost worker's lease
(at once on the same host, after the stale time elsewhere) and resumes the run from its
checkpoint. A diverged run returns normally; only a crash of the task itself surfaces as an
error, which is reported and leaves the run to the next `normlab run`.
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.execute.base import Executor
from normlab.runs.live import LiveLog
from normlab.runs.result import RunResult
from normlab.runs.spec import RunSpec
from normlab.runs.tasks import ProgressFn, execute_run, get_task
from normlab.utils.config import ConfigError, interval_problem
from normlab.utils.optional import import_extra

ENV_PREFIX = "NORMLAB_"
ADDRESS_TIMEOUT_S = 5.0  # how long the plan check waits for a Ray cluster to accept a connection


@dataclass(frozen=True)
class RayResources:
    """Where the tasks go and what each asks for."""

    address: str | None = None  # None: start a local Ray instance
    gpus_per_run: float = 0.0
    cpus_per_run: float = 1.0
    max_retries: int = 3

    def __post_init__(self) -> None:
        problems = [p for p in (
            interval_problem("ray gpus_per_run", self.gpus_per_run, 0.0, low_open=False),
            interval_problem("ray cpus_per_run", self.cpus_per_run, 0.0, low_open=False),
            interval_problem("ray max_retries", self.max_retries, 0, kind=int,
                             low_open=False),
        ) if p]
        if problems:
            raise ConfigError(problems)


def _run_in_ray(spec: RunSpec, out_dir: str, task_modules: Sequence[str],
                environment: Mapping[str, str], live: LiveLog | None) -> RunResult | None:
    os.environ.update(environment)
    for module in task_modules:
        importlib.import_module(module)
    result = execute_run(spec, out_dir, live=live)
    if live is not None:
        live.wait()
    return result


class RayExecutor(Executor):
    """Submits one Ray task per spec and yields each result as its task ends."""

    def __init__(self, resources: RayResources | None = None) -> None:
        self.resources = resources or RayResources()

    def run(self, specs: Sequence[RunSpec], out_dir: Path,
            on_progress: ProgressFn | None = None, live: LiveLog | None = None
            ) -> Iterator[tuple[RunSpec, RunResult | None]]:
        if not specs:
            return
        ray = import_ray()
        environment = {k: v for k, v in os.environ.items()
                       if k.startswith(ENV_PREFIX) or k == "PYTHONPATH"}
        if not ray.is_initialized():
            ray.init(address=self.resources.address, runtime_env={"env_vars": environment},
                     log_to_driver=False)
        task = ray.remote(num_gpus=self.resources.gpus_per_run,
                          num_cpus=self.resources.cpus_per_run,
                          max_retries=self.resources.max_retries)(_run_in_ray)
        modules = sorted({get_task(spec.task).__module__ for spec in specs})
        pending = {task.remote(spec, str(out_dir), modules, environment,
                                   live): spec for spec in specs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                spec = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as err:
                    print(f"normlab: run {spec.run_id} was lost by Ray after "
                          f"{self.resources.max_retries} retries ({type(err).__name__}); run "
                          f"the same command again to resume it.", file=sys.stderr)
                    continue
                yield spec, result


def address_problem(address: str | None, timeout_s: float = ADDRESS_TIMEOUT_S) -> str | None:
    """Why `--ray-address` cannot be used, checked before any run: not `host:port` or
    `ray://host:port`, or nothing accepts a TCP connection there within `timeout_s` (a Ray
    cluster that is down would otherwise hang `ray.init` for minutes after study.json is
    written). None for no address or "auto" (Ray then starts or finds a local instance itself).
    Cost: one connection attempt."""
    if address is None or address == "auto":
        return None
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not host or not port.isdigit():
        return (f"The '--ray-address' setting must be host:port, ray://host:port or 'auto'; "
                f"got {address!r}.")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except OSError as err:
        reason = err.strerror or type(err).__name__
        return (f"No Ray cluster answers at '--ray-address' {address!r} within {timeout_s:g} s "
                f"({reason}): start one (`ray start --head`) or check the address.")


def import_ray() -> Any:
    return import_extra("ray", "ray")
