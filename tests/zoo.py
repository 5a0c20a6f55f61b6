"""A zoo of small user-style models, declared by registration, for the probes' zoo tests.

Each entry builds a `ZooCase` on a device: a model as a user would write it (train mode), one
batch, a second batch, a loss, and a dtype. A new model joins every probe's ground-truth and
hygiene test with `@register_zoo("name")`. Models stay tiny (at most a few hundred parameters)
so that brute-force references (a backward per example, a dense Hessian) stay cheap.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

from normlab.utils.registry import Registry


@dataclass
class ZooCase:
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    x2: torch.Tensor
    y2: torch.Tensor
    loss_fn: Callable
    coupled: bool = False  # the batch forward couples examples (BN in train mode, user layer)
    name: str = ""
    # the dense-Hessian reference by central differences of gradients, not torch's double
    # backward (which is wrong through weight_norm)
    hessian_by_differences: bool = False

    @property
    def data(self):
        return (self.x, self.y)

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def rtol(self) -> float:
        """Relative tolerance of a ground-truth comparison at this dtype (TF32 is off)."""
        return 1e-8 if self.dtype == torch.float64 else 2e-3


ZOO: Registry[Callable[[torch.device], ZooCase]] = Registry("zoo model")


def register_zoo(name: str):
    """Add a builder `fn(device) -> ZooCase` to the zoo under `name`."""
    def decorator(build):
        def named(device: torch.device) -> ZooCase:
            case = build(device)
            case.name = name
            return case

        ZOO.register(name)(named)
        return build

    return decorator


def _classes(x: torch.Tensor, classes: int = 3, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, (x.shape[0],), generator=gen).to(x.device)


def _case(model: nn.Module, shape: tuple[int, ...], device: torch.device,
          dtype: torch.dtype = torch.float32, loss_fn: Callable | None = None,
          target: Callable | None = None, coupled: bool = False, batch: int = 6) -> ZooCase:
    gen = torch.Generator().manual_seed(0)
    model = model.to(device=device, dtype=dtype).train()
    x = torch.randn(batch, *shape, generator=gen, dtype=dtype).to(device)
    x2 = torch.randn(batch, *shape, generator=gen, dtype=dtype).to(device)
    target = target or _classes
    return ZooCase(model, x, target(x), x2, target(x2, seed=2),
                   loss_fn or nn.CrossEntropyLoss(), coupled)


@register_zoo("sequential_mlp")
def sequential_mlp(device):
    torch.manual_seed(0)
    return _case(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)), (5,), device)


@register_zoo("float64_mlp")
def float64_mlp(device):
    torch.manual_seed(0)
    return _case(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)), (5,), device,
                 dtype=torch.float64)


class ResidualCNN(nn.Module):
    """conv-BN-relu stem, one residual block (conv-BN-relu-conv-BN + identity), pool, linear."""

    def __init__(self, width: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 3)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))  # (B, C, H, W)
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean(dim=(2, 3)))


@register_zoo("residual_cnn_bn")
def residual_cnn(device):
    torch.manual_seed(0)
    return _case(ResidualCNN(), (2, 3, 3), device, dtype=torch.float64, coupled=True)


class Tied(nn.Module):
    """Two linear layers sharing one weight (registered in both modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


@register_zoo("tied_weights")
def tied_weights(device):
    torch.manual_seed(0)
    return _case(Tied(), (4,), device, dtype=torch.float64)


class FrozenAndUnused(nn.Module):
    """A frozen first layer, a trained head, and a layer that forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(5, 6)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(6, 3)
        self.unused = nn.Linear(6, 6)

    def forward(self, x):
        return self.head(torch.relu(self.frozen(x)))


@register_zoo("frozen_and_unused")
def frozen_and_unused(device):
    torch.manual_seed(0)
    return _case(FrozenAndUnused(), (5,), device)


@register_zoo("dropout_mlp")
def dropout_mlp(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    return _case(model, (5,), device, dtype=torch.float64)


class TransposedConvNet(nn.Module):
    """ConvTranspose2d - BN - relu - conv - pool - linear."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 3, 2, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        x = self.conv(torch.relu(self.bn(self.up(x))))  # (B, 2, 2H, 2W)
        return self.fc(x.mean(dim=(2, 3)))


@register_zoo("conv_transpose_bn")
def conv_transpose(device):
    torch.manual_seed(0)
    return _case(TransposedConvNet(), (2, 3, 3), device, dtype=torch.float64, coupled=True)


@register_zoo("conv1d_groupnorm")
def conv1d(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 5, 3))
    return _case(model, (2, 5), device, dtype=torch.float64)


class TokenBlock(nn.Module):
    """LayerNorm on (B, T, D) tokens, a linear mixer, mean over tokens, a regression head."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.mix = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, x):  # (B, T, D)
        return self.head(self.norm(torch.relu(self.mix(x))).mean(dim=1))  # (B, 2)


@register_zoo("layernorm_tokens_sum_mse")
def layernorm_tokens(device):
    torch.manual_seed(0)

    def target(x, seed=1):
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(x.shape[0], 2, generator=gen, dtype=x.dtype).to(x.device)

    return _case(TokenBlock(), (3, 4), device, dtype=torch.float64,
                 loss_fn=nn.MSELoss(reduction="sum"), target=target)


class Hooked(nn.Sequential):
    """An MLP with the hooks users add: a forward hook that logs with .item() and stores the
    activation, and a full backward hook that stores output gradients."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
        self.seen: list = []
        self[0].register_forward_hook(
            lambda m, i, o: self.seen.append((float(o.abs().mean().item()), o.detach())))
        self[2].register_full_backward_hook(lambda m, gi, go: self.seen.append(go[0].detach()))


@register_zoo("user_hooks")
def user_hooks(device):
    torch.manual_seed(0)
    return _case(Hooked(), (5,), device, dtype=torch.float64)


class CenterOverBatch(nn.Module):
    """A user's own batch-coupled layer (not a torch norm): subtract the batch mean."""

    def forward(self, x):
        return x - x.mean(dim=0, keepdim=True)


@register_zoo("user_batch_coupled")
def user_batch_coupled(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), CenterOverBatch(), nn.Tanh(), nn.Linear(6, 3))
    return _case(model, (5,), device, dtype=torch.float64, coupled=True)


@register_zoo("channels_last_cnn")
def channels_last_cnn(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))
    case = _case(model, (2, 4, 4), device)
    case.model.to(memory_format=torch.channels_last)
    case.x = case.x.contiguous(memory_format=torch.channels_last)
    return case


class UserBatchNorm(nn.Module):
    """A user's own BatchNorm (not a torch class): batch statistics in train mode (updating its
    running statistics), running statistics in eval mode, a per-channel affine."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(channels))
        self.bias = nn.Parameter(0.1 * torch.randn(channels))
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("var", torch.ones(channels))

    def forward(self, x):  # (B, C, H, W)
        if self.training:
            mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
            with torch.no_grad():
                self.mean.lerp_(mean, 0.1)
                self.var.lerp_(var, 0.1)
        else:
            mean, var = self.mean, self.var
        xhat = (x - mean[:, None, None]) / (var[:, None, None] + 1e-5).sqrt()
        return xhat * self.weight[:, None, None] + self.bias[:, None, None]


class ReZeroBlock(nn.Module):
    """x + alpha * relu(norm(conv(x))), alpha = 0 at initialization (ReZero / SkipInit)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm = UserBatchNorm(width)
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x + self.alpha * torch.relu(self.norm(self.conv(x)))


class ReZeroNet(nn.Module):
    """conv stem, one ReZero-gated block with the user's BatchNorm, pool, linear head: at
    initialization the batch-coupled path is gated off, so forward values do not show it."""

    def __init__(self, width: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, width, 3, padding=1)
        self.block = ReZeroBlock(width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.block(torch.tanh(self.stem(x))).mean(dim=(2, 3)))


@register_zoo("rezero_user_batchnorm")
def rezero_user_batchnorm(device):
    torch.manual_seed(0)
    return _case(ReZeroNet(), (2, 3, 3), device, dtype=torch.float64, coupled=True)


class TiedEmbeddingLM(nn.Module):
    """Tokens -> embedding -> tanh(linear) -> logits by a head tied to the embedding matrix;
    one next-token prediction per position: logits (B, vocabulary, T)."""

    def __init__(self, vocabulary: int = 7, dim: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocabulary, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):  # (B, T) integers
        h = torch.tanh(self.mix(self.embed(tokens)))  # (B, T, D)
        return self.head(h).transpose(1, 2)  # (B, V, T)


@register_zoo("tied_embedding_lm")
def tied_embedding_lm(device):
    torch.manual_seed(0)
    model = TiedEmbeddingLM().to(device=device, dtype=torch.float64).train()
    gen = torch.Generator().manual_seed(0)
    x, x2 = (torch.randint(0, 7, (6, 5), generator=gen).to(device) for _ in range(2))
    y, y2 = (torch.randint(0, 7, (6, 5), generator=gen).to(device) for _ in range(2))
    return ZooCase(model, x, y, x2, y2, nn.CrossEntropyLoss())


class WeightNormedConvNet(nn.Module):
    """A weight-normed conv (torch.nn.utils.parametrizations.weight_norm), tanh, pool, a
    spectrally normalized linear layer (parametrizations.spectral_norm), tanh, a plain head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = weight_norm(nn.Conv2d(2, 3, 3, padding=1))
        self.mix = spectral_norm(nn.Linear(3, 3))
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(torch.tanh(self.conv(x)).mean(dim=(2, 3)))))


@register_zoo("weight_normed_conv")
def weight_normed_conv(device):
    torch.manual_seed(0)
    case = _case(WeightNormedConvNet(), (2, 3, 3), device, dtype=torch.float64)
    case.hessian_by_differences = True  # torch's double backward through weight_norm is wrong
    return case


class FoldedFrames(nn.Module):
    """A temporal model that folds frames into the batch: a frame encoder on (B*T, F) rows, a
    mixer on time-major (T*B, H) rows, a mean over time and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Linear(3, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # (B, T, F)
        batch, frames, features = x.shape
        h = torch.tanh(self.encode(x.reshape(batch * frames, features)))  # (B*T, H)
        h = h.reshape(batch, frames, -1).transpose(0, 1).reshape(frames * batch, -1)  # (T*B, H)
        h = torch.tanh(self.mix(h)).reshape(frames, batch, -1)  # (T, B, H)
        return self.head(h.mean(dim=0))


@register_zoo("folded_frames")
def folded_frames(device):
    torch.manual_seed(0)
    return _case(FoldedFrames(), (4, 3), device, dtype=torch.float64)


class OutputHooked(nn.Sequential):
    """An MLP whose first layer's output a user's forward hook changes (a nonlinear map)."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
        self[0].register_forward_hook(lambda m, i, o: o * torch.sigmoid(o) + 0.5)


@register_zoo("output_changing_hook")
def output_changing_hook(device):
    torch.manual_seed(0)
    return _case(OutputHooked(), (5,), device, dtype=torch.float64)


def _register_norm_kinds() -> None:
    """normlab's own norms, one tiny conv net each (so `-m device` covers every norm on a GPU)."""
    from cases import NORM_KINDS, TinyConvNet

    for norm in NORM_KINDS:
        def build(device, norm=norm):
            torch.manual_seed(0)
            return _case(TinyConvNet(norm, channels=2), (3, 4, 4), device, dtype=torch.float64,
                         coupled=norm in ("batch", "batch_renorm"))

        register_zoo(f"tiny_convnet_{norm}")(build)


_register_norm_kinds()


def in_mode(model: nn.Module, mode: str) -> nn.Module:
    """A deep copy of `model` set up as the probe mode says (the test's own reading of it):
    "train": normalization layers (torch's, normlab's and the zoo's own) train, every other
    module eval; "eval": all eval."""
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, UserBatchNorm)
    other = copy.deepcopy(model)
    for m in other.modules():
        m.training = mode == "train" and isinstance(m, norms)
    return other
