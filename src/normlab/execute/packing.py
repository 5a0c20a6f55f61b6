"""Which runs can be trained together as one computation (a "pack"), and how many at a time.

A pack is K "train" runs that share everything that fixes the shape of the computation (the
architecture with its norm and norm options, the data set, the batch size, the step budget, the
device and the numeric settings) and differ in anything a sweep varies: lr, schedule (with its
milestones, decay, warm-up and options), momentum, Nesterov, weight decay, init and its gain,
seed, update projection, probes, divergence threshold, logging interval and group label.
Of the task options they share those that set the float numerics (`deterministic`, `tf32`).
`normlab.train.packed.train_packed` trains such a pack; each member is the same function as
when trained alone.

`normlab.train.packable.pack_key(spec)` is that compatibility key (None for a spec that is never
packed: another task, `compile` or `channels_last`). `pack_specs(specs, k)` groups a plan into
packs of at most k in plan order. How large K should be by default is
`normlab.execute.throughput.default_pack`, read off the measured throughput table.
Cost: pure Python over the specs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from normlab.runs.live import LiveLog
from normlab.runs.result import RunResult
from normlab.runs.spec import RunSpec
from normlab.runs.tasks import ProgressFn, execute_run
from normlab.train.packable import pack_key
from normlab.train.packed import execute_pack
from normlab.utils.config import check_interval


def pack_specs(specs: Sequence[RunSpec], k: int) -> list[list[RunSpec]]:
    """`specs` grouped into packs of at most `k` compatible runs, in plan order.

    A pack is listed where its first member stands in the plan; a spec that cannot be packed is a
    pack of one. With k = 1 every spec is its own pack.
    """
    check_interval("pack", k, 1, kind=int, low_open=False)
    packs: list[list[RunSpec]] = []
    open_pack: dict[tuple[Any, ...], list[RunSpec]] = {}
    for spec in specs:
        key = pack_key(spec) if k > 1 else None
        pack = open_pack.get(key) if key is not None else None
        if pack is None or len(pack) >= k:
            pack = [spec]
            packs.append(pack)
            if key is not None:
                open_pack[key] = pack
        else:
            pack.append(spec)
    return packs


def execute_group(specs: Sequence[RunSpec], out_dir: str | Path,
                  on_progress: ProgressFn | None = None,
                  live: LiveLog | None = None) -> list[RunResult | None]:
    """A group from `pack_specs` into the store at `out_dir`: one spec runs alone
    (`execute_run`), several as a pack (`normlab.train.packed.execute_pack`); with `live`,
    the runs stream to a tracking tool (normlab.runs.live)."""
    if len(specs) == 1:
        return [execute_run(specs[0], out_dir, on_progress, live)]
    return execute_pack(specs, out_dir, on_progress, live)
