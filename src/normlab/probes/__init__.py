"""Probes: measurements on any PyTorch model that leave it exactly as they found it.

One calling convention, `probe(model, loss_fn, data, *, mode=..., ...)` (see
`probes._calling`); every result has `.records()` (tidy dicts with layer, depth, quantity,
value, bn_mode, mode, ...) and `.to_frame()`. Each probe states in its docstring what it
measures, in which mode and at what cost. Submodules are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from normlab.utils.plugins import keep_functions_over_submodules

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
    "hvp": "curvature",
    "HessianCheckError": "curvature",
    "random_direction": "landscape",
    "scaled_direction": "landscape",
    "radial_direction": "landscape",
    "tangential_direction": "landscape",
    "hessian_direction": "landscape",
    # Theory: random matrices and SGD noise (E2, E9)
    "fuss_catalan_density": "rmt",
    "fuss_catalan_moment": "rmt",
    "fuss_catalan_cdf": "rmt",
    "fuss_catalan_support": "rmt",
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
