"""`normlab verify` and the same checks in `run`, `show` and `report`: every kind of damage to a
study folder is named, `run` sets damaged runs aside and redoes them, and files get the umask."""

from __future__ import annotations

import collections
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

import fake_study  # noqa: F401  (registers the fake study and task)
from normlab.cli import main
from normlab.runner import run_study
from normlab.runs.spec import RunSpec
from normlab.runs.store import CorruptRecordError, files_record, read_result
from normlab.runs.tasks import RunContext
from normlab.runs.verify import damaged_runs, step_order_problems, verify_store
from normlab.train import train


@pytest.fixture
def study(tmp_path) -> tuple[Path, Path]:
    """The fake study run once (each completion counted), and the counter file."""
    counter = tmp_path / "count.txt"
    out = tmp_path / "study"
    assert main(["run", "fake", "--out", str(out), "--set",
                 f'options={{"counter": "{counter}"}}']) == 0
    return out, counter


def first_run(out: Path) -> Path:
    return sorted((out / "runs").iterdir())[0]


def drop_last_line(path: Path) -> None:
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))


def cut_mid_line(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def swap_spec(path: Path) -> None:
    other = sorted(path.parent.parent.iterdir())[1] / "spec.json"
    path.write_text(other.read_text())


def edit_json(**changes: object) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


def finished_with(lines_of: Callable[[list[str]], list[str]]) -> Callable[[Path], None]:
    """Rewrite a run file's lines and record its new size in result.json, as a run that had
    finished with that file would have (so only the order of its steps can give it away)."""

    def damage(path: Path) -> None:
        lines = path.read_text().splitlines(keepends=True) if path.exists() else []
        path.write_text("".join(lines_of(lines)))
        result = path.parent / "result.json"
        data = json.loads(result.read_text())
        result.write_text(json.dumps({**data, "files": files_record(path.parent)}))

    return damage


def change_one_digit(path: Path) -> None:
    """Change the first digit of the first loss: the file keeps its size, lines and order."""
    text = path.read_text()
    at = text.index('"train_loss": ') + len('"train_loss": ')
    path.write_text(text[:at] + ("1" if text[at] != "1" else "2") + text[at + 1:])


PROBE_ROWS = [f'{{"probe": "radial", "step": {s}, "value": 1.0}}\n' for s in (0, 5, 10, 0, 5)]

DAMAGE = {
    "metrics.jsonl deleted": ("metrics.jsonl", Path.unlink, "missing: the run finished with 5"),
    "metrics.jsonl cut at a line end": ("metrics.jsonl", drop_last_line,
                                        "in 4 lines, but the run finished with"),
    "metrics.jsonl cut mid-line": ("metrics.jsonl", cut_mid_line, "not valid JSON"),
    "a metric row without step": ("metrics.jsonl", lambda p: p.write_text('{"loss": 1}\n'),
                                  "a metric row must have an integer 'step'"),
    "result.json not JSON": ("result.json", cut_mid_line, "not valid JSON"),
    "result.json with steps of the wrong type": ("result.json", edit_json(steps="ten"),
                                                 "the field 'steps' must be an integer"),
    "result.json with an unknown status": ("result.json", edit_json(status="great"),
                                           "'status' must be one of"),
    "result.json with test_acc 5.0": ("result.json", edit_json(final={"test_acc": 5.0}),
                                       "the accuracy 'final.test_acc' must be in [0, 1]"),
    "result.json with a negative loss": ("result.json", edit_json(final={"train_loss": -0.5}),
                                         "the loss 'final.train_loss' must be >= 0"),
    "result.json with steps -7": ("result.json", edit_json(steps=-7),
                                  "the field 'steps' must be >= 0; got -7."),
    "result.json with a negative wall time": ("result.json", edit_json(wall_time_s=-1.5),
                                              "the field 'wall_time_s' must be >= 0"),
    "result.json diverged after its last step": (
        "result.json", edit_json(status="diverged", diverged_step=9),
        "the field 'diverged_step' must be in [0, steps=5]; got 9."),
    "result.json diverged without a step": ("result.json", edit_json(status="diverged"),
                                            "the status 'diverged' contradicts 'diverged_step'"),
    "result.json completed with an error": ("result.json", edit_json(error="boom"),
                                            "the status 'completed' contradicts 'error'"),
    "result.json with a files record of the wrong type": (
        "result.json", edit_json(files={"metrics.jsonl": 5}),
        "the field 'files' must map file names to objects"),
    "metrics.jsonl with one digit changed": ("metrics.jsonl", change_one_digit,
                                             "same size and line count, but its sha256 is"),
    "spec.json of another run": ("spec.json", swap_spec, "holds the spec of run"),
    "spec.json with a bad value": ("spec.json", edit_json(lr=-1), "The 'lr' setting"),
    "spec.json deleted": ("spec.json", Path.unlink, "missing: a finished run must keep"),
    "metrics.jsonl restarted and appended": ("metrics.jsonl", finished_with(lambda rows: rows * 2),
                                             "row 6: step 1 comes after step 5"),
    "metrics.jsonl with a step logged twice": (
        "metrics.jsonl", finished_with(lambda rows: rows[:3] + rows[2:]),
        "row 4: step 3 comes after step 3: a step logged twice"),
    "records.jsonl restarted and appended": (
        "records.jsonl", finished_with(lambda rows: PROBE_ROWS),
        "row 4: probe 'radial' at step 0 comes after its step 10"),
}


@pytest.mark.parametrize("name, damage, expected", DAMAGE.values(), ids=DAMAGE.keys())
def test_each_kind_of_damage_is_named_by_every_command_and_redone_by_run(
        study, name, damage, expected, capsys):
    out, counter = study
    run_dir = first_run(out)
    damage(run_dir / name)
    damages = verify_store(out)
    assert damaged_runs(damages) == [run_dir.name]
    assert any(d.path == run_dir / name and expected in d.problem for d in damages)
    capsys.readouterr()
    for command in ("verify", "show", "report"):
        assert main([command, str(out)]) == 1
        err = capsys.readouterr().err
        assert f"normlab: error: damaged: {run_dir / name}: " in err and expected in err
        assert ("to redo the damaged runs: normlab run fake --scale smoke --set "
                f"""'options={{"counter": "{counter}"}}' --out {out}""") in err
        assert "Traceback" not in err
    assert main(["run", "fake", "--out", str(out), "--set",
                 f'options={{"counter": "{counter}"}}']) == 0
    err = capsys.readouterr().err
    assert f"damaged run {run_dir.name} moved to {out / 'damaged' / run_dir.name}" in err
    assert (out / "damaged" / run_dir.name).is_dir()  # kept for inspection
    assert verify_store(out) == []
    runs = collections.Counter(counter.read_text().split())
    assert runs[run_dir.name] == 2 and sorted(runs.values()) == [1, 1, 2]  # only it was redone
    assert main(["verify", str(out)]) == 0
    assert "3 run folder(s), every file sound." in capsys.readouterr().out


@pytest.mark.parametrize("lr", [0.1, 1e6], ids=["completed", "diverged"])
def test_the_logs_of_a_training_run_are_in_step_order(lr):
    """Eval rows share their step with the next per-step row; log_every leaves gaps; a diverged
    run ends on its diverging step: none of this is a step logged twice."""
    spec = RunSpec(model="mlp", depth=3, width=8, batch_size=64, steps=45, log_every=4, lr=lr,
                   device="cpu", probes=[{"name": "radial", "every": 10}])
    context = RunContext()
    train(spec, context=context)
    assert step_order_problems("metrics.jsonl", context.metrics) == []
    assert step_order_problems("records.jsonl", context.records) == []
    if lr == 0.1:
        assert [r["step"] for r in context.metrics if r.get("kind") == "eval"] == [21, 42, 45]


def test_a_sound_folder_verifies_and_an_unfinished_run_is_no_damage(study, capsys):
    out, _ = study
    (first_run(out) / "result.json").unlink()  # killed before its result was written
    assert verify_store(out) == []
    assert main(["verify", str(out)]) == 0


def test_a_study_file_with_fields_of_the_wrong_type_is_named(study, capsys):
    out, _ = study
    edit_json(run_ids="all", scale=3)(out / "study.json")
    capsys.readouterr()
    assert main(["show", str(out)]) == 1
    err = capsys.readouterr().err
    assert "study.json: the field 'scale' must be a string; got 3." in err
    assert "study.json: the field 'run_ids' must be a list; got \"all\"." in err
    assert "Traceback" not in err


def test_read_result_names_each_field_of_the_wrong_type(study):
    out, _ = study
    path = first_run(out) / "result.json"
    edit_json(final=[1], wall_time_s="slow")(path)
    with pytest.raises(CorruptRecordError) as info:
        read_result(path)
    assert str(path) in str(info.value)
    assert "'final' must be an object" in str(info.value)
    assert "'wall_time_s' must be an integer or a number" in str(info.value)


def test_results_written_before_sizes_were_recorded_are_checked_for_parsing(study):
    out, _ = study
    path = first_run(out) / "result.json"
    data = json.loads(path.read_text())
    del data["files"]
    path.write_text(json.dumps(data))
    assert verify_store(out) == []
    (path.parent / "metrics.jsonl").write_text("{broken\n")
    assert damaged_runs(verify_store(out)) == [path.parent.name]


def test_results_written_before_digests_were_recorded_are_checked_for_size_and_lines(study):
    out, _ = study
    path = first_run(out) / "result.json"
    data = json.loads(path.read_text())
    for record in data["files"].values():
        del record["sha256"]
    path.write_text(json.dumps(data))
    change_one_digit(path.parent / "metrics.jsonl")  # unseen without a digest, as before
    assert verify_store(out) == []
    drop_last_line(path.parent / "metrics.jsonl")
    assert damaged_runs(verify_store(out)) == [path.parent.name]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_are_created_with_the_users_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        run_study("fake", tmp_path)
    finally:
        os.umask(old)
    run_dir = first_run(tmp_path)
    for path in (tmp_path / "report.html", tmp_path / "study.json", run_dir / "spec.json",
                 run_dir / "result.json", run_dir / "metrics.jsonl"):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def refused_by_every_command(out: Path, expected: str, capsys) -> None:
    """verify, show and report each exit 1 naming `expected`, with no traceback."""
    capsys.readouterr()
    for command in ("verify", "show", "report"):
        assert main([command, str(out)]) == 1, command
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, (command, err)


def test_a_study_file_naming_another_study_is_damage(study, capsys):
    """The lr-sweep-over-rmt case: a hand edit of study.json's plan no longer matches its
    digest; `normlab run` writes the plan again."""
    out, counter = study
    edit_json(study="rmt")(out / "study.json")
    refused_by_every_command(out, f"damaged: {out / 'study.json'}: changed since normlab wrote "
                                  "it: its fields no longer match its sha256 (study 'rmt'",
                             capsys)
    assert main(["run", "fake", "--out", str(out), "--set",
                 f'options={{"counter": "{counter}"}}']) == 0
    assert verify_store(out) == [] and len(counter.read_text().split()) == 3  # nothing redone


def test_a_study_file_with_a_run_id_removed_is_damage(study):
    out, _ = study
    plan = json.loads((out / "study.json").read_text())
    edit_json(run_ids=plan["run_ids"][1:])(out / "study.json")
    assert [d.path for d in verify_store(out)] == [out / "study.json"]


def test_a_study_file_written_before_digests_is_checked_for_types_only(study):
    out, _ = study
    plan = json.loads((out / "study.json").read_text())
    del plan["sha256"]
    (out / "study.json").write_text(json.dumps({**plan, "study": "rmt"}))
    assert verify_store(out) == []


@pytest.mark.parametrize("loss", ["runs/ deleted", "runs/ emptied"])
def test_a_study_whose_run_folders_are_gone_is_damage(study, loss, capsys):
    """verify must not find "every file sound" in 0 runs, nor report draw 0 runs, when the
    study's runs had started; `normlab run` redoes them all."""
    import shutil

    out, counter = study
    shutil.rmtree(out / "runs")
    if loss == "runs/ emptied":
        (out / "runs").mkdir()
        what = "holds no run folder"
    else:
        what = "is missing"
    refused_by_every_command(out, f"damaged: {out / 'runs'}: {what}, but study.json plans 3 "
                                  "run(s) and runs have started", capsys)
    assert main(["run", "fake", "--out", str(out), "--set",
                 f'options={{"counter": "{counter}"}}']) == 0
    assert verify_store(out) == [] and len(counter.read_text().split()) == 6


def test_a_study_whose_runs_have_not_started_is_no_damage(tmp_path, capsys):
    """study.json is written before the first run: until a run is claimed (leases/) or a report
    is written, a planned study without runs/ is one that has not started."""
    from normlab.runs.store import study_record

    (tmp_path / "study.json").write_text(json.dumps(study_record("fake", "smoke", None, {},
                                                                 ["a" * 12])))
    assert verify_store(tmp_path) == []
    (tmp_path / "runs").mkdir()
    assert verify_store(tmp_path) == []
    assert main(["verify", str(tmp_path)]) == 0
    assert "no run folder yet" in capsys.readouterr().out  # not "every file sound" over none


def test_a_study_without_its_study_file_is_refused_alike_by_every_command(study, capsys):
    out, _ = study
    (out / "study.json").unlink()
    refused_by_every_command(out, f"damaged: {out / 'study.json'}: missing, but report.html "
                                  "shows a study was run here", capsys)
    (out / "report.html").unlink()  # a bare run store, as execute_run writes: its runs are
    assert verify_store(out) == []  # checked; report alone needs the plan
