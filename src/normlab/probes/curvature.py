"""Curvature of the training loss from Hessian-vector products: top eigenpairs, trace, density.

The function differentiated is the mean loss over fixed batches, in the mode asked for
(`mode="train"` by default: normalization layers use batch statistics, which are part of the
function, so the Hessian includes the coupling between examples; Dropout is off). Forward passes
run functionally (`_stateless`): running statistics and parameters are never written.
Results computed from a non-finite loss or gradient come back with `finite=False` and NaN
values instead of an error from the eigensolver.

Off CUDA, one HVP is a double backward through a gradient graph that is built once per call and
reused by every product (`retain_graph`), which keeps an HVP near 2-3 gradients of cost. On
CUDA, each product (forward, gradient graph, double backward) is replayed from a CUDA graph
recorded at the third product (see `HessianOperator`). Memory: one double-backward graph per
batch held for the whole call, plus `max_iter` vectors of the parameter count in float64 for
Lanczos.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from normlab.config import ConfigError, check_choice, check_interval
from normlab.probes._batches import Batch, LossFn, Vector, unflatten
from normlab.probes._calling import batch_list, batch_loss, convention
from normlab.probes._hygiene import preserved
from normlab.probes._modes import norm_mode, probe_mode, resolve_mode
from normlab.probes._modules import select_params
from normlab.probes._results import RecordsMixin
from normlab.probes._stateless import Stateless, leaves
from normlab.train.callbacks import TrainState, register_callback
from normlab.train.graphed import CapturedCall

METHODS = ("lanczos", "power")


HVP_PATHS = ("auto", "reused_graph", "step_function", "cuda_graph")
CAPTURE_WARMUP = 2  # eager products (real ones) before the capture


class HessianOperator:
    """v -> H v for the mean loss over `batches`; `count` is the number of HVPs taken so far.

    Vectors are flat float64 tensors over the selected parameters (in `self.params` order).
    `path` says how a product is computed (the same function each way, float rounding aside):
    - "reused_graph": the gradient graph (create_graph) is built once per batch and every
      product is one double backward through it (retain_graph); the default off CUDA.
    - "step_function": each product recomputes forward, gradient graph and double backward
      from a static vector buffer: one function with fixed inputs and outputs, so that
    - "cuda_graph": it can be recorded once in a CUDA graph and replayed per product (the
      default on CUDA, where a double backward through BatchNorm is hundreds of small kernels
      and launch-bound). Where CUDA refuses the capture, products run as "step_function" and
      `refused` keeps the reason.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch],
                 params: dict[str, nn.Parameter], path: str = "auto") -> None:
        check_choice("path", path, HVP_PATHS)
        self.params = leaves(params)
        self.size = sum(p.numel() for p in params.values())
        self.count = 0
        tensors = list(self.params.values())
        device = tensors[0].device if tensors else torch.device("cpu")
        if path == "cuda_graph" and device.type != "cuda":
            raise ConfigError(f"The 'path' setting 'cuda_graph' needs the model on a CUDA "
                              f"device; it is on {str(device)!r}. Use 'auto'.")
        self.path = path if path != "auto" else (
            "cuda_graph" if device.type == "cuda" else "reused_graph")
        forward = Stateless(model)

        def batch_mean_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return batch_loss(loss_fn, forward(x, self.params), y) / len(batches)

        self._grads, gradient = [], None
        for x, y in batches:  # one graph per batch: memory grows with the number of batches
            grads = torch.autograd.grad(batch_mean_loss(x, y), tensors,
                                        create_graph=self.path == "reused_graph",
                                        allow_unused=True)
            if self.path == "reused_graph":
                self._grads.append(grads)
            flat = self._flat(grads, detach=True)
            gradient = flat if gradient is None else gradient + flat
        self.gradient = gradient if gradient is not None else torch.zeros(
            self.size, dtype=torch.float64, device=device)
        self.finite = bool(torch.isfinite(self.gradient).all())
        self._vector = torch.zeros(self.size, dtype=torch.float64, device=device)
        self._calls = [CapturedCall(functools.partial(self._product, batch_mean_loss, x, y),
                                    capture=self.path == "cuda_graph", warmup=CAPTURE_WARMUP,
                                    what="a Hessian-vector product")
                       for x, y in batches] if self.path != "reused_graph" else []

    @property
    def refused(self) -> str | None:
        """Why CUDA refused to capture a product (they then run as "step_function"), or None."""
        return next((c.refused for c in self._calls if c.refused), None)

    def _flat(self, grads: Sequence[torch.Tensor | None], detach: bool = False) -> torch.Tensor:
        return torch.cat([(torch.zeros_like(p) if g is None else g.detach() if detach else g
                           ).reshape(-1) for g, p in zip(grads, self.params.values(),
                                                         strict=True)]).double()

    def _product(self, batch_mean_loss: Callable[..., torch.Tensor], x: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
        """H v on one batch for v in `self._vector`, from scratch (the step function)."""
        tensors = list(self.params.values())
        grads = torch.autograd.grad(batch_mean_loss(x, y), tensors, create_graph=True,
                                    allow_unused=True)
        return self._double_backward(grads, unflatten(self._vector, self.params),
                                     retain_graph=False)

    def _double_backward(self, grads: Sequence[torch.Tensor | None], pieces: Vector,
                         retain_graph: bool) -> torch.Tensor:
        tensors = list(self.params.values())
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
        for call in self._calls:
            total += call()  # a captured call returns the same tensor, refilled: add it now
        return total


@contextlib.contextmanager
def hessian_operator(model: nn.Module, loss_fn: LossFn, data: Batch | Iterable[Batch],
                     params: Sequence[str] | None = None, mode: str = "train",
                     path: str = "auto") -> Iterator[HessianOperator]:
    """A `HessianOperator` on `model` in `mode`, computing products by `path` (see
    `HessianOperator`; "auto": a CUDA graph on CUDA, else the reused graph); the model is left
    exactly as it was."""
    batches = batch_list(data, "the Hessian probes")
    with preserved(model), probe_mode(model, mode, batches[0][0]):
        op = HessianOperator(model, loss_fn, batches, select_params(model, params), path)
        op.bn_mode = norm_mode(model, mode, batches[0][0])
        yield op


@convention(old_positional=("vector", "bn_mode"))
def hvp(model: nn.Module, loss_fn: LossFn, data: Batch | Iterable[Batch], *, vector: Vector,
        mode: str | None = None, bn_mode: str | None = None) -> Vector:
    """H v for one direction (a dict name -> tensor) in `mode` (default "train"); costs one
    gradient graph plus one double backward. For many products use `hessian_operator`, which
    reuses the graph.
    """
    mode = resolve_mode(mode, bn_mode, "train")
    with hessian_operator(model, loss_fn, data, list(vector), mode) as op:
        flat = torch.cat([vector[n].reshape(-1).double() for n in op.params])
        return {n: t.detach().clone() for n, t in unflatten(op(flat), op.params).items()}


@dataclass
class HessianEigs(RecordsMixin):
    """Top-k eigenpairs of the Hessian. `history[i]` is the estimate of lambda_max after i+1
    HVPs (power) or Lanczos steps; `hvps` counts every product taken (including the final check).
    `bn_mode` is the mode measured in ("train" or "eval"; the field keeps its old name);
    `finite` is False (values NaN, not converged) when the loss or gradient was not finite.
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

    def records(self) -> list[dict[str, Any]]:
        return [{"quantity": "hessian_eigenvalue", "rank": i + 1, "value": v, "hvps": self.hvps,
                 "method": self.method, "converged": self.converged, "bn_mode": self.bn_mode,
                 "mode": self.mode, **({} if self.finite else {"finite": False})}
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
                 bn_mode: str | None = None) -> HessianEigs:
    """Top-k eigenpairs of the training-loss Hessian on fixed batches (`data`: one (x, y) batch
    or an iterable of them), in `mode` (default "train": normalization layers on batch
    statistics, part of the function; "eval"; "keep"), from HVPs; cost ~ `hvps` x (2-3
    gradients). `bn_mode` is the deprecated name of `mode`.

    "lanczos" (full reorthogonalization) returns the k largest (algebraic) eigenvalues and stops
    when each changed by less than `tol` (relative) in one step; "power" (deflated power
    iteration) returns the k largest in magnitude and uses the same stopping rule per pair.
    `params` restricts the Hessian to the named parameters (e.g. one layer's weight).

    Notes: the loss is the mean of mean-reduced batch losses; a sum-reduced loss scales every
    eigenvalue by the batch size. Running statistics are not updated; the model is restored.
    """
    check_choice("method", method, METHODS)
    check_interval("k", k, 1, math.inf, kind=int, low_open=False)
    check_interval("tol", tol, 0.0, 1.0)
    check_interval("max_iter", max_iter, 1, math.inf, kind=int, low_open=False)
    mode = resolve_mode(mode, bn_mode, "train")
    with hessian_operator(model, loss_fn, data, params, mode) as op:
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
                           history, finite, mode)


@dataclass
class TraceEstimate(RecordsMixin):
    """Hutchinson estimate of tr(H): mean of v^T H v over Rademacher v, with its stderr."""

    value: float
    stderr: float
    samples: int
    bn_mode: str

    @property
    def finite(self) -> bool:
        return math.isfinite(self.value)

    def records(self) -> list[dict[str, Any]]:
        return [{"quantity": "hessian_trace", "value": self.value, "stderr": self.stderr,
                 "hvps": self.samples, "bn_mode": self.bn_mode,
                 **({} if self.finite else {"finite": False})}]


@convention(old_positional=("samples", "params", "bn_mode", "seed"))
def hessian_trace(model: nn.Module, loss_fn: LossFn, data: Batch | Iterable[Batch], *,
                  samples: int = 50, params: Sequence[str] | None = None,
                  mode: str | None = None, seed: int = 0, bn_mode: str | None = None
                  ) -> TraceEstimate:
    """tr(H) of the training loss by Hutchinson's estimator in `mode` (default "train"); costs
    `samples` HVPs.

    Rademacher probes from a generator seeded with `seed` (the global RNG is untouched).
    """
    check_interval("samples", samples, 2, math.inf, kind=int, low_open=False)
    mode = resolve_mode(mode, bn_mode, "train")
    generator = torch.Generator().manual_seed(seed)
    with hessian_operator(model, loss_fn, data, params, mode) as op:
        draws = []
        for _ in range(samples):
            v = torch.randint(0, 2, (op.size,), generator=generator).double() * 2 - 1
            v = v.to(op.gradient.device)
            draws.append(float(torch.dot(v, op(v))))
        measured = op.bn_mode
    values = torch.tensor(draws, dtype=torch.float64)
    return TraceEstimate(float(values.mean()), float(values.std() / samples ** 0.5), samples,
                         measured)


@dataclass
class SpectralDensity(RecordsMixin):
    """Stochastic Lanczos quadrature: per probe vector, Ritz `nodes` and `weights` (summing to 1).

    The density estimate is the average over probes of sum_j weights_j delta(x - nodes_j);
    `smoothed(grid, sigma)` convolves it with a Gaussian of width sigma.
    """

    nodes: list[torch.Tensor]
    weights: list[torch.Tensor]
    bn_mode: str

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
                 "bn_mode": self.bn_mode}
                for i, (xs, ws) in enumerate(zip(self.nodes, self.weights, strict=True))
                for x, w in zip(xs.tolist(), ws.tolist(), strict=True)]


@convention(old_positional=("steps", "probes", "params", "bn_mode", "seed"))
def spectral_density(model: nn.Module, loss_fn: LossFn, data: Batch | Iterable[Batch], *,
                     steps: int = 30, probes: int = 1, params: Sequence[str] | None = None,
                     mode: str | None = None, seed: int = 0, bn_mode: str | None = None
                     ) -> SpectralDensity:
    """Eigenvalue density of the Hessian by stochastic Lanczos quadrature in `mode` (default
    "train"); costs `steps` x `probes` HVPs. Quadrature is exact for polynomials of degree
    < 2 steps. `records()`: the Ritz nodes and their weights per probe vector.
    """
    check_interval("steps", steps, 1, math.inf, kind=int, low_open=False)
    check_interval("probes", probes, 1, math.inf, kind=int, low_open=False)
    mode = resolve_mode(mode, bn_mode, "train")
    nodes, weights = [], []
    with hessian_operator(model, loss_fn, data, params, mode) as op:
        for i in range(probes):
            v0 = _start_vector(op.size, seed + i, op.gradient.device)
            alphas, betas, _, _ = lanczos(op, v0, min(steps, op.size))
            values, vectors = tridiagonal_eigh(alphas, betas)
            nodes.append(values.cpu())
            weights.append((vectors[0] ** 2).cpu())
        measured = op.bn_mode
    return SpectralDensity(nodes, weights, measured)


@register_callback("sharpness")
def sharpness_callback(tol: float = 1e-3, max_iter: int = 30, batch: str = "current"
                       ) -> Callable[[TrainState], None]:
    """lambda_max of the mini-batch loss (train-mode BN, running statistics frozen) beside the
    stability thresholds 2/lr (gradient descent) and 2(1+momentum)/lr (heavy ball).

    `batch="current"` uses the batch of the step; `"first"` keeps the first batch seen, so that
    values over training are on the same data. Cost per call: up to `max_iter` HVPs.
    """
    check_choice("batch", batch, ("current", "first"))
    kept: list[Batch] = []

    def callback(state: TrainState) -> None:
        if batch == "first" and not kept:
            kept.append((state.x.detach().clone(), state.y.detach().clone()))
        data = kept[0] if kept else (state.x, state.y)
        eigs = hessian_eigs(state.model, state.loss_fn, data, tol=tol, max_iter=max_iter)
        momentum = float(state.optimizer.param_groups[0].get("momentum", 0.0) or 0.0)
        lr = state.lr
        rows = [{"quantity": "lambda_max", "value": eigs.values[0], "hvps": eigs.hvps,
                 "converged": eigs.converged, "bn_mode": eigs.bn_mode},
                {"quantity": "two_over_lr", "value": 2.0 / lr if lr > 0 else math.inf},
                {"quantity": "two_one_plus_momentum_over_lr",
                 "value": 2.0 * (1.0 + momentum) / lr if lr > 0 else math.inf}]
        state.context.log_records("sharpness", rows, step=state.step, lr=lr,
                                  momentum=momentum)

    return callback
