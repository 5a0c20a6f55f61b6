"""Probes compute in exact float32: TF32 (cuBLAS, cuDNN) and oneDNN's bf16/TF32 are off inside
every probe and restored afterwards, whatever API the user set them with.

torch keeps these settings on a CPU build too, so the switch and its restoration are checked
here; that the kernels honour them is torch's part (and the `device` tests' on a GPU).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab.probes._hygiene import FLOAT32_SETTINGS, exact_float32
from test_probe_zoo import PROBES
from zoo import ZooCase


def legacy(read):
    try:
        return read()
    except RuntimeError as err:  # torch refuses to name a state its legacy API cannot express
        return f"unreadable: {str(err)[:40]}"


def settings() -> dict:
    """Every float32-precision setting torch has, new API and legacy."""
    return {**{key: torch._C._get_fp32_precision_getter(*key) for key in FLOAT32_SETTINGS},
            "matmul_precision": legacy(torch.get_float32_matmul_precision),
            "cublas_tf32": legacy(lambda: torch.backends.cuda.matmul.allow_tf32),
            "cudnn_tf32": legacy(lambda: torch.backends.cudnn.allow_tf32)}


EXACT = {**{key: "ieee" for key in FLOAT32_SETTINGS}, "matmul_precision": "highest",
         "cublas_tf32": False, "cudnn_tf32": False}


def set_fp32(backend: str, op: str, value: str) -> None:
    torch._C._set_fp32_precision_setter(backend, op, value)


USER_STATES = {
    "torch's defaults (cuDNN in TF32)": lambda: None,
    "legacy 'high'": lambda: torch.set_float32_matmul_precision("high"),
    "legacy 'medium' (oneDNN bf16)": lambda: torch.set_float32_matmul_precision("medium"),
    "legacy cuDNN off": lambda: setattr(torch.backends.cudnn, "allow_tf32", False),
    "new API, conv exact and rnn TF32": lambda: set_fp32("cuda", "conv", "ieee"),
    "new API, bf16 oneDNN matmul": lambda: (torch.set_float32_matmul_precision("high"),
                                            set_fp32("mkldnn", "matmul", "bf16")),
}


@pytest.fixture
def torch_defaults():
    """Each test starts from and leaves torch's default settings."""
    def reset():
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = True
        for key in FLOAT32_SETTINGS:
            set_fp32(*key, "tf32" if key in (("cuda", "conv"), ("cuda", "rnn")) else "none")

    reset()
    yield
    reset()


@pytest.mark.parametrize("state", USER_STATES)
def test_exact_float32_turns_everything_off_and_restores_the_users_settings(state,
                                                                           torch_defaults):
    USER_STATES[state]()
    before = settings()
    with exact_float32():
        assert settings() == EXACT
    assert settings() == before
    with pytest.raises(KeyError), exact_float32():
        raise KeyError("a probe that fails")
    assert settings() == before


class Spy(nn.Module):
    """Records the float32 settings at every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(settings())
        return x


@pytest.mark.parametrize("probe_name", PROBES.names())
def test_every_probe_runs_in_exact_float32(probe_name, torch_defaults):
    torch.set_float32_matmul_precision("high")  # a user who asked for TF32 matmuls
    before = settings()
    torch.manual_seed(0)
    spy = Spy()
    model = nn.Sequential(nn.Linear(5, 6), spy, nn.Tanh(), nn.Linear(6, 3)).double()
    x, x2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    y, y2 = torch.randint(0, 3, (6,)), torch.randint(0, 3, (6,))
    PROBES.get(probe_name).run(ZooCase(model, x, y, x2, y2, nn.CrossEntropyLoss()))
    assert spy.seen and all(seen == EXACT for seen in spy.seen)
    assert settings() == before
