"""Shared test settings: deterministic torch, a headless matplotlib, and the test device.

`NORMLAB_TEST_DEVICE` (default "cpu") names the device that tests marked `device` run on, e.g.
`NORMLAB_TEST_DEVICE=cuda bash scripts/test.sh -m device` runs every probe's ground-truth and
hygiene test on a GPU. Those tests take the device from the `device` fixture.
"""

import os

import matplotlib
import pytest
import torch

from mlflow_server import module_server, server  # noqa: F401 (fixtures of the MLflow tests)

matplotlib.use("Agg")


def _test_device() -> torch.device:
    name = os.environ.get("NORMLAB_TEST_DEVICE", "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise pytest.UsageError(
            f"NORMLAB_TEST_DEVICE={name!r} is not a torch device: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"NORMLAB_TEST_DEVICE={name!r} but CUDA is not available here.")
    return device


def pytest_configure(config: pytest.Config) -> None:
    """A device this machine does not have stops the session before any test, with one line."""
    _test_device()


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device that `device`-marked tests run on (NORMLAB_TEST_DEVICE, default cpu)."""
    return _test_device()


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
