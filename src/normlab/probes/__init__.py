"""Probes: measurements on any PyTorch model that leave it exactly as they found it.

Each probe returns tidy records (lists of dicts with layer, depth, quantity, value, bn_mode, ...)
or tensors, and states in its docstring what it measures, in which BN mode and at what cost.
Submodules are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from normlab._plugins import keep_functions_over_submodules

_LAZY = {
    # Probes I: activations, per-example gradients and gradient structure (E3-E8)
    "activation_stats": "activations",
    "per_example_loss_grads": "per_example",
    "per_example_contributions": "per_example",
    "gradient_coherence": "coherence",
    "gradient_spectrum": "spectrum",
    "step_loss": "step_loss",
    "step_anatomy": "step_loss",
    "output_gradients": "outputs",
    "gradient_histogram": "histogram",
    "tail_statistics": "histogram",
    # Probes II: radial/tangential, mean gradient, landscapes, curvature, LR range (R2-R4, R8, R9)
    "radial_tangential": "radial",
    "mean_gradient": "mean_gradient",
    "landscape": "landscape",
    "hessian_eigs": "curvature",
    "hessian_trace": "curvature",
    "spectral_density": "curvature",
    "lr_range_test": "lr_range",
    # Theory: random matrices and SGD noise (E2, E9)
    "fuss_catalan_density": "rmt",
    "fuss_catalan_moment": "rmt",
    "product_singular_values": "rmt",
    "jacobian_singular_values": "rmt",
    "sgd_noise": "noise",
    "sgd_noise_exact": "noise",
    # hygiene
    "preserved": "_hygiene",
    "bn_mode": "_hygiene",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"normlab.probes.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'normlab.probes' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


keep_functions_over_submodules(__name__, _LAZY)
