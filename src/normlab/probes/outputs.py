"""Output-layer gradients (E7): d ell_i / d logits_i, examples x classes.

Without BN the paper's network predicts one class for every input at initialization, so one
column dominates the heatmap (the gradient is largely input-independent); with BN it varies with
the input.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.probes._hygiene import bn_mode, frozen_norm_statistics, preserved
from normlab.probes._modules import per_example_losses


def output_gradients(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """d ell_i / d z_i (z_i: example i's logits, ell_i its unreduced loss), in the model's
    current BN mode; cost: one forward pass and a backward through the loss only.

    The logits are held fixed, so batch-coupled norms play no part here: ell_i depends on z_j
    only for j = i. The gradient of a mean-reduced batch loss with respect to z_i is this
    divided by B. For cross-entropy it is softmax(z_i) - onehot(y_i), in [-1, 1].
    Records: example, class_index, label, quantity "output_gradient", value, bn_mode,
    gradient="per_example_loss_grads". Running statistics are not updated.
    """
    with preserved(model), frozen_norm_statistics(model):
        with torch.no_grad():
            logits = model(x)
        z = logits.detach().requires_grad_(True)
        losses = per_example_losses(loss_fn, z, y)
        (grad,) = torch.autograd.grad(losses.sum(), z)  # row i = d ell_i / d z_i
        mode = bn_mode(model)
        labels = y.tolist()
        return [{"example": i, "class_index": c, "label": labels[i],
                 "quantity": "output_gradient", "value": v, "bn_mode": mode,
                 "gradient": "per_example_loss_grads"}
                for i, row in enumerate(grad.reshape(grad.shape[0], -1).tolist())
                for c, v in enumerate(row)]
