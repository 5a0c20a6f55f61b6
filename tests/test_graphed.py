"""The CUDA-graph step (normlab.train.graphed) against the plain loop and torch.optim.SGD.

The graph replays `StaticStep`, so checking that function eagerly against the eager loop with
torch.optim.SGD (on a CPU: to float32 rounding) checks the science of the graphed path; the
`device` tests then compare the captured step with the plain loop on NORMLAB_TEST_DEVICE.
"""

from __future__ import annotations

import copy

import pytest
import torch

from cases import NORM_KINDS, tiny_case
from normlab.runs.spec import RunSpec
from normlab.runs.tasks import RunContext
from normlab.train import train
from normlab.train.graphed import (
    WARMUP_STEPS,
    CapturedCall,
    GraphedStep,
    StaticStep,
    capture_hooks,
    cuda_graph_path,
    hooks_refusal,
    sgd_update_,
    step_provenance,
)
from normlab.utils.config import ConfigError

TINY_DATA = {"n_train": 96, "n_test": 48, "shape": [3, 8, 8], "num_classes": 4}
TIGHT = {"rtol": 1e-6, "atol": 1e-7}  # float32 rounding; on a CPU the paths are bit-identical


def spec_for(norm: str, graph: str, device: str = "cpu", **changes) -> RunSpec:
    """A ResNet-8 of width 4 on 96 synthetic 8x8 images, 12 steps = 2 epochs (2 evaluations),
    a cosine schedule with warm-up (the lr changes every step), Nesterov momentum, weight decay.
    """
    norm_options = {"renorm_warmup": [0.0, 1.0]} if norm == "batch_renorm" else {}
    settings = {"data": "synthetic", "data_options": TINY_DATA, "depth": 8, "width": 4,
                "norm": norm, "norm_options": norm_options, "batch_size": 16, "steps": 12,
                "lr": 0.05, "schedule": "cosine", "warmup": 0.25, "nesterov": True,
                "log_every": 1, "device": device, "options": {"cuda_graph": graph},
                **changes}
    return RunSpec(**settings)


def run(spec: RunSpec) -> tuple:
    context = RunContext()
    result = train(spec, context=context)
    steps = [r for r in context.metrics if "kind" not in r]
    evals = [r for r in context.metrics if r.get("kind") == "eval"]
    return result, steps, evals


def assert_same_run(reference: tuple, other: tuple, **tolerance) -> None:
    """Same status, divergence step, per-step lr/loss/accuracy, evaluations and final metrics."""
    (ref, ref_steps, ref_evals), (res, steps, evals) = reference, other
    assert (res.status, res.steps, res.diverged_step) == (ref.status, ref.steps, ref.diverged_step)
    assert [r["step"] for r in steps] == [r["step"] for r in ref_steps]
    for key in ("lr", "loss", "acc"):
        torch.testing.assert_close(torch.tensor([r[key] for r in steps], dtype=torch.float64),
                                   torch.tensor([r[key] for r in ref_steps],
                                                dtype=torch.float64), **tolerance)
    assert len(evals) == len(ref_evals)
    for row, ref_row in zip(evals, ref_evals, strict=True):
        for key in ("test_loss", "test_acc", "train_loss", "train_acc"):
            torch.testing.assert_close(row[key], ref_row[key], **tolerance)
    assert res.final.keys() == ref.final.keys()
    for key, value in ref.final.items():
        if isinstance(value, float):
            torch.testing.assert_close(res.final[key], value, **tolerance)
        else:
            assert res.final[key] == value


# -- the step function against the plain loop (CPU) ----------------------------------------------
# (Runs that complete: `test_the_graphed_run_matches_the_plain_loop_on_the_device` below, which
# on a CPU runs the step function eagerly against the plain loop for every norm.)

@pytest.mark.parametrize("norm", NORM_KINDS)
def test_the_step_function_diverges_at_the_plain_loops_step(norm):
    plain = run(spec_for(norm, "off", lr=1e4, schedule="constant", warmup=0.0))
    step_function = run(spec_for(norm, "eager", lr=1e4, schedule="constant", warmup=0.0))
    assert_same_run(plain, step_function, **TIGHT)
    if norm == "none":  # the case that must diverge, so that the comparison above means it
        assert plain[0].status == "diverged"


@pytest.mark.parametrize("momentum,nesterov,weight_decay",
                         [(0.0, False, 0.0), (0.0, False, 5e-4), (0.9, False, 5e-4),
                          (0.9, True, 5e-4), (0.5, True, 0.0)])
def test_sgd_update_equals_torch_optim_sgd(momentum, nesterov, weight_decay):
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 3, 3, 3), (6,), (4, 6)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(15)]
    lrs = [0.1 * 0.8 ** k for k in range(15)]  # a changing learning rate

    params = [p.clone().requires_grad_() for p in start]
    sgd = torch.optim.SGD(params, lr=lrs[0], momentum=momentum, nesterov=nesterov,
                          weight_decay=weight_decay)
    ours = [p.clone() for p in start]
    buffers = [torch.zeros_like(p) for p in ours] if momentum else []
    for lr, g in zip(lrs, grads, strict=True):
        for group in sgd.param_groups:
            group["lr"] = lr
        for p, gi in zip(params, g, strict=True):
            p.grad = gi.clone()
        sgd.step()
        sgd_update_(ours, g, buffers, torch.tensor(lr), momentum=momentum,
                    weight_decay=weight_decay, nesterov=nesterov)
    for theirs, mine, before in zip(params, ours, start, strict=True):
        torch.testing.assert_close(mine, theirs.detach(), **TIGHT)
        assert not torch.equal(mine, before)  # the update did something
    if momentum:
        for p, buffer in zip(params, buffers, strict=True):
            torch.testing.assert_close(buffer, sgd.state[p]["momentum_buffer"], **TIGHT)


def two_copies(norm: str, device: torch.device | str = "cpu") -> tuple:
    """Two equal TinyConvNets (float32) with `norm`, a batch of 8 6x6 images and labels."""
    case = tiny_case(norm, batch=8, size=6, dtype=torch.float32)
    return (case.model.to(device), copy.deepcopy(case.model).to(device), case.x.to(device),
            case.y.to(device))


def plain_steps(model, optimizer, x, y, lrs) -> list[float]:
    """The eager loop's step: torch.optim.SGD with the lr set before each step."""
    losses = []
    for lr in lrs:
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def static_steps(model, optimizer, x, y, lrs, *, capture: bool) -> tuple[list[float], GraphedStep]:
    step = GraphedStep(StaticStep(model, optimizer, torch.tensor(lrs)), capture=capture)
    losses = [step.step(x, y)[0] for _ in lrs]  # 0-d device tensors, valid for RING steps
    return [loss.item() for loss in losses], step


SGD = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}


@pytest.mark.parametrize("norm", NORM_KINDS)
def test_the_static_step_keeps_an_optimizer_state_torch_can_continue(norm):
    plain_model, ours_model, x, y = two_copies(norm)
    plain_sgd = torch.optim.SGD(plain_model.parameters(), **SGD)
    ours_sgd = torch.optim.SGD(ours_model.parameters(), **SGD)
    lrs = [0.05, 0.1, 0.08, 0.02]
    expected = plain_steps(plain_model, plain_sgd, x, y, lrs)
    losses, _ = static_steps(ours_model, ours_sgd, x, y, lrs, capture=False)
    torch.testing.assert_close(losses, expected, **TIGHT)
    for name, tensor in plain_model.state_dict().items():  # weights and BN statistics
        torch.testing.assert_close(ours_model.state_dict()[name], tensor, **TIGHT)
    # The momentum buffers live in the optimizer's state, so torch.optim.SGD carries on.
    torch.testing.assert_close(plain_steps(ours_model, ours_sgd, x, y, [0.03, 0.03]),
                               plain_steps(plain_model, plain_sgd, x, y, [0.03, 0.03]), **TIGHT)
    for name, tensor in plain_model.state_dict().items():
        torch.testing.assert_close(ours_model.state_dict()[name], tensor, **TIGHT)


def test_the_static_step_takes_over_torch_sgd_mid_run():
    """As after a restored checkpoint: torch's momentum buffers and the lr table at step 3."""
    plain_model, ours_model, x, y = two_copies("batch")
    lrs = [0.05, 0.1, 0.08, 0.02, 0.06, 0.04]
    expected = plain_steps(plain_model, torch.optim.SGD(plain_model.parameters(), **SGD), x, y,
                           lrs)
    ours_sgd = torch.optim.SGD(ours_model.parameters(), **SGD)
    first = plain_steps(ours_model, ours_sgd, x, y, lrs[:3])
    step = GraphedStep(StaticStep(ours_model, ours_sgd, torch.tensor(lrs), start_step=3),
                       capture=False)
    rest = [step.step(x, y)[0].item() for _ in lrs[3:]]
    torch.testing.assert_close(first + rest, expected, **TIGHT)
    for name, tensor in plain_model.state_dict().items():
        torch.testing.assert_close(ours_model.state_dict()[name], tensor, **TIGHT)


# -- user hooks stay off the captured path --------------------------------------------------------
# A hook runs while a CUDA graph is recorded and never when it replays. These run on a CPU: the
# refusal comes before anything touches CUDA.

def log_mean(module, inputs, output):
    module.seen.append(float(output.detach().abs().mean()))


def double_input(module, inputs):
    return (2 * inputs[0],)


def note_gradient(module, grad_input, grad_output):
    return None


def test_capture_hooks_names_every_kind_of_hook_and_its_module():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
                                torch.nn.Sequential(torch.nn.Linear(4, 2)))
    assert capture_hooks(model) == [] and hooks_refusal(model) is None
    handles = [model[0].register_forward_hook(log_mean),
               model[2][0].register_forward_pre_hook(double_input),
               model[1].register_full_backward_hook(note_gradient),
               model.register_full_backward_pre_hook(note_gradient)]
    assert capture_hooks(model, "not a module") == [
        "backward pre-hook 'note_gradient' on 'the model' (Sequential)",
        "forward hook 'log_mean' on '0' (Linear)",
        "backward hook 'note_gradient' on '1' (ReLU)",
        "forward pre-hook 'double_input' on '2.0' (Linear)"]
    for handle in handles:
        handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(log_mean)
    try:
        assert capture_hooks(model) == ["global forward hook 'log_mean'"]
    finally:
        handle.remove()
    assert capture_hooks(model) == []


def test_a_call_on_hooked_modules_is_not_captured_and_says_which_hook():
    model = torch.nn.Linear(3, 2)
    model.seen = []
    model.register_forward_hook(log_mean)
    x = torch.randn(4, 3)
    call = CapturedCall(lambda: model(x), capture=True, warmup=2, what="the test call",
                        modules=(model,))
    with pytest.warns(RuntimeWarning, match="the test call runs eagerly: user hooks run only "
                      "while a CUDA graph is recorded.*forward hook 'log_mean' on 'the model'"):
        call()
    for _ in range(3):
        call()
    assert call.graph is None and not call.capture and "log_mean" in call.refused
    assert len(model.seen) == 4  # the hook ran at every call, as in eager mode


def test_a_training_step_on_a_hooked_model_runs_eagerly_and_its_provenance_says_why():
    plain_model, ours_model, x, y = two_copies("batch")
    ours_model.conv1.seen = []
    ours_model.conv1.register_forward_hook(log_mean)
    lrs = [0.05, 0.1, 0.08]
    expected = plain_steps(plain_model, torch.optim.SGD(plain_model.parameters(), **SGD), x, y,
                           lrs)
    with pytest.warns(RuntimeWarning, match="forward hook 'log_mean' on 'conv1' .Conv2d."):
        losses, step = static_steps(ours_model, torch.optim.SGD(ours_model.parameters(), **SGD),
                                    x, y, lrs, capture=True)
    torch.testing.assert_close(losses, expected, **TIGHT)
    assert len(ours_model.conv1.seen) == len(lrs)
    provenance = step_provenance("cuda_graph", [step.call])
    assert provenance["train_step"] == "step_function"
    assert "forward hook 'log_mean' on 'conv1'" in provenance["cuda_graph_refused"]


def test_the_per_example_rows_of_a_hooked_model_are_not_captured():
    """The captured per-example rows take the same refusal, before any CUDA call."""
    from normlab.probes.per_example import _captured_rows

    model = torch.nn.Linear(3, 2)
    model.seen = []
    model.register_forward_hook(log_mean)
    with pytest.warns(RuntimeWarning, match="per-example backward runs eagerly.*'log_mean'"):
        assert _captured_rows(lambda: torch.zeros(2), [], torch.zeros(2), (model,)) is None


# -- the setting ---------------------------------------------------------------------------------

def test_a_bad_cuda_graph_value_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match=r"'options.cuda_graph'.*'auto', 'on', 'off', 'eager'"
                                          r".*got 'fast'"):
        train(spec_for("batch", "fast"))


def test_cuda_graph_on_needs_a_cuda_device():
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        train(spec_for("batch", "on"))


@pytest.mark.parametrize("changes,needle", [
    ({"update_projection": "tangential"}, "update_projection"),
    ({"probes": [{"name": "step_loss", "every": 4}]}, "callbacks or probes"),
])
def test_the_step_function_refuses_what_needs_the_eager_loop(changes, needle):
    with pytest.raises(ConfigError, match=needle):
        train(spec_for("batch", "eager", **changes))


def test_callbacks_make_auto_take_the_eager_loop():
    seen = []
    result = train(spec_for("batch", "auto", steps=2), callbacks=[lambda s: seen.append(s.step)])
    assert result.provenance["train_step"] == "optimizer" and seen == [0, 1, 2]


@pytest.mark.parametrize("device_name,blockers,expected", [
    ("cuda", {}, "cuda_graph"),
    ("cuda:1", {}, "cuda_graph"),
    ("cpu", {}, "optimizer"),
    ("cuda", {"callbacks": True}, "optimizer"),
    ("cuda", {"update_projection": "radial"}, "optimizer"),
    ("cuda", {"compile": True}, "optimizer"),
])
def test_auto_takes_the_graph_only_on_cuda_without_blockers(device_name, blockers, expected):
    settings = {"callbacks": False, "update_projection": "none", "compile": False, **blockers}
    assert cuda_graph_path("auto", torch.device(device_name), **settings) == expected
    assert cuda_graph_path("off", torch.device(device_name), **settings) == "optimizer"


# -- on the test device (NORMLAB_TEST_DEVICE): captured on CUDA, eager on a CPU -------------------

@pytest.fixture
def float32_kernels():
    """No TF32 on CUDA inside the test: the eager and the captured run may pick other cuDNN
    kernels, and TF32 would make their difference 1e-3 instead of float32 rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def graph_setting(device: torch.device) -> str:
    return "on" if device.type == "cuda" else "eager"


@pytest.mark.device
@pytest.mark.usefixtures("float32_kernels")
@pytest.mark.parametrize("norm", NORM_KINDS)
def test_the_graphed_run_matches_the_plain_loop_on_the_device(device, norm):
    plain = run(spec_for(norm, "off", str(device)))
    graphed = run(spec_for(norm, graph_setting(device), str(device)))
    path = "cuda_graph" if device.type == "cuda" else "step_function"
    assert graphed[0].provenance["train_step"] == path
    assert plain[0].provenance["train_step"] == "optimizer"
    assert plain[0].status == "completed" and len(plain[2]) == 2  # two evaluations
    # On a GPU, cuDNN may pick other kernels in a graph than eagerly: float32 noise, not
    # a different update.
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if device.type == "cuda" else TIGHT
    assert_same_run(plain, graphed, **tolerance)


@pytest.mark.device
def test_the_graphed_run_matches_with_channels_last_and_bf16(device):
    changes = {"channels_last": True, "autocast": "bf16"}
    plain = run(spec_for("batch", "off", str(device), **changes))
    graphed = run(spec_for("batch", graph_setting(device), str(device), **changes))
    assert_same_run(plain, graphed, rtol=2e-2, atol=2e-2)


@pytest.mark.device
@pytest.mark.usefixtures("float32_kernels")
@pytest.mark.parametrize("norm", ["none", "batch", "batch_renorm"])
def test_the_captured_step_equals_torch_sgd_on_the_device(device, norm):
    plain_model, ours_model, x, y = two_copies(norm, device)
    lrs = [0.05 * (1 + k % 3) for k in range(WARMUP_STEPS + 5)]
    expected = plain_steps(plain_model, torch.optim.SGD(plain_model.parameters(), **SGD), x, y,
                           lrs)
    losses, step = static_steps(ours_model, torch.optim.SGD(ours_model.parameters(), **SGD), x,
                                y, lrs, capture=device.type == "cuda")
    assert (step.call.graph is not None) == (device.type == "cuda")  # captured and replayed
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if device.type == "cuda" else TIGHT
    torch.testing.assert_close(losses, expected, **tolerance)
    for name, tensor in plain_model.state_dict().items():
        torch.testing.assert_close(ours_model.state_dict()[name], tensor, **tolerance)


@pytest.mark.device
def test_a_step_cuda_refuses_to_capture_runs_eagerly_and_says_why(device):
    if device.type != "cuda":
        pytest.skip("only CUDA captures graphs; on a CPU every step runs eagerly anyway")
    counter = torch.zeros((), device=device)

    def step() -> float:
        counter.add_(1)
        return counter.item()  # a host synchronization, which CUDA cannot record

    call = CapturedCall(step, capture=True, warmup=1)
    with pytest.warns(RuntimeWarning, match="refused"):
        values = [call() for _ in range(3)]
    assert values == [1.0, 2.0, 3.0]  # the refused capture ran nothing; each call ran once
    assert call.graph is None and call.refused
