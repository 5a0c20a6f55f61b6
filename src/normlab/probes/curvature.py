"""Curvature of the training loss from Hessian-vector products: top eigenpairs, trace, density.

The function differentiated is the mean loss over fixed batches, in the mode asked for
(`mode="train"` by default: normalization layers use batch statistics, which are part of the
function, so the Hessian includes the coupling between examples; Dropout is off). Forward passes
run functionally (`_stateless`): running statistics and parameters are never written. Where
the forward draws random numbers (Dropout under `mode="keep"`), each batch's forward starts
from the RNG state it had when the operator was built, so every product, on every path, is a
product with the Hessian of one fixed-mask loss. Results computed from a non-finite loss or
gradient come back with `finite=False` and NaN values instead of an error from the eigensolver.

Off CUDA, one HVP is a double backward through a gradient graph that is built once per call and
reused by every product (`retain_graph`), which keeps an HVP near 2-3 gradients of cost. On
CUDA, each product (forward, gradient graph, double backward) is replayed from a CUDA graph
recorded at the third product (see `HessianOperator`). Memory: off CUDA one double-backward
graph per batch held for the whole call; on CUDA one graph, one static copy of a batch and one
memory pool whatever the number of batches (one graph per distinct batch shape, sharing the
pool); plus `max_iter` vectors of the parameter count in float64 for Lanczos.

Every probe checks the second derivatives first (`check=True`, see `HessianOperator.check`):
autograd's H v on one random vector against central finite differences of the gradient, both
in float64. torch computes some second derivatives wrongly without a word; the check refuses
them (`HessianCheckError`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from normlab.nn.batch_renorm import BatchRenorm
from normlab.probes._batches import Batch, LossFn, Vector, unflatten
from normlab.probes._calling import batch_list, batch_loss, convention
from normlab.probes._hygiene import RngStates, preserved
from normlab.probes._modes import norm_mode, probe_mode, resolve_mode
from normlab.probes._modules import select_params
from normlab.probes._results import RecordsMixin
from normlab.probes._stateless import Stateless, leaves
from normlab.train.callbacks import TrainState, register_callback, with_state
from normlab.train.graphed import CapturedCall
from normlab.utils.config import ConfigError, check_choice, check_interval

METHODS = ("lanczos", "power")


HVP_PATHS = ("auto", "reused_graph", "step_function", "cuda_graph")
CAPTURE_WARMUP = 2  # eager products (real ones) before the capture

# The check (`HessianOperator.check`), all in float64. Steps of the central differences,
# relative to the norm of the selected parameters: 1e-8 crosses no ReLU kink of a ResNet-20 even
# at batch 128 (1e-7 does, and is then off by 100 %); the shorter second step, taken only when
# the first disagrees, crosses fewer. The differences' own rounding error is about
# FD_ROUNDING / step (measured: 1e-6 per block at 1e-8 on a float64 BatchNorm ResNet-20).
CHECK_STEPS = (1e-8, 1e-10)
FD_ROUNDING = 1e3 * torch.finfo(torch.float64).eps
# The largest relative error of any parameter's block of H v that passes (at least the
# differences' rounding): torch's wrong double backward through weight_norm gave 5-41 %. A block
# is measured against its own norm, or against 1e-3 of the whole product's if that is larger.
CHECK_TOLERANCE = 1e-4
BLOCK_FLOOR = 1e-3
CHECK_EXAMPLES = 4  # of the first batch (at least 2, for batch statistics)


class HessianCheckError(RuntimeError):
    """H v disagrees with central finite differences of the gradient: torch (or a custom
    autograd Function of the model) computes a second derivative of this model wrongly, or the
    model stops gradients on purpose, so that its gradient is not its loss's gradient."""


class HessianOperator:
    """v -> H v for the mean loss over `batches`; `count` is the number of HVPs taken so far
    (`check` computes its own, not counted).

    Vectors are flat float64 tensors over the selected parameters (in `self.params` order).
    `path` says how a product is computed (the same function each way, float rounding aside):
    - "reused_graph": the gradient graph (create_graph) is built once per batch and every
      product is one double backward through it (retain_graph); the default off CUDA.
    - "step_function": each product recomputes forward, gradient graph and double backward
      from static buffers (the vector, and one copy of a batch into which each batch is loaded
      in turn): one function with fixed inputs and outputs per batch shape, so that
    - "cuda_graph": it can be recorded once in a CUDA graph and replayed per product and batch
      (the default on CUDA, where a double backward through BatchNorm is hundreds of small
      kernels and launch-bound): one graph per distinct batch shape, all in one memory pool.
      Where CUDA refuses the capture, or a module carries a user hook (which would run only
      while the graph is recorded), products run as "step_function" and `refused` keeps the
      reason.
    Each batch's forward starts from the RNG state it had when the operator was built, so that
    random layers (Dropout under mode="keep") draw one mask per batch for the whole operator.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch],
                 params: dict[str, nn.Parameter], path: str = "auto") -> None:
        check_choice("path", path, HVP_PATHS)
        self.model, self.loss_fn, self.batches = model, loss_fn, list(batches)
        self.params = leaves(params)
        self.size = sum(p.numel() for p in params.values())
        self.count = 0
        self.check_error: float | None = None
        tensors = list(self.params.values())
        device = tensors[0].device if tensors else torch.device("cpu")
        if path == "cuda_graph" and device.type != "cuda":
            raise ConfigError(f"The 'path' setting 'cuda_graph' needs the model on a CUDA "
                              f"device; it is on {str(device)!r}. Use 'auto'.")
        self.path = path if path != "auto" else (
            "cuda_graph" if device.type == "cuda" else "reused_graph")
        self._forward = Stateless(model)
        self._rng: list[RngStates] = []  # the RNG state each batch's forward starts from
        self._grads, gradient = [], None
        for x, y in self.batches:  # "reused_graph": one retained gradient graph per batch
            self._rng.append(RngStates.now())
            loss = self._batch_mean_loss(self._forward, x, y, self.params)
            grads = torch.autograd.grad(loss, tensors, create_graph=self.path == "reused_graph",
                                        allow_unused=True)
            if self.path == "reused_graph":
                self._grads.append(grads)
            flat = self._flat(grads, detach=True)
            gradient = flat if gradient is None else gradient + flat
        self.gradient = gradient if gradient is not None else torch.zeros(
            self.size, dtype=torch.float64, device=device)
        self.finite = bool(torch.isfinite(self.gradient).all())
        self._vector = torch.zeros(self.size, dtype=torch.float64, device=device)
        self._steps: dict[tuple, _StaticProduct] = {}
        if self.path != "reused_graph":
            pool = functools.cache(torch.cuda.graph_pool_handle)  # one pool for every capture
            for x, y in self.batches:
                key = _shape_key(x, y)
                if key not in self._steps:
                    self._steps[key] = _StaticProduct(self, x, y, pool)

    @property
    def refused(self) -> str | None:
        """Why a product is not replayed from a CUDA graph (they then run as "step_function"):
        CUDA refused the capture, or a user hook stands in the way; None otherwise."""
        return next((s.call.refused for s in self._steps.values() if s.call.refused), None)

    @property
    def captures(self) -> int:
        """How many step functions (on CUDA: graphs) the products use: one per batch shape."""
        return len(self._steps)

    def _batch_mean_loss(self, forward: Stateless, x: torch.Tensor, y: torch.Tensor,
                         params: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch_loss(self.loss_fn, forward(x, params), y) / len(self.batches)

    def _flat(self, grads: Sequence[torch.Tensor | None], detach: bool = False) -> torch.Tensor:
        return torch.cat([(torch.zeros_like(p) if g is None else g.detach() if detach else g
                           ).reshape(-1) for g, p in zip(grads, self.params.values(),
                                                         strict=True)]).double()

    def _product(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """H v on one batch for v in `self._vector`, from scratch (the step function)."""
        tensors = list(self.params.values())
        grads = torch.autograd.grad(self._batch_mean_loss(self._forward, x, y, self.params),
                                    tensors, create_graph=True, allow_unused=True)
        return self._double_backward(grads, unflatten(self._vector, self.params),
                                     retain_graph=False)

    def _double_backward(self, grads: Sequence[torch.Tensor | None], pieces: Vector,
                         retain_graph: bool, tensors: Iterable[torch.Tensor] | None = None
                         ) -> torch.Tensor:
        """sum over blocks of <grad, piece> differentiated once more, with respect to `tensors`
        (default: the operator's parameters), flattened."""
        tensors = list(self.params.values() if tensors is None else tensors)
        pairs = [(g, pieces[n]) for g, n in zip(grads, self.params, strict=True)
                 if g is not None and g.requires_grad]
        if not pairs:
            return torch.zeros(self.size, dtype=torch.float64, device=self._vector.device)
        hv = torch.autograd.grad([g for g, _ in pairs], tensors,
                                 grad_outputs=[u for _, u in pairs], retain_graph=retain_graph,
                                 allow_unused=True)
        return self._flat(hv)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.count += 1
        if self.path == "reused_graph":
            pieces = unflatten(v, self.params)
            return sum((self._double_backward(grads, pieces, retain_graph=True)
                        for grads in self._grads),
                       torch.zeros(self.size, dtype=torch.float64, device=v.device))
        self._vector.copy_(v)
        total = torch.zeros(self.size, dtype=torch.float64, device=v.device)
        for (x, y), rng in zip(self.batches, self._rng, strict=True):
            rng.restore()  # the batch's Dropout mask (host calls, outside any graph)
            total += self._steps[_shape_key(x, y)](x, y)  # a refilled tensor: add it now
        return total

    # -- the check ---------------------------------------------------------------------------
    def check(self, seed: int = 0) -> float | None:
        """Compare autograd's H v (its double backward) with central finite differences of its
        gradient, both in float64, on one random unit vector (seeded by `seed`); return the
        relative error (of the worst parameter block), also kept as `check_error`.

        A test of the second derivatives torch computes for this model's operations, not of
        the products' float rounding: it runs on the first `CHECK_EXAMPLES` examples of the
        first batch (the derivative code is the same at any batch size; so the check costs
        less than one HVP at batch 32), in float64, with each forward's random draws fixed as in
        the products, and BatchRenorm's r and d (constants of its backward pass by design) at 1
        and 0. Raises `HessianCheckError`, naming the parameter, when the two disagree
        past the tolerance (`CHECK_TOLERANCE`, at least the differences' own rounding) at two
        step sizes that agree with each other. Warns and returns None where it cannot tell:
        the model does not run in float64 or on a few examples, or the two step sizes disagree
        (a ReLU kink crossed). Nothing to check (None) when the gradient is not finite.
        Cost: one float64 HVP and two float64 gradients on those examples
        (benchmarks/hessian.py measures it as a multiple of one HVP).
        """
        if not self.finite:
            return None
        x, y = (t[:CHECK_EXAMPLES] for t in self.batches[0])
        forward = Stateless(self.model, dtype=torch.float64)
        params64 = {n: _float64(p.detach()) for n, p in self.model.named_parameters()}
        # BatchRenorm's r and d are constants for the backward pass by design (computed without
        # gradient from the batch): the differences would move them, the Hessian holds them.
        # The check takes them at their neutral 1 and 0 (the layer is BatchNorm then).
        params64.update({f"{name}.limits": torch.tensor([1.0, 0.0], dtype=torch.float64,
                                                       device=self._vector.device)
                         for name, m in self.model.named_modules() if isinstance(m, BatchRenorm)})

        def loss(moved: dict[str, torch.Tensor]) -> torch.Tensor:
            self._rng[0].restore()  # one set of random draws for every evaluation
            return batch_loss(self.loss_fn, forward(_float64(x), {**params64, **moved}),
                              _float64(y))

        try:
            with torch.no_grad():
                loss({})
        except (RuntimeError, TypeError, ValueError) as err:
            warnings.warn(f"The Hessian-vector products are not checked: the model does not "
                          f"run in float64 on {len(x)} examples ({type(err).__name__}: "
                          f"{str(err).splitlines()[0]}).", RuntimeWarning, stacklevel=3)
            return None
        v = _start_vector(self.size, seed, self._vector.device)
        selected = {n: params64[n] for n in self.params}
        hv = self._float64_product(loss, selected, v)
        tries = []
        for step in CHECK_STEPS:
            fd = self._central_difference(loss, selected, v, step)
            error, block = self._worst_block(hv, fd)
            limit = max(CHECK_TOLERANCE, FD_ROUNDING / step)
            if error <= limit:
                self.check_error = error
                return error
            tries.append((fd, error, block, limit))
        (first, _, _, _), (second, error, block, limit) = tries
        spread, _ = self._worst_block(first, second)
        if spread > limit:
            warnings.warn(f"The Hessian-vector products are not checked: central differences "
                          f"at relative steps {CHECK_STEPS[0]:g} and {CHECK_STEPS[1]:g} differ "
                          f"by {spread:.1%} (a ReLU kink or max-pool switch within the step). "
                          f"H v differed from them by {error:.1%} in {block!r}.",
                          RuntimeWarning, stacklevel=3)
            return None
        raise HessianCheckError(
            f"H v (autograd's double backward) differs from central finite differences of the "
            f"gradient by {error:.1%} in the block of {block!r}, in float64 (tolerance "
            f"{limit:.0e}; the differences at two step sizes agree to {spread:.1e}): torch "
            f"computes a second derivative of this model wrongly, or a custom autograd "
            f"Function of the model has a backward that is not itself differentiable, or the "
            f"model stops gradients on purpose (detach, no_grad), so that its gradient is not "
            f"the gradient of its loss. Pass check=False to measure anyway: the Hessian of the "
            f"loss with the stopped quantities held fixed.")

    def _float64_product(self, loss: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                         selected: dict[str, torch.Tensor], v: torch.Tensor) -> torch.Tensor:
        """H v of `loss` (a function of the selected parameters) by autograd's double
        backward."""
        moved = leaves(selected)
        grads = torch.autograd.grad(loss(moved), list(moved.values()), create_graph=True,
                                    allow_unused=True)
        return self._double_backward(grads, unflatten(v, selected), retain_graph=False,
                                     tensors=moved.values())

    def _central_difference(self, loss: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                            selected: dict[str, torch.Tensor], v: torch.Tensor, step: float
                            ) -> torch.Tensor:
        """(g(theta + h v) - g(theta - h v)) / 2h of `loss`, h = `step` x norm(theta)."""
        scale = float(torch.cat([p.reshape(-1) for p in selected.values()]).norm())
        h = step * max(scale, 1.0) / float(v.norm())
        shift = unflatten(v * h, selected)
        sides = []
        for sign in (1.0, -1.0):
            moved = {n: (p + sign * shift[n]).requires_grad_(True) for n, p in selected.items()}
            sides.append(self._flat(torch.autograd.grad(loss(moved), list(moved.values()),
                                                        allow_unused=True)))
        return (sides[0] - sides[1]) / (2 * h)

    def _worst_block(self, got: torch.Tensor, want: torch.Tensor) -> tuple[float, str]:
        """max over parameters of norm(got - want) / max(norm(want), BLOCK_FLOOR x norm of the
        whole `want`) on that parameter's block of the flat vectors, and the parameter's name."""
        floor = BLOCK_FLOOR * float(want.norm())
        errors, start = {}, 0
        for name, p in self.params.items():
            a, b = got[start:start + p.numel()], want[start:start + p.numel()]
            start += p.numel()
            diff, scale = float((a - b).norm()), max(float(b.norm()), floor)
            errors[name] = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
        name = max(errors, key=errors.__getitem__)
        return errors[name], name


class _StaticProduct:
    """The step function for the batches of one shape: a batch is copied into the fixed `x`,
    `y` and H v on it computed by `call` (eagerly, or replayed from a CUDA graph)."""

    def __init__(self, op: HessianOperator, x: torch.Tensor, y: torch.Tensor,
                 pool: Callable[[], Any]) -> None:
        self.x, self.y = torch.empty_like(x), torch.empty_like(y)
        self.call = CapturedCall(functools.partial(op._product, self.x, self.y),
                                 capture=op.path == "cuda_graph", warmup=CAPTURE_WARMUP,
                                 what="a Hessian-vector product", modules=(op.model, op.loss_fn),
                                 pool=pool)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x)
        self.y.copy_(y)
        return self.call()


def _shape_key(x: torch.Tensor, y: torch.Tensor) -> tuple:
    return tuple((t.shape, t.stride(), t.dtype, t.device) for t in (x, y))


def _float64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64) if t.is_floating_point() else t


@contextlib.contextmanager
def hessian_operator(model: nn.Module, loss_fn: LossFn, data: Batch | Iterable[Batch],
                     params: Sequence[str] | None = None, mode: str = "train",
                     path: str = "auto", check: bool = True) -> Iterator[HessianOperator]:
    """A `HessianOperator` on `model` in `mode`, computing products by `path` (see
    `HessianOperator`; "auto": a CUDA graph on CUDA, else the reused graph), checked first
    against finite differences when `check` (`HessianOperator.check`: raises
    `HessianCheckError` where the products are wrong); the model is left exactly as it was."""
    batches = batch_list(data, "the Hessian probes")
    with preserved(model), probe_mode(model, mode, batches[0][0]):
        op = HessianOperator(model, loss_fn, batches, select_params(model, params), path)
        op.bn_mode = norm_mode(model, mode, batches[0][0])
        if check:
            op.check()
        yield op


@convention(old_positional=("vector", "bn_mode"))
def hvp(model: nn.Module, loss_fn: LossFn, data: Batch | Iterable[Batch], *, vector: Vector,
        mode: str | None = None, bn_mode: str | None = None, check: bool = True) -> Vector:
    """H v for one direction (a dict name -> tensor) in `mode` (default "train"); costs one
    gradient graph plus one double backward, and with `check` (the default) the check of
    `HessianOperator.check` (a float64 HVP and two float64 gradients on 4 examples: it raises
    `HessianCheckError` where torch's second derivatives of the model are wrong). For many
    products use `hessian_operator`, which reuses the graph and checks once.
    """
    mode = resolve_mode(mode, bn_mode, "train")
    with hessian_operator(model, loss_fn, data, list(vector), mode, check=check) as op:
        flat = torch.cat([vector[n].reshape(-1).double() for n in op.params])
        return {n: t.detach().clone() for n, t in unflatten(op(flat), op.params).items()}


@dataclass
class HessianEigs(RecordsMixin):
    """Top-k eigenpairs of the Hessian. `history[i]` is the estimate of lambda_max after i+1
    HVPs (power) or Lanczos steps; `hvps` counts the solver's products (not the check's).
    `bn_mode` is the mode measured in ("train" or "eval"; the field keeps its old name);
    `finite` is False (values NaN, not converged) when the loss or gradient was not finite.
    `check_error`: the relative error of H v against finite differences
    (`HessianOperator.check`), None when not checked.
    """

    values: list[float]
    vectors: list[Vector]
    hvps: int
    converged: bool
    method: str
    bn_mode: str
    history: list[float] = field(default_factory=list)
    finite: bool = True
    mode: str = "train"
    check_error: float | None = None

    def records(self) -> list[dict[str, Any]]:
        return [{"quantity": "hessian_eigenvalue", "rank": i + 1, "value": v, "hvps": self.hvps,
                 "method": self.method, "converged": self.converged, "bn_mode": self.bn_mode,
                 "mode": self.mode, "check_error": self.check_error,
                 **({} if self.finite else {"finite": False})}
                for i, v in enumerate(self.values)]


def _start_vector(size: int, seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(size, generator=generator, dtype=torch.float64).to(device)
    return v / v.norm()


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, steps: int,
            stop: Callable[[torch.Tensor, torch.Tensor], bool] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Lanczos with full reorthogonalization (classical Gram-Schmidt, applied twice).

    Returns (alphas, betas, Q, invariant): T = tridiag(betas, alphas, betas), the orthonormal
    basis Q (one row per step) and whether the Krylov space became invariant (beta ~ 0, so the
    Ritz values are exact eigenvalues). `stop(alphas, betas)` is asked after each step.
    """
    basis, alphas, betas = [v0 / v0.norm()], [], []
    invariant = False
    while True:
        w = matvec(basis[-1])
        alphas.append(torch.dot(w, basis[-1]))
        a = torch.stack(alphas)
        b = torch.stack(betas) if betas else a[:0]
        if (stop is not None and stop(a, b)) or len(alphas) >= steps:
            break
        Q = torch.stack(basis)
        for _ in range(2):
            w = w - Q.T @ (Q @ w)
        beta = w.norm()
        if beta <= 1e-10 * a.abs().max().clamp_min(1e-30):
            invariant = True
            break
        betas.append(beta)
        basis.append(w / beta)
    return a, b, torch.stack(basis), invariant


def tridiagonal_eigh(alphas: torch.Tensor, betas: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric tridiagonal matrix."""
    T = torch.diag(alphas)
    if len(betas):
        T = T + torch.diag(betas, 1) + torch.diag(betas, -1)
    return torch.linalg.eigh(T)


def _lanczos_eigs(op: HessianOperator, k: int, tol: float, max_iter: int, seed: int
                  ) -> tuple[list[float], list[torch.Tensor], bool, list[float]]:
    history: list[float] = []
    previous: list[torch.Tensor | None] = [None]
    state = {"converged": False}

    def stop(alphas: torch.Tensor, betas: torch.Tensor) -> bool:
        values, _ = tridiagonal_eigh(alphas, betas)
        top = values.flip(0)[:k]
        history.append(float(top[0]))
        last, previous[0] = previous[0], top
        if len(alphas) < k + 1 or last is None or len(last) < k:
            return False
        change = (top - last[:k]).abs() / top.abs().clamp_min(1e-30)
        state["converged"] = bool((change < tol).all())
        return state["converged"]

    v0 = _start_vector(op.size, seed, op.gradient.device)
    alphas, betas, Q, invariant = lanczos(op, v0, min(max_iter, op.size), stop)
    if invariant or len(alphas) == op.size:
        state["converged"] = True  # exact: the Krylov space is invariant
    values, vectors = tridiagonal_eigh(alphas, betas)
    order = values.flip(0)[:k]
    ritz = (vectors.flip(1)[:, :k].T @ Q)
    return [float(v) for v in order], list(ritz), state["converged"], history


def _power_eigs(op: HessianOperator, k: int, tol: float, max_iter: int, seed: int
                ) -> tuple[list[float], list[torch.Tensor], bool, list[float]]:
    """Power iteration with deflation (PyHessian's method): largest |eigenvalue| first."""
    values, vectors, history, converged = [], [], [], True
    for i in range(k):
        v = _start_vector(op.size, seed + i, op.gradient.device)
        estimate, ok = None, False
        for _ in range(max_iter):
            for u in vectors:
                v = v - torch.dot(u, v) * u
            v = v / v.norm()
            hv = op(v)
            for u, lam in zip(vectors, values, strict=True):
                hv = hv - lam * torch.dot(u, v) * u
            new = float(torch.dot(hv, v))
            if i == 0:
                history.append(new)
            if estimate is not None and abs(new - estimate) < tol * max(abs(new), 1e-30):
                estimate, ok = new, True
                break
            estimate, v = new, hv
        converged &= ok
        values.append(estimate)
        vectors.append(v / v.norm())
    return values, vectors, converged, history


@convention(old_positional=("k", "method", "tol", "max_iter", "params", "bn_mode", "seed"))
def hessian_eigs(model: nn.Module, loss_fn: LossFn, data: Batch | Iterable[Batch], *,
                 k: int = 1, method: str = "lanczos", tol: float = 1e-3, max_iter: int = 100,
                 params: Sequence[str] | None = None, mode: str | None = None, seed: int = 0,
                 bn_mode: str | None = None, check: bool = True) -> HessianEigs:
    """Top-k eigenpairs of the training-loss Hessian on fixed batches (`data`: one (x, y) batch
    or an iterable of them), in `mode` (default "train": normalization layers on batch
    statistics, part of the function; "eval"; "keep"), from HVPs; cost ~ `hvps` x (2-3
    gradients). `bn_mode` is the deprecated name of `mode`.

    "lanczos" (full reorthogonalization) returns the k largest (algebraic) eigenvalues and stops
    when each changed by less than `tol` (relative) in one step; "power" (deflated power
    iteration) returns the k largest in magnitude and uses the same stopping rule per pair.
    `params` restricts the Hessian to the named parameters (e.g. one layer's weight).

    `check` (the default) first compares H v with finite differences on one random vector
    (`HessianOperator.check`; about 2-4 HVPs more) and raises `HessianCheckError` where torch's
    second derivatives of the model are wrong; `check_error` reports the agreement.

    Notes: the loss is the mean of mean-reduced batch losses; a sum-reduced loss scales every
    eigenvalue by the batch size. Running statistics are not updated; the model is restored.
    """
    check_choice("method", method, METHODS)
    check_interval("k", k, 1, math.inf, kind=int, low_open=False)
    check_interval("tol", tol, 0.0, 1.0)
    check_interval("max_iter", max_iter, 1, math.inf, kind=int, low_open=False)
    mode = resolve_mode(mode, bn_mode, "train")
    with hessian_operator(model, loss_fn, data, params, mode, check=check) as op:
        if not op.finite:
            count = min(k, op.size)
            return HessianEigs([math.nan] * count, [], op.count, False, method, op.bn_mode,
                               finite=False, mode=mode)
        solver = _lanczos_eigs if method == "lanczos" else _power_eigs
        values, flat, converged, history = solver(op, min(k, op.size), tol, max_iter, seed)
        vectors = [{n: t.detach().clone() for n, t in unflatten(v, op.params).items()}
                   for v in flat]
        finite = all(math.isfinite(v) for v in values)
        return HessianEigs(values, vectors, op.count, converged and finite, method, op.bn_mode,
                           history, finite, mode, op.check_error)


@dataclass
class TraceEstimate(RecordsMixin):
    """Hutchinson estimate of tr(H): mean of v^T H v over Rademacher v, with its stderr;
    `check_error` as in `HessianEigs`."""

    value: float
    stderr: float
    samples: int
    bn_mode: str
    check_error: float | None = None

    @property
    def finite(self) -> bool:
        return math.isfinite(self.value)

    def records(self) -> list[dict[str, Any]]:
        return [{"quantity": "hessian_trace", "value": self.value, "stderr": self.stderr,
                 "hvps": self.samples, "bn_mode": self.bn_mode, "check_error": self.check_error,
                 **({} if self.finite else {"finite": False})}]


@convention(old_positional=("samples", "params", "bn_mode", "seed"))
def hessian_trace(model: nn.Module, loss_fn: LossFn, data: Batch | Iterable[Batch], *,
                  samples: int = 50, params: Sequence[str] | None = None,
                  mode: str | None = None, seed: int = 0, bn_mode: str | None = None,
                  check: bool = True) -> TraceEstimate:
    """tr(H) of the training loss by Hutchinson's estimator in `mode` (default "train"); costs
    `samples` HVPs (and the check of `hessian_eigs` when `check`).

    Rademacher probes from a generator seeded with `seed` (the global RNG is untouched).
    """
    check_interval("samples", samples, 2, math.inf, kind=int, low_open=False)
    mode = resolve_mode(mode, bn_mode, "train")
    generator = torch.Generator().manual_seed(seed)
    with hessian_operator(model, loss_fn, data, params, mode, check=check) as op:
        draws = []
        for _ in range(samples):
            v = torch.randint(0, 2, (op.size,), generator=generator).double() * 2 - 1
            v = v.to(op.gradient.device)
            draws.append(float(torch.dot(v, op(v))))
        measured, checked = op.bn_mode, op.check_error
    values = torch.tensor(draws, dtype=torch.float64)
    return TraceEstimate(float(values.mean()), float(values.std() / samples ** 0.5), samples,
                         measured, checked)


@dataclass
class SpectralDensity(RecordsMixin):
    """Stochastic Lanczos quadrature: per probe vector, Ritz `nodes` and `weights` (summing to 1).

    The density estimate is the average over probes of sum_j weights_j delta(x - nodes_j);
    `smoothed(grid, sigma)` convolves it with a Gaussian of width sigma; `check_error` as in
    `HessianEigs`.
    """

    nodes: list[torch.Tensor]
    weights: list[torch.Tensor]
    bn_mode: str
    check_error: float | None = None

    def smoothed(self, grid: torch.Tensor, sigma: float) -> torch.Tensor:
        grid = grid.double()
        density = torch.zeros_like(grid)
        for nodes, weights in zip(self.nodes, self.weights, strict=True):
            z = (grid[:, None] - nodes[None, :]) / sigma
            density += (weights[None, :] * torch.exp(-0.5 * z ** 2)).sum(1)
        return density / (len(self.nodes) * sigma * math.sqrt(2 * math.pi))

    def records(self) -> list[dict[str, Any]]:
        """One row per probe vector and Ritz node: node (eigenvalue), weight."""
        return [{"quantity": "ritz_node", "probe": i, "node": float(x), "value": float(w),
                 "bn_mode": self.bn_mode, "check_error": self.check_error}
                for i, (xs, ws) in enumerate(zip(self.nodes, self.weights, strict=True))
                for x, w in zip(xs.tolist(), ws.tolist(), strict=True)]


@convention(old_positional=("steps", "probes", "params", "bn_mode", "seed"))
def spectral_density(model: nn.Module, loss_fn: LossFn, data: Batch | Iterable[Batch], *,
                     steps: int = 30, probes: int = 1, params: Sequence[str] | None = None,
                     mode: str | None = None, seed: int = 0, bn_mode: str | None = None,
                     check: bool = True) -> SpectralDensity:
    """Eigenvalue density of the Hessian by stochastic Lanczos quadrature in `mode` (default
    "train"); costs `steps` x `probes` HVPs (and the check of `hessian_eigs` when `check`).
    Quadrature is exact for polynomials of degree < 2 steps. `records()`: the Ritz nodes and
    their weights per probe vector.
    """
    check_interval("steps", steps, 1, math.inf, kind=int, low_open=False)
    check_interval("probes", probes, 1, math.inf, kind=int, low_open=False)
    mode = resolve_mode(mode, bn_mode, "train")
    nodes, weights = [], []
    with hessian_operator(model, loss_fn, data, params, mode, check=check) as op:
        for i in range(probes):
            v0 = _start_vector(op.size, seed + i, op.gradient.device)
            alphas, betas, _, _ = lanczos(op, v0, min(steps, op.size))
            values, vectors = tridiagonal_eigh(alphas, betas)
            nodes.append(values.cpu())
            weights.append((vectors[0] ** 2).cpu())
        measured, checked = op.bn_mode, op.check_error
    return SpectralDensity(nodes, weights, measured, checked)


@register_callback("sharpness")
def sharpness_callback(tol: float = 1e-3, max_iter: int = 30, batch: str = "current"
                       ) -> Callable[[TrainState], None]:
    """lambda_max of the mini-batch loss (train-mode BN, running statistics frozen) beside the
    stability thresholds 2/lr (gradient descent) and 2(1+momentum)/lr (heavy ball).

    `batch="current"` uses the batch of the step; `"first"` keeps the first batch seen, so that
    values over training are on the same data. Cost per call: up to `max_iter` HVPs; the first
    call also checks the products against finite differences (`HessianOperator.check`, its
    `check_error` recorded with lambda_max; a model whose second derivatives torch gets wrong
    fails the run with `HessianCheckError`).
    """
    check_choice("batch", batch, ("current", "first"))
    # {"batch": the first batch, "checked": the check ran}, saved by checkpoints (with_state),
    # so a resumed run measures on the same batch and does not check a second time.
    kept: dict[str, Any] = {}

    def callback(state: TrainState) -> None:
        if batch == "first" and "batch" not in kept:
            kept["batch"] = (state.x.detach().clone(), state.y.detach().clone())
        data = kept.get("batch", (state.x, state.y))
        eigs = hessian_eigs(state.model, state.loss_fn, data, tol=tol, max_iter=max_iter,
                            check="checked" not in kept)
        kept["checked"] = True
        momentum = float(state.optimizer.param_groups[0].get("momentum", 0.0) or 0.0)
        lr = state.lr
        rows = [{"quantity": "lambda_max", "value": eigs.values[0], "hvps": eigs.hvps,
                 "converged": eigs.converged, "bn_mode": eigs.bn_mode,
                 **({} if eigs.check_error is None else {"check_error": eigs.check_error})},
                {"quantity": "two_over_lr", "value": 2.0 / lr if lr > 0 else math.inf},
                {"quantity": "two_one_plus_momentum_over_lr",
                 "value": 2.0 * (1.0 + momentum) / lr if lr > 0 else math.inf}]
        state.context.log_records("sharpness", rows, step=state.step, lr=lr,
                                  momentum=momentum)

    return with_state(callback, kept)
