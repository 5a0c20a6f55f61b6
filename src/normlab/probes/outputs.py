"""Output-layer gradients (E7): d ell_i / d logits_i, examples x classes.

Without BN the paper's network predicts one class for every input at initialization, so one
column dominates the heatmap (the gradient is largely input-independent); with BN it varies with
the input.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.probes._calling import convention, one_batch, per_example_losses
from normlab.probes._hygiene import preserved
from normlab.probes._modes import norm_mode, probe_mode
from normlab.probes._results import Records, all_finite, flagged
from normlab.probes._stateless import Stateless


@convention()
def output_gradients(model: nn.Module, loss_fn, data, *, mode: str = "keep") -> Records:
    """d ell_i / d z_i (z_i: example i's logits, ell_i its per-example loss) on one batch
    `data` = (x, y), in `mode` ("keep": the model's own modes); cost: one forward pass and a
    backward through the loss only.

    The logits are held fixed, so batch-coupled norms play no part here: ell_i depends on z_j
    only for j = i. The gradient of a mean-reduced batch loss with respect to z_i is this
    divided by B. For cross-entropy it is softmax(z_i) - onehot(y_i), in [-1, 1].
    Records: example, class_index, label, quantity "output_gradient", value, bn_mode,
    gradient="per_example_loss_grads". Running statistics are not updated.
    """
    x, y = one_batch(data, "output_gradients")
    with preserved(model), probe_mode(model, mode, x):
        with torch.no_grad():
            logits = Stateless(model)(x)
        z = logits.detach().requires_grad_(True)
        losses = per_example_losses(loss_fn, z, y)
        (grad,) = torch.autograd.grad(losses.sum(), z)  # row i = d ell_i / d z_i
        measured = norm_mode(model, mode, x)
        labels = y.tolist()
        rows = [{"example": i, "class_index": c, "label": labels[i],
                 "quantity": "output_gradient", "value": v, "bn_mode": measured, "mode": mode,
                 "gradient": "per_example_loss_grads"}
                for i, row in enumerate(grad.reshape(grad.shape[0], -1).tolist())
                for c, v in enumerate(row)]
        return flagged(rows, all_finite([x, grad]))
