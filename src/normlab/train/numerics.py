"""The float numerics a training run runs under: TF32 off unless asked, and a `deterministic`
mode for runs that must repeat bit for bit on a GPU.

Two options of the "train" task (`RunSpec.options`, so that leaving them unset keeps every
existing run id):

- `tf32` (bool, default False). torch turns TF32 on for cuDNN convolutions by default; a run
  turns it off (convolutions and matmuls in full float32) unless `tf32=True`. TF32 rounds the
  inputs of each convolution and matmul to 10 mantissa bits: about 1e-3 relative error, and up
  to ~2x faster convolutions on Ampere and later GPUs. No effect on a CPU.
- `deterministic` (bool, default False): `torch.backends.cudnn.deterministic = True`,
  `cudnn.benchmark = False` (also for the CUDA-graph capture, which otherwise autotunes),
  `torch.use_deterministic_algorithms(True)` (an operation without a deterministic kernel then
  raises, naming itself) and `CUBLAS_WORKSPACE_CONFIG=":4096:8"` when unset, which cuBLAS
  needs to be deterministic (set it in the environment before the process first uses CUDA to
  be sure cuBLAS sees it). TF32 stays off. Cost on a GPU: cuDNN uses its deterministic
  convolution kernels, often slower than the autotuned ones, and torch fills uninitialized
  memory (every `torch.empty`) so that no garbage leaks into results. On a CPU the numbers
  are the same with and without it (CPU kernels are deterministic for a given thread count).

Both are applied for the duration of the run (`run_numerics`) and restored afterwards, and the
settings in force are recorded in the result's provenance (`normlab.runs.result.numerics`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from normlab.runs.result import NUMERICS_OPTIONS

CUBLAS_DETERMINISTIC = ":4096:8"


def numerics_options(options: Mapping[str, Any]) -> tuple[dict[str, bool], list[str]]:
    """(`deterministic`, `tf32` with their defaults, one problem sentence per bad value)."""
    values = {name: options.get(name, False) for name in NUMERICS_OPTIONS}
    problems = [f"The 'options.{name}' setting must be a bool; got {value!r}."
                for name, value in values.items() if not isinstance(value, bool)]
    if values["deterministic"] is True and values["tf32"] is True:
        problems.append("The 'options.tf32' setting must be False when 'options.deterministic' "
                        "is True (a deterministic run computes in full float32); got True.")
    return values, problems


@contextlib.contextmanager
def run_numerics(*, deterministic: bool = False, tf32: bool = False) -> Iterator[None]:
    """TF32 and determinism set for a run inside the block, the previous settings restored."""
    cudnn = torch.backends.cudnn
    saved = (torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark,
             cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    saved_env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    torch.backends.cuda.matmul.allow_tf32 = cudnn.allow_tf32 = tf32
    if deterministic:
        cudnn.deterministic, cudnn.benchmark = True, False
        torch.use_deterministic_algorithms(True)
        if saved_env is None:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark,
         cudnn.deterministic) = saved[:4]
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])
        if saved_env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
