"""The one calling convention of the probes: `probe(model, loss_fn, data, *, options)`.

`data` is one batch `(x, y)` or an iterable of batches. Probes that measure exactly one batch
(per-example gradients, coherence, histograms, output gradients, step_loss, radial_tangential)
refuse an iterable with a message saying so. Probes without a loss take `(model, data, *, ...)`
where `data` is `(x, y)` or `x`.

`loss_fn` is either
- a reduced loss module or function with a `reduction` setting (`nn.CrossEntropyLoss()`,
  `F.mse_loss`): the batch loss is `loss_fn(out, y)` as given, the per-example loss ell_i is
  `reduction="none"` summed over an example's outputs for reduction="sum" and averaged for
  "mean" (so a mean-reduced MSE on (B, D) targets is (1/B) sum_i ell_i, a sum-reduced one
  sum_i ell_i); or
- any callable returning one loss per example, shape (B,) (`lambda out, y:
  F.cross_entropy(out, y, reduction="none")`): the batch loss is their mean.

Every probe treats the old call forms alike (`convention`): `x, y` as two arguments, `x=`/`y=`,
`bn_mode=` and options by position work for one release with a DeprecationWarning that shows
the new form; anything else is refused with a message that shows it.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from normlab.probes._batches import Batch
from normlab.utils.config import ConfigError


def is_batch(data: object) -> bool:
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and isinstance(data[0], torch.Tensor) and isinstance(data[1], torch.Tensor))


def check_batch(batch: Batch, probe: str) -> Batch:
    """A non-empty (x, y) pair with as many labels as inputs."""
    x, y = batch
    if x.dim() == 0 or x.shape[0] == 0:
        raise ConfigError(f"The 'data' setting of {probe} must hold at least one example; "
                          f"got a batch of shape {tuple(x.shape)}.")
    if y.dim() == 0 or y.shape[0] != x.shape[0]:
        raise ConfigError(f"The 'data' setting of {probe} must pair each input with a target; "
                          f"got x of shape {tuple(x.shape)} and y of shape {tuple(y.shape)}.")
    return x, y


def one_batch(data: object, probe: str) -> Batch:
    """`data` as one checked (x, y) batch; an iterable of batches is refused."""
    if is_batch(data):
        return check_batch((data[0], data[1]), probe)  # type: ignore[index]
    raise ConfigError(f"The 'data' setting of {probe} must be one (x, y) batch: this probe "
                      f"measures a single batch; got {type(data).__name__}. Pass one batch, "
                      f"e.g. next(iter(loader)).")


def batch_list(data: object, probe: str) -> list[Batch]:
    """`data` (one (x, y) batch or an iterable of them) as a list of checked batches."""
    if is_batch(data):
        return [check_batch((data[0], data[1]), probe)]  # type: ignore[index]
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise ConfigError(f"The 'data' setting of {probe} must be an (x, y) batch or an iterable "
                          f"of (x, y) batches; got {type(data).__name__}.")
    batches = [b for b in data]
    if not batches:
        raise ConfigError(f"The 'data' setting of {probe} must hold at least one (x, y) batch; "
                          "got none.")
    if not all(is_batch(b) for b in batches):
        raise ConfigError(f"The 'data' setting of {probe} must be an (x, y) batch or an iterable "
                          f"of (x, y) batches; got an item of type {type(batches[0]).__name__}.")
    return [check_batch((b[0], b[1]), probe) for b in batches]


def inputs_of(data: object, probe: str) -> torch.Tensor:
    """The input tensor of `data` (an `x` tensor or an (x, y) batch) for probes without a loss."""
    x = data[0] if is_batch(data) else data  # type: ignore[index]
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"The 'data' setting of {probe} must be an input tensor x or an (x, y) "
                          f"batch; got {type(data).__name__}.")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ConfigError(f"The 'data' setting of {probe} must hold at least one example; got "
                          f"an input of shape {tuple(x.shape)}.")
    return x


# -- losses ---------------------------------------------------------------------------------------

def _reduction(loss_fn: object) -> str | None:
    return getattr(loss_fn, "reduction", None)


def per_example_losses(loss_fn: Callable, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ell_i, the loss of each example, shape (B,) (see the module docstring for the convention;
    a loss module is copied with reduction="none", the original is not touched)."""
    reduction = _reduction(loss_fn)
    if isinstance(loss_fn, nn.Module) and reduction is not None:
        unreduced = copy.copy(loss_fn)
        unreduced.reduction = "none"
        losses = unreduced(output, y)
    else:
        try:
            losses = loss_fn(output, y, reduction="none")
        except TypeError:
            losses = loss_fn(output, y)
            reduction = "mean"
    if losses.dim() == 0:
        raise ConfigError(f"The 'loss_fn' setting must be a loss with a 'reduction' setting or a "
                          f"callable returning one loss per example; {loss_fn!r} returned one "
                          f"number for the batch.")
    if losses.shape[0] != output.shape[0]:
        raise ConfigError(f"The 'loss_fn' setting must give one loss per example (first dim "
                          f"{output.shape[0]}); got shape {tuple(losses.shape)}.")
    if losses.dim() > 1:  # several outputs per example: reduce them as the batch loss does
        flat = losses.reshape(losses.shape[0], -1)
        losses = flat.sum(dim=1) if reduction == "sum" else flat.mean(dim=1)
    return losses


def batch_loss(loss_fn: Callable, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The batch loss: `loss_fn(output, y)`, or the mean of a per-example callable's losses."""
    loss = loss_fn(output, y)
    if loss.dim() == 0:
        return loss
    if loss.shape[0] == output.shape[0] and _reduction(loss_fn) is None:
        return loss.reshape(loss.shape[0], -1).mean(dim=1).mean()
    raise ConfigError(f"The 'loss_fn' setting must return the batch loss (a number) or one loss "
                      f"per example; got shape {tuple(loss.shape)}.")


# -- old call forms -------------------------------------------------------------------------------

def _deprecated(message: str) -> None:
    warnings.warn(message + " This form will be removed in the next release.",
                  DeprecationWarning, stacklevel=3)


def convention(old_positional: tuple[str, ...] = (), takes_loss: bool = True) -> Callable:
    """The one calling convention, `probe(model, loss_fn, data, *, options)` (`probe(model,
    data, *, options)` without a loss), with every probe's old forms treated alike: accepted
    for one release with a DeprecationWarning that shows the new form, or refused with a
    message that shows it.

    Accepted: `x, y` as two arguments where the data goes, `x=`/`y=` keywords, `bn_mode=`
    (now `mode=`), and the options named in `old_positional` by position in their old order.
    Refused (TypeError or ConfigError): more positional arguments than that, a tensor where
    the loss goes, and `bn_mode` together with a different `mode`."""

    def wrap(fn: Callable) -> Callable:
        name = fn.__name__
        lead = 2 if takes_loss else 1  # (loss_fn, data) or (data,)
        form = f"{name}(model, {'loss_fn, ' if takes_loss else ''}(x, y), option=...)"

        @functools.wraps(fn)
        def probe(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
            args = list(args)
            if len(args) > lead and isinstance(args[lead - 1], torch.Tensor) \
                    and isinstance(args[lead], torch.Tensor):
                _deprecated(f"Passing x and y as two arguments to {name}() is deprecated; "
                            f"pass the batch as one: {form}.")
                args[lead - 1:lead + 1] = [(args[lead - 1], args[lead])]
            if "x" in kwargs or "y" in kwargs:
                _deprecated(f"The x= and y= arguments of {name}() are deprecated; pass the "
                            f"batch as data=(x, y): {form}.")
                x, y = kwargs.pop("x", None), kwargs.pop("y", None)
                kwargs["data"] = x if y is None else (x, y)
            if takes_loss and args and isinstance(args[0], torch.Tensor):
                raise ConfigError(f"The 'loss_fn' setting of {name} must be a loss (e.g. "
                                  f"nn.CrossEntropyLoss()); got a tensor. The call form is "
                                  f"{form}.")
            extra = args[lead:]
            if len(extra) > len(old_positional):
                raise TypeError(f"{name}() takes {lead + 1} positional arguments (model, "
                                f"{'loss_fn, ' if takes_loss else ''}data) and its options by "
                                f"keyword; got {lead + 1 + len(extra)}. The call form is "
                                f"{form}.")
            if extra:
                names = old_positional[:len(extra)]
                _deprecated(f"Passing {', '.join(names)} to {name}() by position is deprecated; "
                            f"pass {'them' if len(names) > 1 else 'it'} by keyword: "
                            f"{name}(..., {', '.join(f'{n}=...' for n in names)}).")
                for key, value in zip(names, extra, strict=False):
                    if key in kwargs:
                        raise TypeError(f"{name}() got {key!r} both by position and by "
                                        f"keyword.")
                    kwargs[key] = value
            if "bn_mode" in kwargs:
                bn_mode = kwargs.pop("bn_mode")
                if bn_mode is not None:
                    if kwargs.get("mode") not in (None, bn_mode):
                        raise ConfigError(f"The 'bn_mode' setting of {name} (deprecated) and "
                                          f"its 'mode' setting disagree: {bn_mode!r} and "
                                          f"{kwargs['mode']!r}; pass mode only.")
                    _deprecated(f"The 'bn_mode' argument of {name}() is deprecated; use "
                                f"mode='train', 'eval' or 'keep'.")
                    kwargs["mode"] = bn_mode
            return fn(model, *args[:lead], **kwargs)

        return probe

    return wrap
