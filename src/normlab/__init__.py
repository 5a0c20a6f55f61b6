"""normlab: how normalization layers and the learning rate shape the training of deep networks.

    import normlab as nl
    model = nl.resnet_cifar(20, norm="batch", init="kaiming_normal")
    result = nl.train(nl.RunSpec(norm="group", lr=0.05, epochs=2))
    nl.run_study("lr-sweep", "runs/lr-sweep", scale="smoke")

Heavy modules (torch models, probes, plotting) are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from normlab._moved import install as _answer_old_paths
from normlab.runs.result import RunResult
from normlab.runs.spec import RunSpec
from normlab.utils.config import ConfigError
from normlab.utils.plugins import keep_functions_over_submodules
from normlab.utils.version import __version__

_LAZY = {
    # models, norms, inits
    "resnet_cifar": "normlab.nn",
    "plain_cnn": "normlab.nn",
    "mlp": "normlab.nn",
    "make_norm": "normlab.nn",
    "list_norms": "normlab.nn",
    "register_norm": "normlab.nn",
    "BatchRenorm": "normlab.nn",
    "initialize": "normlab.nn",
    "list_inits": "normlab.nn",
    "register_init": "normlab.nn",
    # training
    "train": "normlab.train",
    # studies
    "run_study": "normlab.runner",
    "plan_study": "normlab.studies.plan",
    "Study": "normlab.studies",
    "register_study": "normlab.studies",
    "list_studies": "normlab.studies",
    "get_study": "normlab.studies",
    "load_results": "normlab.studies",
    "build_report": "normlab.report",
}
_SUBPACKAGES = ("nn", "data", "train", "probes", "studies", "report")

__all__ = ["ConfigError", "RunResult", "RunSpec", "__version__", *_LAZY, *_SUBPACKAGES]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"normlab.{name}")
    raise AttributeError(f"module 'normlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


keep_functions_over_submodules(__name__, _LAZY)  # `normlab.train` stays the function
_answer_old_paths()  # the module paths of 0.1 (normlab.spec, ...) warn and still work
