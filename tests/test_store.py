"""The run store: one folder per run, result.json atomic and last, corrupt files named."""

from __future__ import annotations

import hashlib
import json

import pytest

import fake_study
from normlab.runs.result import RunResult
from normlab.runs.spec import RunSpec
from normlab.runs.store import CorruptRecordError, RunStore, append_jsonl, read_jsonl, read_result
from normlab.runs.tasks import execute_run
from normlab.studies import StudyResults, load_results
from normlab.utils.atomic import atomic_write_json


def spec(**changes) -> RunSpec:
    return RunSpec(task="fake", model="mlp", depth=3, **changes)


def test_run_folder_is_named_by_the_spec_hash_and_holds_the_spec(tmp_path):
    store = RunStore(tmp_path)
    run_dir = store.begin(spec())
    assert run_dir == tmp_path / "runs" / spec().run_id
    assert RunSpec.from_dict(json.loads((run_dir / "spec.json").read_text())) == spec()
    assert not store.is_done(spec())


@pytest.mark.parametrize(("status", "done"), [("completed", True), ("diverged", True),
                                              ("failed", False)])
def test_a_run_is_done_when_its_result_has_a_final_status(tmp_path, status, done):
    store = RunStore(tmp_path)
    store.begin(spec())
    fields = {"diverged": {"steps": 3, "diverged_step": 3}, "failed": {"error": "boom"}}
    store.finish(spec(), RunResult(status=status, **fields.get(status, {})))
    assert store.is_done(spec()) is done


def test_begin_clears_an_unfinished_attempt(tmp_path):
    store = RunStore(tmp_path)
    run_dir = store.begin(spec())
    append_jsonl(run_dir / "metrics.jsonl", [{"step": 1}])
    (run_dir / "metrics.jsonl").open("a").write('{"step": 2, "trai')  # killed mid-line
    store.begin(spec())
    assert sorted(p.name for p in run_dir.iterdir()) == ["spec.json"]


def test_an_interrupted_result_write_does_not_make_a_run_done(tmp_path):
    """A kill during the atomic write leaves only a temp file, never a partial result.json."""
    store = RunStore(tmp_path)
    run_dir = store.begin(spec())
    (run_dir / ".result.json.abc123.tmp").write_text('{"status": "compl')
    assert not store.is_done(spec())
    assert load_results(tmp_path)["status"].tolist() == ["unfinished"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "result.json"
    atomic_write_json(path, {"status": "completed"})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"status": object()})
    assert json.loads(path.read_text()) == {"status": "completed"}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temp file left


def test_corrupt_jsonl_line_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(CorruptRecordError) as info:
        read_jsonl(path)
    assert str(path) in str(info.value) and "line 2" in str(info.value)


@pytest.mark.parametrize("text", ['{"status": "comp', '{"state": "completed"}', "[1, 2]",
                                  '{"status": "finished"}'])
def test_corrupt_result_is_named(tmp_path, text):
    path = tmp_path / "result.json"
    path.write_text(text)
    with pytest.raises(CorruptRecordError) as info:
        read_result(path)
    assert str(path) in str(info.value)


def test_is_done_reports_a_corrupt_result_by_name(tmp_path):
    store = RunStore(tmp_path)
    run_dir = store.begin(spec())
    (run_dir / "result.json").write_text("{not json")
    with pytest.raises(CorruptRecordError, match=str(run_dir / "result.json")):
        store.is_done(spec())


def test_execute_run_writes_spec_metrics_and_result(tmp_path):
    result = execute_run(spec(lr=0.5), tmp_path)
    run_dir = tmp_path / "runs" / spec(lr=0.5).run_id
    assert result.status == "completed" and result.steps == fake_study.STEPS
    assert read_result(run_dir / "result.json") == result
    assert [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_load_results_is_one_tidy_row_per_run(tmp_path):
    execute_run(spec(lr=0.5, options={"diverge_lr": 0.1}), tmp_path)
    execute_run(spec(lr=0.01), tmp_path)
    RunStore(tmp_path).begin(spec(lr=0.02))  # started, never finished
    runs = load_results(tmp_path).set_index("lr")
    assert runs.loc[0.5, "status"] == "diverged" and runs.loc[0.5, "diverged_step"] == 2
    assert runs.loc[0.01, "status"] == "completed"
    assert runs.loc[0.01, "test_acc"] == pytest.approx(1 / 1.01)
    assert runs.loc[0.02, "status"] == "unfinished"
    assert runs.loc[0.5, "options.diverge_lr"] == 0.1  # mapping settings flattened


def test_metrics_skip_unfinished_runs_and_name_corrupt_finished_ones(tmp_path):
    execute_run(spec(lr=0.01), tmp_path)
    killed = RunStore(tmp_path).begin(spec(lr=0.02))
    (killed / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "tra')  # killed mid-line
    metrics = StudyResults.load(tmp_path).metrics()
    assert set(metrics["lr"]) == {0.01}
    finished = tmp_path / "runs" / spec(lr=0.01).run_id / "metrics.jsonl"
    finished.write_text(finished.read_text() + "garbage\n")
    with pytest.raises(CorruptRecordError) as info:
        StudyResults.load(tmp_path).metrics()
    assert str(finished) in str(info.value) and "line 6" in str(info.value)


def test_in_group_selects_the_runs_of_one_group(tmp_path):
    import pandas as pd

    runs = pd.DataFrame({"run_id": ["a", "b", "c"], "group": ["E1", "R1", "E1"]})
    results = StudyResults(tmp_path, runs)
    assert list(results.in_group("E1")["run_id"]) == ["a", "c"]
    assert results.in_group("R9").empty
    assert StudyResults(tmp_path, pd.DataFrame()).in_group("E1").empty


def test_results_keep_the_step_budget_beside_the_steps_done(tmp_path):
    spec, store = RunSpec(steps=7), RunStore(tmp_path)
    store.begin(spec)
    store.finish(spec, RunResult(status="diverged", steps=3, diverged_step=3, diverged_loss=None))
    row = load_results(tmp_path).iloc[0]
    assert row["steps"] == 7 and row["steps_done"] == 3


def test_finish_records_the_size_lines_and_digest_of_the_run_files(tmp_path):
    store = RunStore(tmp_path)
    run_dir = store.begin(spec())
    append_jsonl(run_dir / "metrics.jsonl", [{"step": 1}, {"step": 2}])
    store.finish(spec(), RunResult("completed"))
    stored = json.loads((run_dir / "result.json").read_text())
    content = (run_dir / "metrics.jsonl").read_bytes()
    assert stored["files"] == {"metrics.jsonl": {
        "bytes": len(content), "rows": 2, "sha256": hashlib.sha256(content).hexdigest()}}
    assert read_result(run_dir / "result.json") == RunResult("completed")


def test_set_aside_moves_a_run_and_never_overwrites_an_earlier_one(tmp_path):
    store = RunStore(tmp_path)
    for expected in ("damaged/" + spec().run_id, f"damaged/{spec().run_id}-2"):
        (store.begin(spec()) / "marker").write_text(expected)
        assert store.set_aside(spec().run_id) == tmp_path / expected
        assert (tmp_path / expected / "marker").read_text() == expected
    assert not store.run_dir(spec()).exists()


def test_a_line_that_is_not_text_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n\xff\xfe\n')
    with pytest.raises(CorruptRecordError, match=r"metrics.jsonl, line 2: not valid JSON"):
        read_jsonl(path)
