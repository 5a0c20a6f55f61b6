"""RunSpec: every setting validated with a message naming it, JSON round trip, stable run ids."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fake_study  # noqa: F401  (registers the "fake" task)
from normlab.runs.spec import RunSpec
from normlab.utils.config import ConfigError

FIELDS = dataclasses.fields(RunSpec)


def base_spec(**changes) -> RunSpec:
    return RunSpec(task="fake", model="mlp", depth=3, **changes)


def bad_values(field: dataclasses.Field) -> list:
    """Values `field` must reject, derived from its declared constraints.

    Every field gets a value of a type no setting accepts (a set); fields with choices get an
    unknown name; interval fields get a value just outside each finite end.
    """
    meta = field.metadata
    values: list = [{"not", "a", "setting"}]
    if meta.get("choices") is not None:
        values.append("no-such-choice")
    if meta.get("low") is not None and math.isfinite(meta["low"]):
        values.append(meta["low"] - 1)
    if math.isfinite(meta.get("high", math.inf)):
        values.append(meta["high"] + 1)
    if field.name == "device":
        values.append("gpu")
    if field.name in ("options", "data_options", "norm_options"):
        values.append([1, 2])
    if field.name == "milestones":
        values += [[0.5, 1.5], 5]
    if field.name == "probes":
        values += [["radial"], [{"every": 5}], 5]
    return values


@pytest.mark.parametrize("field", FIELDS, ids=[f.name for f in FIELDS])
def test_every_setting_rejects_a_bad_value_naming_setting_value_and_allowed(field):
    for value in bad_values(field):
        with pytest.raises(ConfigError) as info:
            base_spec().replace(**{field.name: value})
        problems = [p for p in info.value.problems if repr(field.name) in p]
        assert problems, f"{field.name}={value!r}: {info.value.problems}"
        sentence = problems[0]
        assert "must be" in sentence, sentence  # says what is allowed
        shown = repr(value) if not isinstance(value, list) else None
        assert shown is None or shown in sentence or repr(sorted(value)) in sentence, sentence


def test_choice_message_lists_the_allowed_names():
    with pytest.raises(ConfigError) as info:
        base_spec(norm="batchnorm")
    (problem,) = info.value.problems
    assert problem.startswith("The 'norm' setting must be one of ")
    assert "'batch'" in problem and "'group'" in problem and problem.endswith("got 'batchnorm'.")


def test_interval_message_states_the_interval():
    with pytest.raises(ConfigError) as info:
        base_spec(lr=-0.1)
    assert info.value.problems == ["The 'lr' setting must be a float in (0, inf); got -0.1."]


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        base_spec(lr=-1.0, norm="bogus", batch_size=0)
    assert len(info.value.problems) == 3


def test_resnet_depth_must_be_6n_plus_2():
    with pytest.raises(ConfigError, match="6n\\+2"):
        RunSpec(task="fake", model="resnet", depth=21)
    assert RunSpec(task="fake", model="resnet", depth=20).depth == 20


def test_valid_settings_of_every_kind_are_accepted():
    spec = base_spec(steps=100, device="cuda:1", milestones=[0.3, 0.6], nesterov=True,
                     probes=[{"name": "radial", "every": 10}], options={"a": [1, 2]})
    assert spec.milestones == (0.3, 0.6)
    assert spec.probe_schedules() == [{"name": "radial", "every": 10}]
    assert spec.mapping("options") == {"a": [1, 2]}


def test_json_round_trip_preserves_spec_and_run_id():
    spec = base_spec(lr=0.03, seed=3, milestones=[0.25, 0.5], data_options={"n": 64},
                     norm_options={"groups": 2}, options={"nested": {"b": 1, "a": [1.5, 2]}},
                     probes=[{"name": "radial", "every": 5, "layers": ["fc"]}], steps=40)
    back = RunSpec.from_json(spec.to_json())
    assert back == spec
    assert back.run_id == spec.run_id
    assert json.loads(back.to_json()) == json.loads(spec.to_json())


def test_from_dict_rejects_unknown_settings():
    data = base_spec().to_dict() | {"learning_rate": 0.1}
    with pytest.raises(ConfigError, match="Unknown setting 'learning_rate'"):
        RunSpec.from_dict(data)


def test_run_id_ignores_mapping_order_and_follows_every_setting():
    one = base_spec(options={"a": 1, "b": 2})
    two = base_spec(options={"b": 2, "a": 1})
    assert one.run_id == two.run_id and len(one.run_id) == 12
    ids = {base_spec().run_id, base_spec(lr=0.2).run_id, base_spec(seed=1).run_id,
           base_spec(options={"a": 1}).run_id}
    assert len(ids) == 4


@pytest.mark.slow
def test_run_id_is_the_same_in_another_process():
    """The folder name must not depend on the interpreter (hash randomization, dict order)."""
    spec = base_spec(options={"z": 1, "a": {"y": 2, "b": 3}}, probes=[{"name": "radial"}])
    tests = str(Path(__file__).parent)
    code = (f"import sys; sys.path.insert(0, {tests!r}); import fake_study; "
            f"from normlab.runs.spec import RunSpec; "
            f"print(RunSpec.from_json({spec.to_json()!r}).run_id)")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True, timeout=120)
    assert out.stdout.strip() == spec.run_id


def test_overrides_are_parsed_to_each_setting_type():
    spec = base_spec().with_overrides({
        "lr": "0.5", "seed": "7", "nesterov": "true", "milestones": "[0.3, 0.6]",
        "options": '{"sleep": 0.1}', "group": "E1", "steps": "100", "norm": "group"})
    assert spec.lr == 0.5 and spec.seed == 7 and spec.nesterov is True
    assert spec.milestones == (0.3, 0.6) and spec.mapping("options") == {"sleep": 0.1}
    assert spec.group == "E1" and spec.steps == 100 and spec.norm == "group"
    assert base_spec().with_overrides({"lr": 0.2}).lr == 0.2  # non-strings pass through


def test_overrides_report_unknown_keys_and_bad_values_together():
    with pytest.raises(ConfigError) as info:
        base_spec().with_overrides({"lr": "-1", "learning_rate": "0.1", "seed": "abc"})
    text = "\n".join(info.value.problems)
    assert "Unknown setting 'learning_rate'" in text
    assert "The 'lr' setting" in text and "got -1" in text
    assert "The 'seed' setting" in text and "got 'abc'" in text


def test_task_options_lays_options_over_defaults_and_names_unknown_keys():
    spec = RunSpec(options={"a": 5, "zz": 1})
    options, problems = spec.task_options({"a": 1, "b": 2})
    assert options == {"a": 5, "b": 2, "zz": 1}
    assert problems == ["The 'options' setting of the 'train' task may only hold 'a', 'b'; "
                        "got 'zz'."]


@pytest.mark.parametrize("setting, value, expected", [
    ("seed", 2**31, "The 'seed' setting must be an int in [0, 2147483647]; got 2147483648."),
    ("depth", 1208, "The 'depth' setting must be an int in [1, 1202]; got 1208."),
    ("width", 4097, "The 'width' setting must be an int in [1, 4096]; got 4097."),
])
def test_settings_that_no_run_could_use_are_bounded(setting, value, expected):
    with pytest.raises(ConfigError) as info:
        RunSpec(model="mlp", **{setting: value})
    assert info.value.problems == [expected]
    RunSpec(model="mlp", **{setting: value - 1 if setting != "depth" else 1202})


def test_a_huge_value_is_shown_cut_in_the_message():
    with pytest.raises(ConfigError) as info:
        RunSpec(norm="x" * 5000)
    (problem,) = info.value.problems
    assert len(problem) < 300 and problem.endswith("... (5002 characters).")


def test_overrides_python_cannot_hold_are_named_with_the_other_problems():
    with pytest.raises(ConfigError) as info:
        RunSpec().with_overrides({"lr": "9" * 5000, "options": "[" * 100_000, "momentum": "2"})
    problems = info.value.problems
    assert len(problems) == 3
    assert problems[0].startswith("The 'lr' setting could not be read (Exceeds the limit")
    assert problems[1].startswith("The 'options' setting nests lists or mappings too deeply")
    assert problems[2].startswith("The 'momentum' setting must be a float in [0, 1)")


@pytest.mark.parametrize("levels, ok", [(16, True), (17, False)])
def test_mapping_settings_nest_at_most_16_levels(levels, ok):
    value: object = 1
    for level in range(levels - 1):
        value = [value] if level % 2 else {"k": value}
    options = {"a": value}
    if ok:
        assert RunSpec(options=options).mapping("options") == options
    else:
        with pytest.raises(ConfigError, match="at most 16 levels deep; got 17"):
            RunSpec(options=options)
