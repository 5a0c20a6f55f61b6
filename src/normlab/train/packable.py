"""`pack_key`: which "train" runs can be trained together as one computation (a pack).

Members share every setting that fixes the shape of the computation (`SHARED_SETTINGS`) and the
task options that set the float numerics; they may differ in anything a sweep varies
(`MEMBER_SETTINGS`). `normlab.train.packed` trains such a pack, `normlab.execute.packing` groups
a plan into packs. Cost: pure Python over one spec.
"""

from __future__ import annotations

from typing import Any

from normlab.runs.result import NUMERICS_OPTIONS
from normlab.runs.spec import RunSpec

SHARED_SETTINGS = ("task", "data", "data_options", "augment", "model", "depth", "width", "norm",
                   "norm_options", "norm_placement", "batch_size", "epochs", "steps", "device",
                   "channels_last", "compile", "autocast")
MEMBER_SETTINGS = ("lr", "schedule", "milestones", "lr_decay", "warmup", "momentum", "nesterov",
                   "weight_decay", "init", "init_gain", "seed", "update_projection", "probes",
                   "diverge_loss", "log_every", "group", "options")


def pack_key(spec: RunSpec) -> tuple[Any, ...] | None:
    """The settings a pack's members must share (and the numerics options), or None when the
    spec is trained alone.

    Not packed: tasks other than "train", `compile` (a compiled module is not vmapped),
    `channels_last` (vmap cannot query channels-last strides on CUDA) and `options.plain_loop`
    (the user asks for the plain loop, normlab.train.task).
    """
    options = spec.mapping("options")
    if spec.task != "train" or spec.compile or spec.channels_last \
            or options.get("plain_loop", False):
        return None
    return (*(getattr(spec, name) for name in SHARED_SETTINGS),
            *(options.get(name, False) for name in NUMERICS_OPTIONS))
