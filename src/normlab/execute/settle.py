"""`run_until_settled`: run a plan's runs through an executor, and wait for (or take over) the
runs other writers hold, until every run of the plan has its result."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from normlab.execute.base import Executor
from normlab.execute.progress import ProgressReporter
from normlab.runs.lease import current_owner, lease_timing
from normlab.runs.live import LiveLog
from normlab.runs.spec import RunSpec
from normlab.runs.store import RunStore


def run_until_settled(executor: Executor, specs: Sequence[RunSpec], store: RunStore,
                      progress: ProgressReporter, poll_s: float | None = None,
                      live: LiveLog | None = None) -> None:
    """Run `specs` through `executor`, then wait for (or take over) those other writers hold.

    Only runs nobody holds are handed to the executor. A run this process executed is not
    tried again in this call, whatever its status. A run another writer holds is settled once
    it has a result.json and no live lease; if its writer dies, the lease goes stale and this
    process runs it. Waiting is reported on stderr.
    """
    heartbeat_s, _ = lease_timing()
    poll_s = heartbeat_s if poll_s is None else poll_s
    todo, done, total, told = list(specs), 0, len(specs), ""
    while todo:
        free = [s for s in todo if current_owner(store.root, s.run_id) is None]
        elsewhere = [s for s in todo if s not in free]
        # `live` only when given: an executor written before it existed still works without
        for spec, result in executor.run(free, store.root, progress.run_progress,
                                         **({"live": live} if live is not None else {})):
            if result is None:
                elsewhere.append(spec)
            else:
                done += 1
                progress.run_end(spec, result, done, total)
        todo = [s for s in elsewhere if not _settled(store, s)]
        total -= len(elsewhere) - len(todo)
        if todo:
            owners = sorted({o.describe() for s in todo
                             if (o := current_owner(store.root, s.run_id)) is not None})
            message = (f"normlab: waiting for {len(todo)} run(s) claimed by other writers"
                       + (f" ({', '.join(owners)})" if owners else "") + "; a writer that "
                       "stops renewing its lease is taken over.")
            if message != told:
                print(message, file=sys.stderr, flush=True)
                told = message
            time.sleep(poll_s)


def _settled(store: RunStore, spec: RunSpec) -> bool:
    if store.is_done(spec):
        return True
    return (store.run_dir(spec) / "result.json").exists() \
        and current_owner(store.root, spec.run_id) is None
