"""Random-matrix theory: the Fuss-Catalan law of products of Gaussian matrices (E9), and the
singular values of a network's input-output Jacobian computed from JVPs and VJPs.

Fuss-Catalan law. Let W_1, ..., W_M be independent N x N matrices with i.i.d. N(0, 1/N) entries
and P = W_M ... W_1. As N -> inf the squared singular values x = s^2 of P follow the Fuss-Catalan
distribution with parameter M: support (0, (M+1)^(M+1) / M^M), k-th moment
C(Mk + k, k) / (Mk + 1) (so E[x] = 1 for every M: variance is preserved on average), and a
density with the closed form of Haagerup & Moller (2012; also Penson & Zyczkowski 2011): with
phi in (0, pi / (M+1)),

    x(phi)    = sin((M+1) phi)^(M+1) / (sin(phi) sin(M phi)^M)
    f(x(phi)) = sin(phi)^2 sin(M phi)^(M-1) / (pi sin((M+1) phi)^M).

x(phi) falls monotonically from the upper edge (phi -> 0) to 0 (phi -> pi / (M+1)), so f(x) is
evaluated by solving x(phi) = x for phi (bisection; nothing is fitted). M = 1 is the
Marchenko-Pastur law with ratio 1, f(x) = sqrt((4 - x) / x) / (2 pi), the quarter-circle law
sqrt(4 - s^2) / pi for s. The singular value s = sqrt(x) has density 2 s f(s^2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from normlab.probes._calling import convention, inputs_of
from normlab.probes._hygiene import preserved
from normlab.probes._modes import norm_mode, probe_mode
from normlab.probes._results import RecordsMixin
from normlab.probes._stateless import Stateless
from normlab.utils.config import ConfigError, check_choice, check_interval

JACOBIAN_METHODS = ("auto", "exact", "lanczos", "randomized")
EXACT_MAX_ENTRIES = 2 ** 22  # "auto" materializes J only up to this many entries


def _check_factors(M: int) -> None:
    check_interval("M", M, 1, kind=int, low_open=False)


def fuss_catalan_support(M: int) -> float:
    """The upper edge (M+1)^(M+1) / M^M of the squared singular values (4 for M = 1)."""
    _check_factors(M)
    return (M + 1) ** (M + 1) / M ** M


def fuss_catalan_moment(k: int, M: int) -> float:
    """The k-th moment C(Mk + k, k) / (Mk + 1) of the squared singular values of a product of
    M Gaussian N(0, 1/N) matrices as N -> inf (the Fuss-Catalan number)."""
    check_interval("k", k, 0, kind=int, low_open=False)
    _check_factors(M)
    return math.comb(M * k + k, k) / (M * k + 1)


def _x_of_phi(phi: np.ndarray, M: int) -> np.ndarray:
    return np.sin((M + 1) * phi) ** (M + 1) / (np.sin(phi) * np.sin(M * phi) ** M)


def fuss_catalan_density(x: np.ndarray | float, M: int) -> np.ndarray:
    """The Fuss-Catalan density f(x) of the squared singular values x = s^2 (0 outside the
    support), from the closed-form parametrization in the module docstring; cost: 200 vectorized
    bisection steps. It diverges like x^(-M/(M+1)) at 0 (integrably)."""
    _check_factors(M)
    x = np.asarray(x, dtype=np.float64)
    edge = fuss_catalan_support(M)
    inside = (x > 0) & (x < edge)
    lo = np.zeros(x.shape)  # x(lo) = edge > target
    hi = np.full(x.shape, math.pi / (M + 1))  # x(hi) = 0 < target
    target = np.where(inside, x, edge / 2)
    for _ in range(200):
        mid = (lo + hi) / 2
        above = _x_of_phi(np.maximum(mid, 1e-300), M) > target
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
        if np.all(hi - lo < 1e-15):
            break
    phi = (lo + hi) / 2
    f = (np.sin(phi) ** 2 * np.sin(M * phi) ** (M - 1)
         / (math.pi * np.sin((M + 1) * phi) ** M))
    return np.where(inside, f, 0.0)


def fuss_catalan_cdf(x: np.ndarray | float, M: int, points: int = 20001) -> np.ndarray:
    """P(s^2 <= x) under the Fuss-Catalan law, integrated in the angle phi of the closed form:
    F(x(phi)) = int_phi^(pi/(M+1)) f(x) x |d ln x / d phi'| dphi', whose integrand is bounded
    (no singularity at x = 0); trapezoid rule on `points` angles, then interpolation."""
    _check_factors(M)
    top = math.pi / (M + 1)
    phi = np.linspace(0.0, top, points)  # x(phi) falls from the edge to 0
    phi[0], phi[-1] = 1e-12 * top, (1 - 1e-12) * top  # the ends as limits
    x_grid = _x_of_phi(phi, M)
    log_slope = ((M + 1) ** 2 / np.tan((M + 1) * phi) - 1 / np.tan(phi)
                 - M ** 2 / np.tan(M * phi))
    f_times_x = np.sin((M + 1) * phi) * np.sin(phi) / (math.pi * np.sin(M * phi))
    integrand = f_times_x * np.abs(log_slope)
    steps = (integrand[1:] + integrand[:-1]) / 2 * np.diff(phi)
    upper = np.concatenate([np.cumsum(steps[::-1])[::-1], [0.0]])  # int from phi to the top
    order = np.argsort(x_grid)
    cdf = np.interp(np.asarray(x, dtype=np.float64), x_grid[order], upper[order],
                    left=0.0, right=1.0)
    return np.clip(cdf, 0.0, 1.0)


def fuss_catalan_singular_value_density(s: np.ndarray | float, M: int) -> np.ndarray:
    """The density 2 s f(s^2) of the singular values s (not squared) of the product."""
    s = np.asarray(s, dtype=np.float64)
    return 2 * s * fuss_catalan_density(s * s, M)


def product_singular_values(M: int, N: int, seed: int = 0) -> torch.Tensor:
    """Singular values (descending, float64) of W_M ... W_1 for M independent N x N matrices
    with i.i.d. N(0, 1/N) entries, drawn from a private generator seeded with `seed`; cost:
    M - 1 matrix products and one SVD, O(M N^3)."""
    _check_factors(M)
    check_interval("N", N, 1, kind=int, low_open=False)
    check_interval("seed", seed, 0, kind=int, low_open=False)
    gen = torch.Generator().manual_seed(seed)
    product = torch.eye(N, dtype=torch.float64)
    for _ in range(M):
        w = torch.randn(N, N, generator=gen, dtype=torch.float64) / math.sqrt(N)
        product = w @ product
    return torch.linalg.svdvals(product)


# -- Jacobian spectra ------------------------------------------------------------------------------

@dataclass(frozen=True)
class JacobianSpectrum(RecordsMixin):
    """Singular values of J = d vec(f(X)) / d vec(X) for a batch X, and how they were found.

    `values`: descending float64; all min(out, in) of them for "exact", the top ones (Ritz
    values) for "lanczos" and "randomized". `shape` is (out, in) of J; `products` the number of
    J-vector plus J^T-vector products used; `bn_mode` "train" or "eval".
    """

    values: torch.Tensor
    method: str
    bn_mode: str
    shape: tuple[int, int]
    products: int

    def records(self) -> list[dict]:
        """Tidy records: one 'singular_value' row per value (with its rank) and summaries."""
        rows = [{"quantity": "singular_value", "rank": i, "value": float(v),
                 "bn_mode": self.bn_mode, "method": self.method}
                for i, v in enumerate(self.values.tolist())]
        return rows + [{"quantity": q, "value": v, "bn_mode": self.bn_mode,
                        "method": self.method} for q, v in spectrum_summary(self.values).items()]


def spectrum_summary(values: torch.Tensor, tiny: float = 0.1) -> dict[str, float]:
    """max, min, rms, the share of values below `tiny` x rms (the "tiny singular values" of
    E9), the share of numerical zeros (<= 1e-10 max: null directions, e.g. BN's per-batch
    shift invariance) and the condition number max / min over the nonzero values."""
    v = values.double()
    rms = float(v.square().mean().sqrt())
    largest = float(v.max())
    nonzero = v[v > 1e-10 * largest]
    return {"max": largest, "min": float(v.min()), "rms": rms,
            "condition": largest / float(nonzero.min()) if len(nonzero) else math.inf,
            "tiny_share": float((v < tiny * rms).double().mean()),
            "zero_share": 1.0 - len(nonzero) / len(v)}


class _JacobianOperator:
    """J and J^T as functions, sharing one forward pass (J v by double backward)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> None:
        self.x = x.detach().clone().requires_grad_(True)
        self.out = fn(self.x)
        self.n_in, self.n_out = self.x.numel(), self.out.numel()
        self.dummy = torch.zeros_like(self.out, requires_grad=True)
        # g(u) = J^T u, kept as a graph in u so that J v = d <g(u), v> / du
        (self.vjp_graph,) = torch.autograd.grad(self.out, self.x, self.dummy, create_graph=True)
        self.products = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:  # J v, v in R^in
        self.products += 1
        (jv,) = torch.autograd.grad(self.vjp_graph, self.dummy, v.reshape(self.x.shape),
                                    retain_graph=True)
        return jv.reshape(-1)

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:  # J^T u, u in R^out
        self.products += 1
        (jtu,) = torch.autograd.grad(self.out, self.x, u.reshape(self.out.shape),
                                     retain_graph=True)
        return jtu.reshape(-1)


def _orthogonalize(w: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor:
    for _ in range(2):  # twice is enough (Kahan-Parlett)
        for b in basis:
            w = w - (b @ w) * b
    return w


def golub_kahan_singular_values(op: _JacobianOperator, k: int, seed: int) -> torch.Tensor:
    """Top singular values from k steps of Golub-Kahan-Lanczos bidiagonalization with full
    reorthogonalization; exact (up to rounding) once k = min(out, in).

    A breakdown (an exactly invariant subspace, as for an orthogonal network whose J^T J = I,
    or a null direction) restarts with a random vector orthogonal to the basis found so far
    and records the zero coupling, so repeated and zero singular values are all found.
    """
    gen = torch.Generator().manual_seed(seed)
    dtype, device = op.x.dtype, op.x.device

    def fresh(size: int, basis: list[torch.Tensor]) -> torch.Tensor:
        w = torch.randn(size, generator=gen, dtype=torch.float64).to(device, dtype)
        w = _orthogonalize(w, basis)
        return w / w.norm()

    vs: list[torch.Tensor] = [fresh(op.n_in, [])]
    us: list[torch.Tensor] = []
    alphas: list[float] = []
    betas: list[float] = []
    p = op.matvec(vs[0])
    scale = 0.0
    for j in range(k):
        alpha = float(p.norm())
        scale = max(scale, alpha)
        if alpha <= 1e-10 * scale or alpha == 0.0:  # J v_j has nothing new: a zero coupling
            alphas.append(0.0)
            us.append(fresh(op.n_out, us))
        else:
            alphas.append(alpha)
            us.append(p / alpha)
        if len(vs) == op.n_in and j == k - 1 and len(us) < op.n_out:
            break
        q = _orthogonalize(op.rmatvec(us[-1]) - alphas[-1] * vs[-1], vs)
        beta = float(q.norm())
        if len(vs) == op.n_in:  # V spans the input space: J V = U B is complete
            break
        scale = max(scale, beta)
        if j == k - 1:
            betas.append(beta)
            break
        if beta <= 1e-10 * scale:
            betas.append(0.0)
            vs.append(fresh(op.n_in, vs))
        else:
            betas.append(beta)
            vs.append(q / beta)
        p = _orthogonalize(op.matvec(vs[-1]) - betas[-1] * us[-1], us)
    # J V = U B with B upper bidiagonal (alphas, betas); U^T J = [B | beta_k e_k] [V, v_{k+1}]^T
    # when the loop stops early in k, so the n x (n + 1) matrix holds the Ritz values
    n = len(alphas)
    bidiagonal = torch.zeros(n, n + (len(betas) == n), dtype=torch.float64)
    bidiagonal[range(n), range(n)] = torch.tensor(alphas, dtype=torch.float64)
    for i, beta in enumerate(betas):
        bidiagonal[i, i + 1] = beta
    return torch.linalg.svdvals(bidiagonal)


def randomized_singular_values(op: _JacobianOperator, k: int, seed: int, oversample: int = 10,
                               power: int = 1) -> torch.Tensor:
    """Top-k singular values by a randomized range finder (Halko et al. 2011): J Omega with
    k + oversample probes, `power` subspace iterations, then the SVD of Q^T J."""
    gen = torch.Generator().manual_seed(seed)
    width = min(k + oversample, op.n_in, op.n_out)
    omega = torch.randn(op.n_in, width, generator=gen, dtype=torch.float64).to(op.x)
    y = torch.stack([op.matvec(c) for c in omega.T], dim=1)  # (out, width)
    for _ in range(power):
        q, _ = torch.linalg.qr(y)
        z = torch.stack([op.rmatvec(c) for c in q.T], dim=1)  # (in, width)
        q, _ = torch.linalg.qr(z)
        y = torch.stack([op.matvec(c) for c in q.T], dim=1)
    q, _ = torch.linalg.qr(y)
    qt_j = torch.stack([op.rmatvec(c) for c in q.T], dim=0)  # (width, in) = Q^T J
    return torch.linalg.svdvals(qt_j.double())[:k]


def _exact_singular_values(op: _JacobianOperator) -> torch.Tensor:
    rows = [op.rmatvec(e) for e in torch.eye(op.n_out, dtype=op.x.dtype, device=op.x.device)]
    return torch.linalg.svdvals(torch.stack(rows).double())


@convention(old_positional=("k", "method", "layer", "seed"), takes_loss=False)
def jacobian_singular_values(model: nn.Module, data, *, k: int | None = None,
                             method: str = "auto", layer: str | None = None,
                             seed: int = 0, mode: str = "keep") -> JacobianSpectrum:
    """Singular values of the input-output Jacobian J = d vec(f(X)) / d vec(X) of the batch X,
    `data` = x or (x, y) (y is not used), in `mode` ("keep": the model's own modes; see
    `probes._modes`); cost: one forward plus about 2k backward passes ("lanczos",
    "randomized"; J v by double backward, J^T u by backward) or out x backward ("exact").

    f is the model, or the map from the input to the output of module `layer` (e.g. "stage3"
    of a ResNet: a wide feature map rather than the 10 logits). Without batch coupling J is block
    diagonal, so its singular values are those of the per-example Jacobians d f(x_i) / d x_i
    pooled; with BatchNorm/BatchRenorm in train mode J includes the paths through the batch
    statistics (running statistics are not updated). Nothing of size out x in is built except
    by "exact", which "auto" picks only up to EXACT_MAX_ENTRIES entries (else "lanczos").
    k: number of values for "lanczos"/"randomized" (default: min(out, in), the whole spectrum;
    Lanczos with full reorthogonalization is then exact up to rounding). Lanczos takes
    min(2k + 20, min(out, in)) steps and returns the top k Ritz values. Use float64 models for
    comparisons. The model is left exactly as it was.
    """
    check_choice("method", method, JACOBIAN_METHODS)
    if k is not None:
        check_interval("k", k, 1, kind=int, low_open=False)
    x = inputs_of(data, "jacobian_singular_values")
    if not x.is_floating_point():
        raise ConfigError(f"The 'data' setting of jacobian_singular_values must hold a "
                          f"floating-point input (the Jacobian is taken with respect to it); "
                          f"got {x.dtype} (token ids have none).")
    with preserved(model), probe_mode(model, mode, x):
        fn = _restricted(model, Stateless(model), layer)
        op = _JacobianOperator(fn, x)
        size = op.n_in * op.n_out
        if method == "auto":
            method = "exact" if size <= EXACT_MAX_ENTRIES else "lanczos"
        if method == "exact":
            if size > EXACT_MAX_ENTRIES:
                raise ConfigError(f"The 'method' setting 'exact' would build a {op.n_out} x "
                                  f"{op.n_in} Jacobian (> {EXACT_MAX_ENTRIES} entries); use "
                                  "'lanczos' or 'randomized'.")
            values = _exact_singular_values(op)
        else:
            full = min(op.n_in, op.n_out)
            want = min(k or full, full)
            if method == "lanczos":  # Ritz values after k steps underestimate the top k
                values = golub_kahan_singular_values(op, min(full, 2 * want + 20), seed)[:want]
            else:
                values = randomized_singular_values(op, want, seed)
        return JacobianSpectrum(values.cpu(), method, norm_mode(model, mode, x),
                                (op.n_out, op.n_in), op.products)


def _restricted(model: nn.Module, forward: Stateless, layer: str | None
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> model(x), or x -> the output of module `layer` during model(x) (run by `forward`)."""
    if layer is None:
        return forward
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ConfigError.choice("layer", layer, [n for n in modules if n])

    def fn(x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = modules[layer].register_forward_hook(
            lambda module, inputs, output: captured.append(output))
        try:
            forward(x)
        finally:
            handle.remove()
        return captured[0]

    return fn
