"""Options of `normlab run` that used to be silently ignored or misread are refused (exit 2)
before anything runs, in one line each."""

from __future__ import annotations

import pytest

import fake_study  # noqa: F401 (registers the "fake" task and study)
from normlab.cli import main

REFUSED = {
    "empty out": (["--out", ""], "The '--out' setting must be a folder path; got '' "
                                 "(without --out, the study goes to runs/STUDY-SCALE)."),
    "blank out": (["--out", "  "], "The '--out' setting must be a folder path; got '  ' "
                                   "(without --out, the study goes to runs/STUDY-SCALE)."),
    "slurm flag, local executor": (
        ["--slurm-partition", "gpu"],
        "The '--slurm-partition' option applies only with '--executor slurm'; "
        "got '--executor local'."),
    "slurm config, ray executor": (
        ["--executor", "ray", "--slurm-config", "s.json", "--slurm-time-min", "5"],
        "The '--slurm-time-min', '--slurm-config' options apply only with '--executor slurm'; "
        "got '--executor ray'."),
    "ray flag at its default value": (
        ["--ray-cpus-per-run", "1"],
        "The '--ray-cpus-per-run' option applies only with '--executor ray'; "
        "got '--executor local'."),
    "ray flags, slurm executor": (
        ["--executor", "slurm", "--ray-address", "auto", "--ray-max-retries", "3"],
        "The '--ray-address', '--ray-max-retries' options apply only with '--executor ray'; "
        "got '--executor slurm'."),
}


@pytest.mark.parametrize("argv, expected", REFUSED.values(), ids=REFUSED.keys())
@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_refused_before_anything_runs(argv, expected, dry_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "--out" not in argv:
        argv = [*argv, "--out", "study"]
    assert main(["run", "fake", *argv, *dry_run]) == 2
    err = capsys.readouterr().err
    assert f"normlab: error: {expected}" in err.splitlines()
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the default folder


def test_executor_flags_with_their_executor_are_taken(tmp_path, capsys):
    assert main(["run", "fake", "--out", str(tmp_path), "--dry-run", "--executor", "slurm",
                 "--slurm-partition", "gpu", "--slurm-time-min", "5"]) == 0
    assert main(["run", "fake", "--out", str(tmp_path), "--dry-run", "--executor", "ray",
                 "--ray-cpus-per-run", "2"]) == 0
    assert "error" not in capsys.readouterr().err
