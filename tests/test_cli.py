"""The `normlab` command end to end on the fake study, its error handling, and report.html."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess

import pandas as pd
import pytest
import torch

import fake_study
from normlab.cli import main, parse_overrides
from normlab.report import build_report
from normlab.report.terminal import TerminalProgress, format_table, run_labels
from normlab.runner import run_study
from normlab.runs.result import RunResult
from normlab.runs.spec import RunSpec
from normlab.studies.plan import plan_study
from normlab.utils.config import ConfigError


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """The fake study run once through `normlab run` (one run diverges)."""
    out = tmp_path_factory.mktemp("cli") / "fake"
    code = main(["run", "fake", "--out", str(out), "--set", 'options={"diverge_lr": 0.5}'])
    assert code == 0
    return out


def test_run_writes_every_run_and_a_report(study_dir):
    runs = sorted(p.name for p in (study_dir / "runs").iterdir())
    planned = sorted(s.run_id for s in
                     plan_study("fake", overrides={"options": '{"diverge_lr": 0.5}'}))
    assert runs == planned
    assert (study_dir / "report.html").exists() and (study_dir / "study.json").exists()


def test_report_is_self_contained_and_holds_each_figure(study_dir):
    page = (study_dir / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"<(script|link)\b", page)  # nothing fetched from elsewhere
    assert 'id="fig-fake_acc_vs_lr"' in page and "Fake accuracy vs learning rate" in page
    assert 'href="figures/fake_acc_vs_lr.pdf"' in page
    assert 'href="figures/fake_acc_vs_lr.csv"' in page
    assert (study_dir / "figures" / "fake_acc_vs_lr.pdf").exists()


def test_report_has_run_table_findings_sections_and_environment(study_dir):
    import platform

    import torch

    page = (study_dir / "report.html").read_text()
    for run_dir in (study_dir / "runs").iterdir():
        assert run_dir.name in page
    assert page.count('class="status-completed"') == 2
    assert page.count('class="status-diverged"') == 1
    assert "<th>test_acc</th>" in page and "<th>lr</th>" in page  # metrics, varying settings
    assert '<section id="E1">' in page and "A fake claim" in page
    summary = page.split('<section id="summary">')[1].split("</section>")[0]
    assert "A fake claim" in summary  # the closing claim / paper / normlab / verdict table
    assert torch.__version__ in page and platform.python_version() in page


def test_report_with_a_broken_figure_shows_an_error_box_and_keeps_the_rest(tmp_path,
                                                                           monkeypatch):
    def broken(self, results, fig_dir):
        raise ValueError("this figure is broken on purpose")

    run_study("fake", tmp_path, report=False)
    monkeypatch.setattr(fake_study.FakeStudy, "figures", broken)
    page = build_report(tmp_path).read_text()
    assert 'class="error"' in page and "this figure is broken on purpose" in page
    assert "A fake claim" in page  # findings kept
    assert page.count('class="status-completed"') == 3  # run table kept


def test_report_command_rewrites_the_page(study_dir, capsys):
    (study_dir / "report.html").unlink()
    assert main(["report", str(study_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(study_dir / "report.html")
    assert (study_dir / "report.html").exists()


def test_show_prints_runs_with_status_and_metrics(study_dir, capsys):
    assert main(["show", str(study_dir)]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["run_id", "lr", "status", "steps_done", "test_acc", "diverged_step"]
    for run_dir in (study_dir / "runs").iterdir():
        assert run_dir.name in out
    assert "3 runs: 2 completed, 1 diverged" in out


def test_dry_run_plans_without_running(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "fake", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "into runs/fake-smoke" in out and "3 runs planned: 0 already done, 3 to run." in out
    assert not (tmp_path / "runs").exists()


def test_dry_run_counts_done_and_failed_runs(study_dir, capsys):
    assert main(["run", "fake", "--out", str(study_dir), "--dry-run",
                 "--set", 'options={"diverge_lr": 0.5}']) == 0
    assert "3 runs planned: 3 already done, 0 to run." in capsys.readouterr().out


def test_rerun_skips_finished_runs(study_dir, capsys):
    assert main(["run", "fake", "--out", str(study_dir),
                 "--set", 'options={"diverge_lr": 0.5}']) == 0
    assert "3 runs, 3 already done (skipped), 0 to run" in capsys.readouterr().err


BAD_INPUT = {
    "unknown study": (["run", "nope"], ["The 'study' setting must be one of", "got 'nope'"]),
    "bad key": (["run", "fake", "--set", "learning_rate=0.1"],
                ["Unknown setting 'learning_rate'"]),
    "bad value": (["run", "fake", "--set", "lr=-1"],
                  ["The 'lr' setting must be a float in (0, inf); got -1."]),
    "bad choice": (["run", "fake", "--set", "norm=batchnorm"],
                   ["The 'norm' setting must be one of", "got 'batchnorm'"]),
    "bad scale": (["run", "fake", "--scale", "huge"], ["The 'scale' setting", "got 'huge'"]),
    "malformed set": (["run", "fake", "--set", "lr"], ["'--set' option takes KEY=VALUE"]),
    "bad workers": (["run", "fake", "--workers", "0"], ["'--workers' setting", "got 0"]),
    "bad device": (["run", "fake", "--device", "gpu"], ["'device' setting", "got 'gpu'"]),
    "bad data": (["run", "fake", "--data", "imagenet"], ["'data' setting", "got 'imagenet'"]),
    "bad list": (["list", "bogus"], ["'list' setting", "got 'bogus'"]),
    "not a study folder": (["report", "."], ["is not a study folder"]),
}


@pytest.mark.parametrize("argv, expected", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_exits_2_with_one_line_per_problem(argv, expected, capsys, tmp_path,
                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normlab: error: ")
    for text in expected:
        assert text in lines[0]
    assert not (tmp_path / "runs").exists()


def test_several_problems_are_reported_together(capsys):
    assert main(["run", "nope", "--scale", "huge", "--set", "lr", "--workers", "0"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 4


def test_unknown_command_exits_2(capsys):
    assert main(["explode"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_list_shows_studies_with_descriptions(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    fake = next(line for line in lines if line.startswith("fake "))
    assert "A fake study" in fake and "[E1]" in fake


@pytest.mark.parametrize("what, expected", [("norms", "batch"), ("tasks", "fake"),
                                            ("settings", "lr")])
def test_list_other_registries(what, expected, capsys):
    assert main(["list", what]) == 0
    assert expected in capsys.readouterr().out.split()


def test_parse_overrides_splits_on_the_first_equals_sign():
    assert parse_overrides(["lr=0.1", 'options={"a": "b=c"}']) == {
        "lr": "0.1", "options": '{"a": "b=c"}'}
    with pytest.raises(ConfigError) as info:
        parse_overrides(["lr", "=3"])
    assert len(info.value.problems) == 2


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def progress_output(stream: io.StringIO, interval_s: float = 3600) -> str:
    specs = plan_study("fake")
    progress = TerminalProgress(stream, interval_s=interval_s)
    progress.study_start("fake", specs, specs[1:])
    for fraction in (0.25, 0.5, 0.75):
        progress.run_progress(specs[2].run_id, fraction, f"step {fraction}")
    progress.run_end(specs[2], RunResult("diverged", steps=3, diverged_step=3,
                                         diverged_loss=2e3), done=1, total=2)
    progress.study_end()
    return stream.getvalue()


def test_runs_are_labelled_by_the_settings_that_vary():
    specs = plan_study("fake")
    assert list(run_labels(specs).values()) == ["lr=0.01", "lr=0.1", "lr=1"]
    seeds = [s.replace(seed=k) for s in specs[:2] for k in (0, 1)]
    assert list(run_labels(seeds).values()) == [
        "lr=0.01 seed=0", "lr=0.01 seed=1", "lr=0.1 seed=0", "lr=0.1 seed=1"]
    assert run_labels(specs[:1]) == {specs[0].run_id: specs[0].run_id}  # nothing varies
    mixed = [specs[0].replace(group="a", width=8), specs[1].replace(group="b", norm="batch")]
    # norm and lr first, so that a label cut short still shows them
    assert list(run_labels(mixed, width=20).values()) == ["norm=none lr=0.01 g…",
                                                          "norm=batch lr=0.1 g…"]


def test_progress_draws_live_bars_on_a_terminal():
    out = progress_output(FakeTerminal())
    assert out.startswith("fake: 3 runs, 1 already done (skipped), 2 to run\n")
    assert "\033[" in out  # drawn by rich, redrawn in place
    assert "[2/3] lr=1: diverged in 0.0 s at step 3, loss 2000 | 0:00:00 elapsed" in out


def test_progress_prints_plain_throttled_lines_when_not_a_terminal():
    out = progress_output(io.StringIO())
    assert "\r" not in out and "\033" not in out
    lines = out.splitlines()
    assert len(lines) == 3  # the study line, one progress line (throttled), the run's end
    assert lines[1].startswith("[2/3] lr=1: 25% step 0.25 | 0:00:00 elapsed, about 0:00:")
    assert lines[1].endswith(" left")
    assert lines[2].startswith("[2/3] lr=1: diverged in 0.0 s at step 3, loss 2000 | ")
    unthrottled = progress_output(io.StringIO(), interval_s=0).splitlines()
    assert len(unthrottled) == 5 and "75% step 0.75" in unthrottled[3]


def test_run_prints_plain_progress_lines_into_a_log(tmp_path, capsys):
    assert main(["run", "fake", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err  # pytest's capture is not a terminal
    assert "\033" not in err
    for label in ("lr=0.01", "lr=0.1", "lr=1"):
        assert re.search(rf"\[\d/3\] {re.escape(label)}: completed in [\d.]+ s test_acc=", err)


def test_dry_run_shows_failed_and_unfinished_runs_as_to_be_redone(tmp_path, capsys):
    crash = ["--set", 'options={"crash": "boom"}']
    assert main(["run", "fake", "--out", str(tmp_path), *crash]) == 1  # runs failed
    killed = next((tmp_path / "runs").iterdir())
    (killed / "result.json").unlink()  # as if killed before its result was written
    capsys.readouterr()
    assert main(["run", "fake", "--out", str(tmp_path), "--dry-run", *crash]) == 0
    out = capsys.readouterr().out
    assert out.count(" failed") == 3 and out.count(" unfinished") == 1
    assert "3 runs planned: 0 already done, 3 to run (2 failed, to be retried)." in out


def test_format_table_aligns_columns_and_cuts_long_cells():
    rows = pd.DataFrame({"name": ["a", "bbb"], "value": [0.123456, float("nan")],
                         "probes": ["x" * 60, "y"]})
    lines = format_table(rows, ["name", "value", "probes", "missing"], max_width=10).splitlines()
    assert lines[0].split() == ["name", "value", "probes"]
    assert lines[2] == "a     0.1235  xxxxxxxxx…"
    assert lines[3].rstrip() == "bbb           y"


def test_show_works_on_a_bare_run_store(tmp_path, capsys):
    from normlab.runs.tasks import execute_run

    execute_run(RunSpec(task="fake", model="mlp", depth=3, lr=0.3), tmp_path)
    assert main(["show", str(tmp_path)]) == 0
    assert "1 run: 1 completed" in capsys.readouterr().out
    assert main(["show", str(tmp_path / "nothing")]) == 2
    assert "is not a study folder" in capsys.readouterr().err


def test_device_option_sets_the_auto_device_without_changing_run_ids(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("NORMLAB_DEVICE", "")  # restored after the test
    assert main(["run", "fake", "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert os.environ["NORMLAB_DEVICE"] == "cpu"
    planned = sorted(s.run_id for s in plan_study("fake"))
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == planned


# -- the whole plan is checked before the first run ------------------------------------------------

DIGITS = "1" * 5000
PLAN_PROBLEMS = {
    "the docs' options example on a train study": (
        ["run", "lr-sweep", "--set", 'options={"sleep": 1}'],
        ["The 'options' setting of the 'train' task may only hold", "got 'sleep'"]),
    "groups that do not divide the channels": (
        ["run", "lr-sweep", "--set", "norm=group", "--set", 'norm_options={"groups": 3}'],
        ["norm=group, norm_options={'groups': 3}", "must divide the 8 channels"]),
    "a seed beyond int64": (["run", "fake", "--set", "seed=99999999999999999999999"],
                            ["The 'seed' setting must be an int in [0, 2147483647]"]),
    "an absurd depth": (["run", "fake", "--set", "depth=60002"],
                        ["The 'depth' setting must be an int in [1, 1202]; got 60002."]),
    "an lr of 5000 digits": (["run", "fake", "--set", f"lr={DIGITS}"],
                             ["The 'lr' setting could not be read", "5000 characters"]),
    "options nested beyond the recursion limit": (
        ["run", "fake", "--set", "options=" + "[" * 100_000],
        ["The 'options' setting nests lists or mappings too deeply"]),
    "options nested 40 levels": (
        ["run", "fake", "--set", 'options={"a": ' + "[" * 40 + "]" * 40 + "}"],
        ["The 'options' setting may nest lists and mappings at most 16 levels deep; got 41."]),
    "an option the fake task does not take": (
        ["run", "fake", "--set", 'options={"slep": 1}'], ["got 'slep'"]),
    "four problems at once": (
        ["run", "lr-sweep", "--scale", "huge", "--set", "lr=-1", "--set", "learning_rate=0.1",
         "--workers", "0"],
        ["'scale' setting", "'--workers' setting", "Unknown setting 'learning_rate'",
         "The 'lr' setting must be a float in (0, inf); got -1."]),
}


@pytest.mark.parametrize("argv, expected", PLAN_PROBLEMS.values(), ids=PLAN_PROBLEMS.keys())
def test_a_bad_plan_exits_2_before_any_run(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err) < 3000
    assert all(line.startswith("normlab: error: ") for line in err.splitlines())
    for text in expected:
        assert text in err
    if "--workers" in argv:
        assert len(err.splitlines()) == 4  # one line a problem
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("argv, env, expected", [
    (["--device", "cuda"], None, "--device cuda: CUDA is not available on this machine"),
    (["--set", "device=cuda:1"], None, "'device' setting 'cuda:1': CUDA is not available"),
    ([], "tpu", "NORMLAB_DEVICE=tpu: the device must be one of 'cpu', 'cuda', 'cuda:N', 'mps'"),
    ([], "cuda", "NORMLAB_DEVICE=cuda: CUDA is not available"),
], ids=["--device cuda", "device=cuda:1", "NORMLAB_DEVICE=tpu", "NORMLAB_DEVICE=cuda"])
def test_a_device_this_machine_lacks_exits_2(argv, env, expected, tmp_path, capsys,
                                             monkeypatch):
    if env is not None:
        monkeypatch.setenv("NORMLAB_DEVICE", env)
    assert main(["run", "fake", "--out", str(tmp_path / "out"), *argv]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_output_folder_is_checked_before_any_run(tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    runs_file = tmp_path / "runs-is-a-file"
    runs_file.mkdir()
    (runs_file / "runs").write_text("")
    cases = {a_file: "is a file, not a folder", a_file / "below": f"{a_file} is not a folder",
             runs_file: "runs is a file, but the output folder keeps its runs in a folder"}
    for out, expected in cases.items():
        assert main(["run", "fake", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into folders without write bits")
def test_an_unwritable_output_folder_exits_2(tmp_path, capsys):
    tmp_path.chmod(0o500)
    try:
        assert main(["run", "fake", "--out", str(tmp_path / "out")]) == 2
    finally:
        tmp_path.chmod(0o700)
    assert "cannot be written" in capsys.readouterr().err


def test_an_immutable_output_folder_exits_2(tmp_path, capsys):
    if subprocess.run(["chattr", "+i", str(tmp_path)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here")
    try:
        assert main(["run", "fake", "--out", str(tmp_path)]) == 2
    finally:
        subprocess.run(["chattr", "-i", str(tmp_path)], check=True)
    assert "cannot be written" in capsys.readouterr().err


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (a real small disk), unmounted afterwards; skipped where mount is refused."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_disk_without_room_exits_2_before_any_run(small_disk, capsys):
    assert main(["run", "fake", "--out", str(small_disk / "out")]) == 2
    assert "MiB free; normlab asks for at least 100 MiB" in capsys.readouterr().err


def test_a_disk_that_fills_up_ends_in_a_message(small_disk, capsys, monkeypatch):
    monkeypatch.setattr("normlab.execute.preflight.MIN_FREE_BYTES", 0)
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:  # fill the disk to the last byte
            handle.write(b"\0" * 4096)
    assert main(["run", "fake", "--out", str(small_disk / "out")]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err


def test_report_on_a_read_only_folder_ends_in_a_message(small_disk, capsys, monkeypatch):
    monkeypatch.setattr("normlab.execute.preflight.MIN_FREE_BYTES", 0)
    assert main(["run", "fake", "--out", str(small_disk)]) == 0
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert main(["report", str(small_disk)]) == 1
    err = capsys.readouterr().err
    assert "Read-only file system" in err and "Traceback" not in err


def test_overrides_that_collapse_the_grid_are_reported_and_run_once(tmp_path, capsys):
    collapse = ["--set", "lr=0.1"]
    assert main(["run", "fake", "--out", str(tmp_path), "--dry-run", *collapse]) == 0
    out = capsys.readouterr().out
    assert "3 specs, 1 distinct run: the overrides make 2 of them duplicates" in out
    assert "1 runs planned: 0 already done, 1 to run." in out
    assert main(["run", "fake", "--out", str(tmp_path), *collapse]) == 0
    assert "fake: 1 runs, 0 already done (skipped), 1 to run" in capsys.readouterr().err
    assert len(list((tmp_path / "runs").iterdir())) == 1


def test_run_exits_1_after_the_summary_when_a_run_failed(tmp_path, capsys):
    assert main(["run", "fake", "--out", str(tmp_path), "--set", 'options={"crash": "x"}']) == 1
    captured = capsys.readouterr()
    assert "3 runs: 3 failed" in captured.out
    assert "3 run(s) failed" in captured.err


def test_bench_names_its_benchmarks_and_says_when_there_are_none(capsys, monkeypatch):
    assert main(["bench", "nope"]) == 2
    err = capsys.readouterr().err
    assert ("'frontier', 'hessian', 'live_log', 'packed', 'per_example', 'startup', "
            "'train_throughput'; got 'nope'") in err
    monkeypatch.setattr("normlab.cli.bench.benchmarks_dir", lambda: None)
    assert main(["bench"]) == 2
    assert "runs the scripts in benchmarks/ of a source checkout" in capsys.readouterr().err


def test_bench_runs_each_script_with_the_flags_and_stops_at_a_failure(tmp_path, capfd,
                                                                      monkeypatch):
    (tmp_path / "_helper.py").write_text("raise SystemExit('a helper is not a benchmark')\n")
    (tmp_path / "a.py").write_text("import sys; print('ran a', sys.argv[1:])\n")
    (tmp_path / "b.py").write_text("import sys; print('ran b'); sys.exit(3)\n")
    (tmp_path / "c.py").write_text("print('ran c')\n")
    monkeypatch.setattr("normlab.cli.bench.benchmarks_dir", lambda: tmp_path)
    assert main(["bench", "a", "--quick", "--device", "cpu"]) == 0
    assert "ran a ['--quick', '--device', 'cpu']" in capfd.readouterr().out
    assert main(["bench"]) == 3
    out = capfd.readouterr().out
    assert "ran a" in out and "ran b" in out and "ran c" not in out
    assert "$ python benchmarks/b.py" in out
