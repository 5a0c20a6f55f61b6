"""Measurement tasks of the theory studies (rmt, init, noise-scale): no training, one record set.

- "rmt-product": singular values of a product of `options.M` Gaussian N(0, 1/N) matrices of size
  `options.N` (seed = spec.seed), beside the Fuss-Catalan law.
- "jacobian-spectrum": the spec's model at initialization (float64; for `spec.model == "mlp"`
  with `options.activation == "linear"` a deep linear network of `depth` square layers of
  `width` units after a first layer from the input), the singular values of its input-output
  Jacobian on the first `options.examples` training images (train-mode BN: batch statistics),
  and the signal-propagation profile (per-channel activation mean and variance per layer).
- "sgd-noise": per-example loss gradients at initialization of `options.examples` training
  examples (no batch coupling allowed), and the SGD noise E||g_B - g||^2 per batch size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from normlab.data import load
from normlab.nn import build_model, initialize, is_batch_coupled, mlp
from normlab.probes.activations import activation_stats
from normlab.probes.noise import gradient_variance, sgd_noise
from normlab.probes.per_example import per_example_loss_grads
from normlab.probes.rmt import (
    JACOBIAN_METHODS,
    fuss_catalan_support,
    jacobian_singular_values,
    product_singular_values,
    spectrum_summary,
)
from normlab.runs.result import RunResult, provenance
from normlab.runs.spec import RunSpec
from normlab.runs.tasks import RunContext, register_task
from normlab.studies._options import Option, declare_options, read_options
from normlab.utils.config import ConfigError

RMT_TASK = "rmt-product"
JACOBIAN_TASK = "jacobian-spectrum"
NOISE_TASK = "sgd-noise"

def _examples_form_a_batch(spec: RunSpec, options: dict[str, Any]) -> list[str]:
    examples = options["examples"]
    if spec.norm != "none" and isinstance(examples, int) and examples < 2:
        return ["The 'options.examples' setting must be >= 2 with a normalization (batch "
                f"statistics need a batch); got {examples!r}."]
    return []


declare_options(RMT_TASK, M=Option(1, low=1), N=Option(400, low=1))
declare_options(JACOBIAN_TASK, _examples_form_a_batch,
                activation=Option("relu", kind="str"),
                examples=Option(8, low=1), k=Option(None, low=1, optional=True),
                method=Option("lanczos", kind="str", choices=JACOBIAN_METHODS),
                layer=Option(None, kind="str", optional=True))
declare_options(NOISE_TASK, examples=Option(256, low=1),
                batch_sizes=Option([1, 4, 16, 64], kind="int_list", low=1),
                samples=Option(200, low=1))


def _result(spec: RunSpec, final: dict[str, Any]) -> RunResult:
    return RunResult(status="completed", steps=0, final=final,
                     provenance=provenance(spec.run_id, "cpu", spec.seed))


@register_task(RMT_TASK)
def rmt_product_task(spec: RunSpec, context: RunContext) -> RunResult:
    """Singular values of a product of M Gaussian matrices, and their summaries."""
    options = read_options(spec)
    values = product_singular_values(options["M"], options["N"], seed=spec.seed)
    rows = [{"quantity": "singular_value", "rank": i, "value": v}
            for i, v in enumerate(values.tolist())]
    summary = spectrum_summary(values)
    context.log_records("rmt_product", rows + [{"quantity": q, "value": v}
                                               for q, v in summary.items()])
    edge = fuss_catalan_support(options["M"]) ** 0.5
    return _result(spec, {**{f"sv_{q}": v for q, v in summary.items()},
                          "sv_edge_theory": edge, "M": options["M"], "N": options["N"]})


def build_init_model(spec: RunSpec, image_shape: tuple[int, int, int],
                     num_classes: int, activation: str) -> nn.Module:
    """The spec's model at initialization in float64 (see the module docstring)."""
    if spec.model == "mlp" and activation == "linear":
        d_in = image_shape[0] * image_shape[1] * image_shape[2]
        model = mlp([d_in, *[spec.width] * spec.depth], activation="linear", norm=spec.norm,
                    norm_options=spec.mapping("norm_options"), init=spec.init, bias=False,
                    seed=spec.seed, init_gain=spec.init_gain)
    else:
        model = build_model(spec.model, depth=spec.depth, width=spec.width, norm=spec.norm,
                            norm_options=spec.mapping("norm_options"),
                            norm_placement=spec.norm_placement, init=spec.init,
                            init_gain=spec.init_gain, num_classes=num_classes,
                            in_channels=image_shape[0], seed=spec.seed,
                            input_shape=image_shape)
    model = model.double()
    # again in float64, so that orthogonal weights are orthogonal to rounding, not to float32
    return initialize(model, spec.init, gain=spec.init_gain, seed=spec.seed).train()


@register_task(JACOBIAN_TASK)
def jacobian_spectrum_task(spec: RunSpec, context: RunContext) -> RunResult:
    """Jacobian singular values and per-layer activation statistics at initialization."""
    options = read_options(spec)
    train_set, _ = load(spec.data, **spec.mapping("data_options"))
    model = build_init_model(spec, train_set.image_shape, train_set.num_classes,
                             options["activation"])
    x = train_set.x[:options["examples"]].double()
    spectrum = jacobian_singular_values(model, x, k=options["k"], method=options["method"],
                                        layer=options["layer"], seed=spec.seed)
    context.log_records("jacobian_spectrum", spectrum.records())
    context.log_records("activation_stats", activation_stats(model, x))
    summary = spectrum_summary(spectrum.values)
    return _result(spec, {**{f"jac_{q}": v for q, v in summary.items()},
                          "jac_products": spectrum.products, "jac_values": len(spectrum.values)})


@register_task(NOISE_TASK)
def sgd_noise_task(spec: RunSpec, context: RunContext) -> RunResult:
    """SGD noise at initialization: Monte-Carlo estimate vs the exact formula per batch size."""
    options = read_options(spec)
    train_set, _ = load(spec.data, **spec.mapping("data_options"))
    model = build_init_model(spec, train_set.image_shape, train_set.num_classes, "relu")
    n = min(options["examples"], len(train_set))
    x, y = train_set.x[:n].double(), train_set.y[:n]
    if is_batch_coupled(model, x):
        raise ConfigError(f"The 'norm' setting of the {NOISE_TASK!r} task must not couple the "
                          f"examples of a batch (eq. 2 needs fixed per-example gradients); got "
                          f"{spec.norm!r}. Use 'none', 'group', 'layer' or 'instance'.")
    grads = per_example_loss_grads(model, nn.CrossEntropyLoss(), (x, y), chunk_size=64)
    records = sgd_noise(grads, [b for b in options["batch_sizes"] if b <= n],
                        samples=options["samples"], seed=spec.seed)
    context.log_records("sgd_noise", records, bn_mode="train",
                        gradient="per_example_loss_grads")
    ratios = [r["value"] for r in records  # b = N has no noise, hence no ratio
              if r["quantity"] == "estimate_over_exact" and r["value"] == r["value"]]
    with torch.no_grad():
        c_hat = gradient_variance(grads)
    return _result(spec, {"noise_c_hat": c_hat, "noise_examples": n,
                          "noise_max_ratio_error": max((abs(r - 1) for r in ratios),
                                                       default=float("nan"))})
