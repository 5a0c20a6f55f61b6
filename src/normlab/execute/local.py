"""`LocalExecutor`: the runs of a plan in this process, or in a pool of worker processes
(spread over the GPUs when there are GPUs); with `pack=K` it trains up to K compatible runs as
one computation (`normlab.execute.packing`)."""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from normlab.execute.base import Executor
from normlab.execute.packing import execute_group, pack_specs
from normlab.execute.pool import die_with_parent, stopped_on_error
from normlab.runs.live import LiveLog
from normlab.runs.result import RunResult
from normlab.runs.spec import RunSpec
from normlab.runs.tasks import ProgressFn, get_task


class LocalExecutor(Executor):
    """In-process (workers=1) or a process pool.

    With `devices` (e.g. ["cuda:0", "cuda:1"]) each worker process is pinned to one of them: specs
    whose device is "auto" are sent to the worker's device. Progress within a run is reported only
    in-process.
    """

    def __init__(self, workers: int = 1, devices: Sequence[str] | None = None,
                 pack: int = 1) -> None:
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"The 'workers' setting must be an int >= 1; got {workers!r}.")
        self.workers = workers
        self.devices = list(devices) if devices else None
        self.pack = pack  # runs trained together as one computation (normlab.execute.packing)

    def run(self, specs: Sequence[RunSpec], out_dir: Path,
            on_progress: ProgressFn | None = None, live: LiveLog | None = None
            ) -> Iterator[tuple[RunSpec, RunResult | None]]:
        groups = pack_specs(specs, self.pack)  # one spec each when pack == 1
        if self.workers == 1:
            for group in groups:
                yield from zip(group, execute_group(group, out_dir, on_progress, live),
                                     strict=True)
            return
        ctx = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=die_with_parent,
                                         initargs=(os.getpid(),)) as pool, stopped_on_error(pool):
            pending = {}
            for i, group in enumerate(groups):
                device = None
                if self.devices and group[0].device == "auto":
                    device = self.devices[i % len(self.devices)]
                task_module = get_task(group[0].task).__module__
                pending[pool.submit(_execute_on, group, str(out_dir), device, task_module,
                                      live)] = group
            for done in futures.as_completed(pending):
                yield from zip(pending[done], done.result(), strict=True)


def _execute_on(group: list[RunSpec], out_dir: str, device: str | None,
                task_module: str, live: LiveLog | None) -> list[RunResult | None]:
    """Run a group of specs (one, or a pack) in a worker, with "auto" meaning `device` when one
    is given (None for a run another writer holds).

    The module defining the task is imported first, so that tasks registered outside normlab
    (a user's script, a test) are known in the worker too.
    """
    import importlib

    importlib.import_module(task_module)
    if device is not None:
        os.environ["NORMLAB_DEVICE"] = device
    return execute_group(group, out_dir, live=live)
