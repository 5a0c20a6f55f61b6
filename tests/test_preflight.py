"""The plan check (`normlab.execute.preflight`): what would fail later is refused before the
first run, with exit code 2, a message naming the setting, the value and what is allowed, and
nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fake_study  # noqa: F401  (registers the fake study and task)
from normlab.cli import main


def refused(argv: list[str], out: Path, expected: str, capsys) -> None:
    """`normlab run ... --out out` exits 2 naming `expected`, and writes nothing (nothing new
    in the pytest folder that holds `out`)."""
    anchor = next(p for p in out.parents if p.name.startswith("test_"))
    before = sorted(anchor.rglob("*"))
    capsys.readouterr()
    assert main(["run", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err
    assert sorted(anchor.rglob("*")) == before


def test_a_batch_larger_than_the_training_data_is_refused(tmp_path, capsys):
    """digits has 1347 training images; every step draws a full batch."""
    refused(["lr-sweep", "--set", "batch_size=100000"], tmp_path / "out",
            "The 'batch_size' setting must be an int in [1, 1347] (the training images of "
            "'digits', each step drawing a full batch); got 100000.", capsys)
    refused(["lr-sweep", "--set", 'data_options={"test_fraction": 0.5}', "--set",
             "batch_size=1000", "--dry-run"], tmp_path / "out",
            "must be an int in [1, 898]", capsys)
    assert main(["run", "lr-sweep", "--set", "batch_size=1347", "--dry-run", "--out",
                 str(tmp_path / "out")]) == 0


def test_data_that_is_not_cached_and_cannot_be_downloaded_is_refused(tmp_path, monkeypatch,
                                                                      capsys):
    """Not 60 failed run folders: the check looks in the cache, then asks the download address
    (here a port that refuses). A dry run, maybe on another machine than the runs, does not
    ask."""
    monkeypatch.setenv("NORMLAB_DATA", str(tmp_path / "cache"))
    unreachable = 'data_options={"url": "http://127.0.0.1:9/cifar-10-python.tar.gz"}'
    refused(["lr-sweep", "--data", "cifar10", "--set", unreachable], tmp_path / "out",
            "In runs on data 'cifar10' with data_options {'url': 'http://127.0.0.1:9/"
            "cifar-10-python.tar.gz'}: CIFAR-10 is not in the cache", capsys)
    refused(["lr-sweep", "--data", "cifar10", "--set", 'data_options={"download": false}'],
            tmp_path / "out", "and download=False", capsys)
    assert main(["run", "lr-sweep", "--data", "cifar10", "--set", unreachable, "--dry-run",
                 "--out", str(tmp_path / "out")]) == 0


@pytest.mark.parametrize("env, expected", [
    ({"NORMLAB_LEASE_HEARTBEAT_S": "-1"},
     "The 'NORMLAB_LEASE_HEARTBEAT_S' setting must be a float in (0, inf); got '-1'."),
    ({"NORMLAB_LEASE_STALE_S": "soon"},
     "The 'NORMLAB_LEASE_STALE_S' setting must be a float in (0, inf); got 'soon'."),
    ({"NORMLAB_LEASE_HEARTBEAT_S": "10", "NORMLAB_LEASE_STALE_S": "15"},
     "The 'NORMLAB_LEASE_STALE_S' setting must be more than twice NORMLAB_LEASE_HEARTBEAT_S"),
], ids=["negative heartbeat", "stale not a number", "stale under two heartbeats"])
def test_bad_lease_timings_are_refused_before_the_plan_is_written(env, expected, tmp_path,
                                                                   monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    refused(["fake"], tmp_path / "out", expected, capsys)


@pytest.mark.parametrize("name, make, expected", [
    ("leases", Path.write_text, "leases is a file, but the output folder keeps its leases in "
                                "a folder of that name"),
    (".staging", Path.write_text, ".staging is a file, but"),
    ("study.json", Path.mkdir, "study.json is a folder, but the study writes its study.json "
                               "file there"),
    ("report.html", Path.mkdir, "report.html is a folder, but"),
])
def test_a_path_the_study_writes_of_the_wrong_kind_is_refused(name, make, expected, tmp_path,
                                                               capsys):
    out = tmp_path / "out"
    out.mkdir()
    if make is Path.write_text:
        (out / name).write_text("")
    else:
        (out / name).mkdir()
    capsys.readouterr()
    assert main(["run", "fake", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (out / "runs").exists()


def test_an_output_name_longer_than_the_file_system_allows_is_refused(tmp_path, capsys):
    refused(["fake"], tmp_path / ("x" * 300), "has a name of 300 bytes ('xxxxxxxxxx", capsys)
    deep = tmp_path.joinpath(*["d" * 200] * 21)  # 21 * 201 bytes: past PATH_MAX with the runs
    refused(["fake"], deep, "the files of its runs would pass this system's limit of", capsys)
    fits = tmp_path.joinpath(*["d" * 200] * 3)
    assert main(["run", "fake", "--out", str(fits)]) == 0
    assert json.loads((fits / "study.json").read_text())["study"] == "fake"
