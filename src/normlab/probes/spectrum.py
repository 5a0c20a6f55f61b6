"""The spectrum of the per-example gradient matrix: how much of it is one shared direction.

For a layer, G is the B x P matrix whose rows are the per-example gradients (flattened weight and
bias of the layer, concatenated). Its singular values come from the B x B Gram matrix G G^T
(eigvalsh, in float64), so P may be large. Quantities per layer:

- singular values sigma_1 >= ... >= sigma_B;
- energy share of the top direction, sigma_1^2 / sum_k sigma_k^2 (1 for a rank-one G);
- effective rank exp(H(p)), H the entropy of p_k = sigma_k^2 / sum sigma^2 (1 for rank one,
  B for B orthogonal rows of equal norm; Roy & Vetterli's definition applied to sigma^2);
- mean pairwise cosine of the rows (over pairs i != j; a zero row has cosine 0 with all);
- the top right-singular vector v_1 = G^T u_1 / sigma_1, an estimate of the data-independent
  gradient direction, signed so that <v_1, sum_i g_i> >= 0; and its |cosine| with the mean row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from normlab.probes.per_example import per_example_contributions, per_example_loss_grads
from normlab.train.callbacks import TrainState, register_callback
from normlab.utils.config import ConfigError, check_choice, check_interval

QUANTITIES = ("per_example_loss_grads", "per_example_contributions")


def gradient_spectrum(per_example_grads: Mapping[str, torch.Tensor], *,
                      gradient: str | None = None, bn_mode: str | None = None,
                      return_directions: bool = False):
    """Singular values, top-direction energy share, effective rank, mean pairwise cosine and
    top right-singular vector of each layer's B x P per-example gradient matrix; cost
    O(B^2 P) per layer (memory B x B plus one chunk of B x P).

    `per_example_grads` maps parameter names to (B, *shape) tensors, typically the result of
    `per_example_loss_grads` or `per_example_contributions` (whose `.quantity`, `.bn_mode` and
    `.layers` are used); `gradient` and `bn_mode` override or supply those labels.
    Records: layer, depth, quantity ("singular_value" with `index`, "energy_share_top",
    "effective_rank", "mean_pairwise_cosine", "top_direction_mean_cosine"), value, bn_mode,
    gradient, batch. With `return_directions` returns (records, {layer: v_1 as a dict
    parameter name -> tensor shaped like the parameter}).
    """
    gradient = gradient or getattr(per_example_grads, "quantity", None)
    if gradient is None:
        raise ConfigError("The 'gradient' setting must name the per-example quantity "
                          "('per_example_loss_grads' or 'per_example_contributions') when the "
                          "gradients do not carry it.")
    bn_mode = bn_mode or getattr(per_example_grads, "bn_mode", None)
    owners = getattr(per_example_grads, "layers", {})
    groups: dict[str, list[str]] = {}
    for name in per_example_grads:
        owner = owners.get(name, (name.rsplit(".", 1)[0] if "." in name else name, None))[0]
        groups.setdefault(owner, []).append(name)
    records, directions = [], {}
    for layer, names in groups.items():
        tensors = [per_example_grads[n] for n in names]
        depth = owners.get(names[0], (layer, None))[1]
        values, top = layer_spectrum(tensors)
        base = {"layer": layer, "depth": depth, "bn_mode": bn_mode, "gradient": gradient,
                "batch": tensors[0].shape[0]}
        for k, s in enumerate(values["singular_values"], 1):
            records.append({**base, "quantity": "singular_value", "index": k, "value": s})
        for q in ("energy_share_top", "effective_rank", "mean_pairwise_cosine",
                  "top_direction_mean_cosine"):
            records.append({**base, "quantity": q, "value": values[q]})
        directions[layer] = {n: v.reshape(per_example_grads[n].shape[1:])
                             for n, v in zip(names, top, strict=True)}
    return (records, directions) if return_directions else records


def layer_spectrum(tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
    """The spectrum quantities of the matrix whose rows are the concatenated, flattened
    per-example tensors, and the top right-singular vector split back per tensor."""
    rows = [t.reshape(t.shape[0], -1) for t in tensors]  # (B, P_k) each, views
    batch = rows[0].shape[0]
    gram = sum(r.double() @ r.double().T for r in rows)  # (B, B) = G G^T, float64
    eigvals, eigvecs = torch.linalg.eigh(gram)  # ascending
    sigma2 = eigvals.flip(0).clamp_min(0)
    total = sigma2.sum().item()
    out: dict = {"singular_values": sigma2.sqrt().tolist()}
    if total <= 0:
        out.update(energy_share_top=float("nan"), effective_rank=float("nan"),
                   mean_pairwise_cosine=float("nan"), top_direction_mean_cosine=float("nan"))
        return out, [torch.zeros_like(r[0], dtype=torch.float64) for r in rows]
    p = sigma2 / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    norms = gram.diagonal().clamp_min(0).sqrt()
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    cosines = gram / safe[:, None] / safe[None, :]
    cosines = torch.where((norms[:, None] > 0) & (norms[None, :] > 0), cosines,
                          torch.zeros_like(cosines))
    pairs = batch * (batch - 1)
    mean_cos = ((cosines.sum() - cosines.diagonal().sum()) / pairs).item() if pairs else math.nan
    u1, s1 = eigvecs[:, -1], sigma2[0].sqrt()
    top = [r.double().T @ u1 / s1 for r in rows]  # v_1 = G^T u_1 / sigma_1, per tensor
    mean_row = [r.double().mean(dim=0) for r in rows]
    dot = sum((t * m).sum() for t, m in zip(top, mean_row, strict=True))
    if dot < 0:
        top = [-t for t in top]
    mean_norm = math.sqrt(sum((m * m).sum().item() for m in mean_row))
    out.update(energy_share_top=(sigma2[0] / total).item(), effective_rank=math.exp(entropy),
               mean_pairwise_cosine=mean_cos,
               top_direction_mean_cosine=abs(dot.item()) / mean_norm if mean_norm > 0
               else float("nan"))
    return out, top


@register_callback("gradient_spectrum")
def gradient_spectrum_callback(gradient: str = "per_example_loss_grads", examples: int = 32,
                               params: Sequence[str] | None = None):
    """Log `gradient_spectrum` of `gradient` (either per-example quantity) on the first
    `examples` examples of the current mini-batch (records tagged with the step)."""
    check_choice("gradient", gradient, QUANTITIES)
    check_interval("examples", examples, 2, kind=int, low_open=False)

    def callback(state: TrainState) -> None:
        x, y = state.x[:examples], state.y[:examples]
        if gradient == "per_example_loss_grads":
            grads = per_example_loss_grads(state.model, state.loss_fn, (x, y), params=params)
        else:
            grads = per_example_contributions(state.model, state.loss_fn, (x, y))
        state.context.log_records("gradient_spectrum", gradient_spectrum(grads), step=state.step)

    return callback
