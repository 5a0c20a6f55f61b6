"""Options of `normlab run` that used to be silently ignored or misread are refused (exit 2)
before anything runs, in one line each."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

import fake_study  # noqa: F401 (registers the "fake" task and study)
from normlab.cli import main
from normlab.execute.ray import address_problem

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
    "ray address, no port": (
        ["--executor", "ray", "--ray-address", "headnode"],
        "The '--ray-address' setting must be host:port, ray://host:port or 'auto'; "
        "got 'headnode'."),
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


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_a_ray_address_nobody_answers_at_is_refused_within_seconds(dry_run, tmp_path, capsys):
    address = f"127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    assert main(["run", "fake", "--out", str(tmp_path / "study"), "--executor", "ray",
                 "--ray-address", address, *dry_run]) == 2
    assert time.monotonic() - start < 60  # ray.init would have hung for minutes
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"normlab: error: No Ray cluster answers at '--ray-address' "
                           f"'{address}' within 5 s")
    assert list(tmp_path.iterdir()) == []


def test_a_ray_address_that_accepts_a_connection_passes_the_check():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        host, port = server.getsockname()
        assert address_problem(f"{host}:{port}") is None
        assert address_problem(f"ray://{host}:{port}") is None
    assert address_problem(None) is None and address_problem("auto") is None


def test_executor_flags_with_their_executor_are_taken(tmp_path, capsys):
    assert main(["run", "fake", "--out", str(tmp_path), "--dry-run", "--executor", "slurm",
                 "--slurm-partition", "gpu", "--slurm-time-min", "5"]) == 0
    assert main(["run", "fake", "--out", str(tmp_path), "--dry-run", "--executor", "ray",
                 "--ray-cpus-per-run", "2"]) == 0
    assert "error" not in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["run", "fake", "--checkpoint-every", "-1epochs"],
     "normlab: error: The 'checkpoint_every' setting must be N minutes ('10min'), N epochs "
     "('2epochs') with N > 0, or 'off'; got '-1epochs'."),
    (["run", "fake", "--workers", "-1"],
     "normlab: error: The '--workers' setting must be an int in [1, inf); got -1."),
    (["run", "fake", "--workers", "x"],
     "normlab run: error: argument --workers: invalid int value: 'x' (`normlab run --help` "
     "lists the options)"),
    (["run", "fake", "--out", "--dry-run"],
     "normlab run: error: argument --out: expected one argument (`normlab run --help` lists "
     "the options)"),
])
def test_a_bad_option_value_gets_one_line(argv, expected, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [expected]


def test_bench_refuses_a_device_this_machine_lacks_before_any_benchmark(tmp_path, capsys,
                                                                       monkeypatch):
    (tmp_path / "a.py").write_text("open('ran', 'w')\n")
    monkeypatch.setattr("normlab.cli.bench.benchmarks_dir", lambda: tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--device", "tpu"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "normlab: error: --device tpu: the device must be one of 'cpu', 'cuda', 'cuda:N', "
        "'mps'; got 'tpu'."]
    assert not (tmp_path / "ran").exists()


def test_an_interrupted_bench_does_not_promise_a_resume(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    (tmp_path / "a.py").write_text("")
    monkeypatch.setattr("normlab.cli.bench.benchmarks_dir", lambda: tmp_path)
    monkeypatch.setattr("normlab.cli.bench.subprocess.run", interrupted)
    assert main(["bench"]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "normlab: interrupted."


def test_python_m_normlab_cli_is_the_normlab_command():
    done = subprocess.run([sys.executable, "-m", "normlab.cli", "list", "bogus"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "The 'list' setting must be one of" in done.stderr
