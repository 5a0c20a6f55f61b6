"""From a RunSpec to the things a run needs: device, data, model and optimizer.

Conventions:
- Device "auto": $NORMLAB_DEVICE when set (a pool worker pinned to a GPU), else "cuda" when
  available, else "cpu". An explicit device is used as given.
- Training batches come from `normlab.data.BatchIterator` on the run's device with
  `drop_last=True`: every optimizer step sees exactly `batch_size` examples, so the SGD noise
  scale is the one the spec states; an epoch is floor(N / batch_size) steps.
- SGD with coupled L2 weight decay on every parameter (biases and norm affine parameters
  included), as in the paper-era CIFAR ResNet code. The optimizer's own lr is set by the
  schedule before each step.
- Options of the "train" task (`RunSpec.options`): `one_cycle_peak`, `one_cycle_div` (see
  schedules.py), `fused_sgd` (bool: torch's fused SGD kernel; same update, faster on GPU) and
  `eval_batch_size` (int, default 1024: chunk size of evaluation, no effect on the numbers)
  and `cuda_graph` ("auto", "on", "off" or "eager": the CUDA-graph step, see graphed.py);
  `deterministic` and `tf32` (bools, default False: the run's float numerics, see numerics.py);
  and `replicate` (int >= 0, default 0): a *perturbation replicate* of the run. Replicate r > 0
  starts from the seed's initial weights perturbed by a relative 1e-7 (`perturb_initial_weights`),
  everything else (data order, augmentation) as in replicate 0, the unperturbed run. Studies
  write it only for r > 0, so an unperturbed spec (and its run id) has no `replicate` key.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from normlab.data import BatchIterator, load
from normlab.nn import build_model as build
from normlab.runs.spec import RunSpec
from normlab.runs.tasks import register_task_check
from normlab.train.graphed import CUDA_GRAPH_SETTINGS
from normlab.train.numerics import NUMERICS_OPTIONS, numerics_options
from normlab.utils.config import ConfigError, choice_problem, interval_problem

TRAIN_OPTIONS = ("one_cycle_peak", "one_cycle_div", "fused_sgd", "eval_batch_size", "cuda_graph",
                 "replicate", "plain_loop", *NUMERICS_OPTIONS)
REPLICATE_PERTURBATION = 1e-7  # relative size of a replicate's change to the initial weights
MAX_REPLICATE = 2**32 - 1  # the replicate's share of the perturbation generator's seed


def resolve_device(device: str) -> torch.device:
    """The torch device of a spec's `device` setting ('auto' honours $NORMLAB_DEVICE)."""
    if device == "auto":
        device = os.environ.get("NORMLAB_DEVICE") or (
            "cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@register_task_check("train")
def train_options(spec: RunSpec) -> dict[str, Any]:
    """The "train" task's options with defaults; ConfigError for an unknown key or bad value."""
    options = spec.mapping("options")
    _, problems = spec.task_options(dict.fromkeys(TRAIN_OPTIONS))
    fused, plain = options.get("fused_sgd", False), options.get("plain_loop", False)
    problems += [f"The 'options.{name}' setting must be a bool; got {value!r}."
                 for name, value in (("fused_sgd", fused), ("plain_loop", plain))
                 if not isinstance(value, bool)]
    eval_batch = options.get("eval_batch_size", 1024)
    problem = interval_problem("options.eval_batch_size", eval_batch, 1, kind=int,
                               low_open=False)
    problems += [problem] if problem else []
    graph = options.get("cuda_graph", "auto")
    if graph not in CUDA_GRAPH_SETTINGS:
        problems.append(choice_problem("options.cuda_graph", graph, CUDA_GRAPH_SETTINGS))
    numerics, numerics_problems = numerics_options(options)
    problems += numerics_problems
    replicate = options.get("replicate", 0)
    problem = interval_problem("options.replicate", replicate, 0, MAX_REPLICATE, kind=int,
                               low_open=False, high_open=False)
    problems += [problem] if problem else []
    if problems:
        raise ConfigError(problems)
    return {"fused_sgd": fused, "eval_batch_size": eval_batch, "cuda_graph": graph,
            "replicate": replicate, **numerics}


def build_data(spec: RunSpec, device: torch.device) -> tuple[Any, Any, Any]:
    """(train data set, test data set, training BatchIterator) on `device`."""
    train_set, test_set = load(spec.data, **spec.mapping("data_options"))
    batches = build_batches(spec, train_set, device)
    return batches.dataset, test_set.to(device), batches


def build_batches(spec: RunSpec, train_set: Any, device: torch.device) -> Any:
    """The spec's training BatchIterator over `train_set` (shuffled and augmented with its seed;
    `drop_last`, so every step sees `batch_size` examples)."""
    return BatchIterator(train_set, spec.batch_size, shuffle=True, augment=spec.augment,
                         drop_last=True, seed=spec.seed, device=device)


def build_model(spec: RunSpec, train_set: Any, device: torch.device) -> nn.Module:
    """The spec's model for `train_set`'s image shape and classes, initialized with the seed
    (and perturbed when the spec is a replicate, `options.replicate` > 0)."""
    model = build(spec.model, depth=spec.depth, width=spec.width, norm=spec.norm,
                  norm_options=spec.mapping("norm_options"), norm_placement=spec.norm_placement,
                  init=spec.init, init_gain=spec.init_gain, num_classes=train_set.num_classes,
                  in_channels=train_set.image_shape[0], seed=spec.seed,
                  input_shape=train_set.image_shape)
    replicate = spec.mapping("options").get("replicate", 0)
    if replicate:
        perturb_initial_weights(model, spec.seed, replicate)
    model = model.to(device)
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


@torch.no_grad()
def perturb_initial_weights(model: nn.Module, seed: int, replicate: int,
                            relative: float = REPLICATE_PERTURBATION) -> None:
    """Perturb every parameter w of `model` in place: w + relative * rms(w) * z, z ~ N(0, I).

    So ||change|| / ||w|| is about `relative` per tensor (1e-7: a few float32 ulps, the size of
    a change of reduction order); all-zero tensors (biases) stay zero. z comes from a CPU
    generator seeded with seed * 2**32 + replicate, drawn in float64 per parameter in
    `named_parameters` order; the sum is rounded to the parameter's dtype. Buffers (BN running
    statistics) are left alone. The same (seed, replicate) gives the same weights on any device.
    """
    generator = torch.Generator().manual_seed(seed * 2**32 + replicate)
    for _, weight in model.named_parameters():
        exact = weight.detach().to("cpu", torch.float64)
        rms = exact.square().mean().sqrt()
        z = torch.randn(exact.shape, generator=generator, dtype=torch.float64)
        weight.copy_((exact + relative * rms * z).to(weight.device, weight.dtype))


def build_optimizer(spec: RunSpec, model: nn.Module, fused: bool = False) -> torch.optim.SGD:
    """SGD(momentum, nesterov, coupled weight decay) over every parameter of `model`."""
    if spec.nesterov and spec.momentum == 0:
        raise ConfigError("The 'nesterov' setting needs a 'momentum' > 0; got nesterov=True "
                          "with momentum=0.")
    extra = {"fused": True} if fused else {}
    return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum,
                           nesterov=spec.nesterov, weight_decay=spec.weight_decay, **extra)
