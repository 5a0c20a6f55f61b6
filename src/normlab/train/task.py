"""The "train" task: how every executor trains one run (normlab.runs.tasks.execute_run).

On a CPU a run that can be packed (`normlab.train.packable.pack_key`) is trained as a pack of
one, by the computation that trains it in a pack of any size, so that its numbers do not depend
on the pack size it was planned with nor on the executor (normlab.train.invariance). The plain
loop (`normlab.train.train`) trains a run that cannot be packed (`compile`, `channels_last`),
every lone run on a GPU, and a run whose folder holds a checkpoint the plain loop wrote, so that
a resumed run stays bit for bit the run it was. Cost: that of the run.
"""

from __future__ import annotations

from normlab.runs.result import RunResult
from normlab.runs.spec import RunSpec
from normlab.runs.tasks import RunContext, register_task
from normlab.train.build import resolve_device
from normlab.train.checkpoint import checkpoint_step
from normlab.train.invariance import alone_as_pack
from normlab.train.loop import train
from normlab.train.packable import pack_key
from normlab.train.packed import PLAIN_LOOP_HINT, train_packed


@register_task("train")
def train_task(spec: RunSpec, context: RunContext) -> RunResult:
    """Train `spec` (its probes as callbacks) into `context`: as a pack of one on a CPU where
    it can be packed, else by the plain loop (see the module docstring)."""
    if (pack_key(spec) is None or not alone_as_pack(resolve_device(spec.device))
            or _plain_checkpoint(context)):
        return train(spec, context=context)
    try:
        return train_packed([spec], contexts=[context])[0]
    except Exception as err:  # recorded by the caller as a failed run, with this hint
        raise RuntimeError(f"{type(err).__name__}: {err} ({PLAIN_LOOP_HINT})") from err


def _plain_checkpoint(context: RunContext) -> bool:
    """Whether the run's folder holds a checkpoint that the plain loop wrote."""
    if context.run_dir is None:
        return False
    point = checkpoint_step(context.run_dir)
    return point is not None and not point[1]
