"""On a CPU a pack gives each member the same bits whatever the pack (normlab.train.invariance):
the member's metric rows are compared exactly across stacks of other sizes, other partners and
other places, for convolutional nets with each kind of norm and for an MLP with BatchNorm."""

from __future__ import annotations

import pytest
import torch

from normlab.runs.spec import RunSpec
from normlab.runs.store import RunStore, read_json
from normlab.runs.tasks import RunContext, execute_run
from normlab.train.build import train_options
from normlab.train.invariance import CPU_THREADS, pack_threads, stack_rows
from normlab.train.packable import pack_key
from normlab.train.packed import train_packed
from normlab.utils.config import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

RESNET = RunSpec(data="digits", depth=8, width=8, batch_size=64, steps=12, log_every=1,
                 lr=1.0, device="cpu", seed=3)
MLP = RunSpec(model="mlp", depth=3, width=16, norm="batch", batch_size=64, steps=12,
              log_every=1, lr=0.02, nesterov=True, schedule="cosine", device="cpu", seed=5)


def member_rows(specs: list[RunSpec], k: int) -> list[dict]:
    """Member k's metric rows when `specs` are trained as one pack."""
    contexts = [RunContext(run_id=s.run_id) for s in specs]
    train_packed(specs, contexts=contexts)
    return contexts[k].metrics


def partners(spec: RunSpec, count: int) -> list[RunSpec]:
    return [spec.replace(seed=10 + i, lr=spec.lr * 0.3 ** (i + 1), momentum=0.9 - 0.4 * (i % 2))
            for i in range(count)]


@pytest.mark.parametrize("spec", [RESNET.replace(norm=n, lr=0.1 if n == "none" else 1.0)
                          for n in ("batch", "group", "none")]
                         + [MLP], ids=["resnet-batch", "resnet-group", "resnet-none", "mlp"])
def test_a_member_has_the_same_bits_alone_and_anywhere_in_any_pack(spec):
    alone = member_rows([spec], 0)
    assert len(alone) == spec.steps + 1  # every step's row and the eval row
    others = partners(spec, 4)
    for specs, k in [([spec, *others[:1]], 0), ([*others[:1], spec], 1),
                     ([*others[:2], spec], 2), ([*others[:4], spec], 4),
                     ([others[0], spec, *others[1:]], 1)]:
        assert member_rows(specs, k) == alone, f"pack of {len(specs)}, place {k}"


def test_the_check_above_can_fail_the_plain_loop_rounds_otherwise():
    from normlab.train.loop import train

    context = RunContext(run_id=MLP.run_id)
    train(MLP, context=context)
    plain = context.metrics
    assert [r["step"] for r in plain] == [r["step"] for r in member_rows([MLP], 0)]
    assert plain != member_rows([MLP], 0)


def test_a_cpu_stack_is_even_and_at_least_four_models_elsewhere_the_members():
    cpu = torch.device("cpu")
    assert [stack_rows(cpu, k) for k in (1, 2, 3, 4, 5, 8, 9)] == [4, 4, 4, 4, 6, 8, 10]
    assert [stack_rows(torch.device("cuda"), k) for k in (1, 3)] == [1, 3]


def test_a_cpu_pack_computes_on_one_thread_and_restores_the_count():
    before = torch.get_num_threads()
    with pack_threads(torch.device("cpu")):
        assert torch.get_num_threads() == CPU_THREADS
    assert torch.get_num_threads() == before
    with pack_threads(torch.device("meta")):
        assert torch.get_num_threads() == before


def test_a_lone_cpu_run_is_a_pack_of_one_unless_it_asks_for_the_plain_loop(tmp_path):
    plain = RESNET.replace(options={"plain_loop": True})
    assert pack_key(RESNET) is not None and pack_key(plain) is None
    for spec, packed in ((RESNET, True), (plain, False)):
        execute_run(spec, tmp_path)
        provenance = read_json(RunStore(tmp_path).run_dir(spec) / "result.json")["provenance"]
        assert (provenance["packed"], provenance["pack_size"]) == (packed, 1)
    assert provenance["torch_num_threads"] == torch.get_num_threads()  # the plain loop's own


def test_a_bad_plain_loop_option_is_refused():
    with pytest.raises(ConfigError, match=r"'options\.plain_loop' setting must be a bool"):
        train_options(RESNET.replace(options={"plain_loop": "yes"}))


class _NotVmappable(torch.nn.Module):
    """A researcher's layer with Python control flow on a tensor's value: vmap refuses it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / max(float(x.detach().abs().max()), 1.0)


def test_a_model_vmap_refuses_fails_its_run_naming_the_plain_loop_which_trains_it(tmp_path):
    from normlab.nn import norms as norms_module
    from normlab.nn.norms import register_norm

    register_norm("_test_not_vmappable")(lambda channels: _NotVmappable())
    try:
        spec = RESNET.replace(norm="_test_not_vmappable", steps=3)
        execute_run(spec, tmp_path)
        result = read_json(RunStore(tmp_path).run_dir(spec) / "result.json")
        assert result["status"] == "failed" and "plain_loop" in result["error"]
        plain = spec.replace(options={"plain_loop": True})
        execute_run(plain, tmp_path)
        assert read_json(RunStore(tmp_path).run_dir(plain) / "result.json")["status"] \
            == "completed"
    finally:
        norms_module._NORMS._entries.pop("_test_not_vmappable")


def _hook_at_step_0(calls: list[int]):
    """A callback that leaves a forward hook on the model at step 0 (counting its calls)."""

    def callback(state) -> None:
        if state.step == 0:
            state.model.register_forward_hook(lambda module, args, out: calls.append(1))

    return callback


def test_a_hook_a_callback_leaves_on_a_members_model_fails_that_member_by_name():
    """The hook would never run in the pack's step (it runs in the plain loop's): a clear
    refusal, not a measurement silently missing. The other member trains on."""
    from normlab.train.loop import train

    calls: list[int] = []
    train(RESNET.replace(steps=3), callbacks=[_hook_at_step_0(calls)])
    assert calls  # the plain loop runs it

    calls.clear()
    specs = [RESNET.replace(steps=3), RESNET.replace(steps=3, seed=4)]
    hooked, other = train_packed(specs, callbacks=[[_hook_at_step_0(calls)], []])
    assert hooked.status == "failed" and "forward hook" in hooked.error
    assert "plain_loop" in hooked.error and other.status == "completed"


class _Hooked(torch.nn.Identity):
    """A researcher's layer that registers a forward hook on itself when built."""

    def __init__(self) -> None:
        super().__init__()
        self.register_forward_hook(lambda module, args, out: None)


def test_a_model_built_with_a_hook_is_refused_as_a_pack_and_trains_by_the_plain_loop(tmp_path):
    from normlab.nn import norms as norms_module
    from normlab.nn.norms import register_norm

    register_norm("_test_hooked")(lambda channels: _Hooked())
    try:
        spec = RESNET.replace(norm="_test_hooked", steps=3)
        execute_run(spec, tmp_path)
        error = read_json(RunStore(tmp_path).run_dir(spec) / "result.json")["error"]
        assert "forward hook" in error and "_Hooked" in error and "plain_loop" in error
        plain = spec.replace(options={"plain_loop": True})
        execute_run(plain, tmp_path)
        assert read_json(RunStore(tmp_path).run_dir(plain) / "result.json")["status"] \
            == "completed"
    finally:
        norms_module._NORMS._entries.pop("_test_hooked")
