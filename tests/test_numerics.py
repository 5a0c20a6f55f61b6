"""The numerics of a run: set for the run (TF32 off unless asked, `deterministic` on request),
restored afterwards, and recorded in every result's provenance (thread count, TF32, cuDNN,
deterministic algorithms, pack size, device model, torch version)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from normlab.execute.packing import pack_key
from normlab.runs.result import numerics
from normlab.runs.spec import RunSpec
from normlab.runs.tasks import RunContext, task_problems
from normlab.train import TrainState, train
from normlab.train.graphed import cudnn_autotuned
from normlab.train.packed import train_packed
from normlab.utils.config import ConfigError

TINY = RunSpec(model="mlp", depth=3, width=8, batch_size=64, steps=4, device="cpu", seed=1)
FLAGS = {"tf32_matmul": lambda: torch.backends.cuda.matmul.allow_tf32,
         "tf32_cudnn": lambda: torch.backends.cudnn.allow_tf32,
         "cudnn_benchmark": lambda: torch.backends.cudnn.benchmark,
         "cudnn_deterministic": lambda: torch.backends.cudnn.deterministic,
         "deterministic_algorithms": torch.are_deterministic_algorithms_enabled}


class FlagsSeen:
    """A callback that notes the global numeric flags while the run is in progress."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    def __call__(self, state: TrainState) -> None:
        self.seen = {name: read() for name, read in FLAGS.items()}


@pytest.fixture
def tf32_on_outside():
    """torch's CUDA defaults made explicit: TF32 on for both (matmul's default is off)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def run_seeing_flags(spec: RunSpec) -> tuple[dict[str, Any], dict[str, Any], list[dict]]:
    """(flags during the run, the result's provenance, metric rows)."""
    seen, context = FlagsSeen(), RunContext()
    result = train(spec, callbacks=[seen], context=context)
    return seen.seen, result.provenance, context.metrics


@pytest.mark.parametrize(("options", "during"), [
    ({}, {"tf32_matmul": False, "tf32_cudnn": False, "cudnn_deterministic": False,
          "deterministic_algorithms": False}),
    ({"tf32": True}, {"tf32_matmul": True, "tf32_cudnn": True, "deterministic_algorithms": False}),
    ({"deterministic": True}, {"tf32_matmul": False, "tf32_cudnn": False,
                               "cudnn_benchmark": False, "cudnn_deterministic": True,
                               "deterministic_algorithms": True}),
], ids=["default", "tf32", "deterministic"])
def test_a_run_sets_records_and_restores_its_numerics(tf32_on_outside, options, during):
    before = {name: read() for name, read in FLAGS.items()}
    seen, recorded, _ = run_seeing_flags(TINY.replace(options=options))
    assert {k: seen[k] for k in during} == during  # in force while the run ran
    assert {k: recorded[k] for k in during} == during  # and recorded as such
    assert {name: read() for name, read in FLAGS.items()} == before  # restored after
    assert recorded["cublas_workspace_config"] == (":4096:8" if "deterministic" in options
                                                  else None)


def test_provenance_records_threads_device_model_and_pack_size(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, recorded, _ = run_seeing_flags(TINY)
    finally:
        torch.set_num_threads(threads)
    assert (recorded["torch_num_threads"], recorded["omp_num_threads"]) == (1, "1")
    assert recorded["torch_version"] == str(torch.__version__)
    assert recorded["device_name"] and recorded["device_name"] == numerics("cpu")["device_name"]
    assert (recorded["packed"], recorded["pack_size"]) == (False, 1)
    assert recorded["train_step"] == "optimizer"


def test_a_pack_runs_under_and_records_its_numerics(tf32_on_outside):
    specs = [TINY.replace(options={"deterministic": True}, seed=s) for s in (1, 2)]
    seen = [FlagsSeen(), FlagsSeen()]
    results = train_packed(specs, callbacks=[[s] for s in seen])
    for flags, result in zip(seen, results, strict=True):
        assert flags.seen["deterministic_algorithms"] and not flags.seen["tf32_cudnn"]
        assert result.provenance["deterministic_algorithms"] is True
        assert (result.provenance["packed"], result.provenance["pack_size"]) == (True, 2)
    assert torch.backends.cudnn.allow_tf32 and not torch.are_deterministic_algorithms_enabled()


def test_deterministic_mode_changes_no_number_on_a_cpu():
    metrics = [run_seeing_flags(TINY.replace(steps=12, options=options))[2]
               for options in ({}, {"deterministic": True})]
    assert metrics[0] == metrics[1]


def test_the_autotuned_capture_is_off_in_a_deterministic_run():
    saved = torch.backends.cudnn.deterministic
    try:
        for deterministic in (False, True):
            torch.backends.cudnn.deterministic = deterministic
            with cudnn_autotuned():
                assert torch.backends.cudnn.benchmark is not deterministic
    finally:
        torch.backends.cudnn.deterministic = saved


@pytest.mark.parametrize(("options", "message"), [
    ({"deterministic": "yes"}, "The 'options.deterministic' setting must be a bool; got 'yes'."),
    ({"tf32": 1}, "The 'options.tf32' setting must be a bool; got 1."),
    ({"deterministic": True, "tf32": True},
     "The 'options.tf32' setting must be False when 'options.deterministic' is True"),
])
def test_bad_numerics_options_are_refused_before_the_run(options, message):
    spec = TINY.replace(options=options)
    assert any(message in problem for problem in task_problems(spec))  # what preflight asks
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(spec)


def test_the_options_leave_existing_run_ids_alone():
    assert RunSpec().run_id == "69c01c6cda28"  # as before the options existed
    assert "deterministic" not in RunSpec().to_json()
    assert TINY.replace(options={"deterministic": True}).run_id != TINY.run_id


def test_runs_with_other_numerics_are_never_packed_together():
    plain, deterministic = TINY, TINY.replace(options={"deterministic": True}, seed=2)
    assert pack_key(plain) != pack_key(deterministic)
    assert pack_key(plain) == pack_key(TINY.replace(seed=2, options={"fused_sgd": False}))
