"""`normlab --version`, `--help` and `list` start without importing torch (or the other heavy
libraries), and the study index they list from matches the study registry. Times are measured
in benchmarks/startup.py, not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from normlab.cli.listing import STUDY_INDEX, registered_studies, study_lines, study_rows

HEAVY = {"torch", "numpy", "pandas", "matplotlib", "rich", "scipy", "submitit", "ray"}


def imported_heavy_modules(argv: list[str]) -> set[str]:
    """The heavy top-level packages a fresh `python -X importtime ARGV...` imports."""
    done = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    names = {line.rsplit("|", 1)[-1].strip().split(".")[0]
             for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "normlab" in names  # the probe sees imports at all
    return names & HEAVY


@pytest.mark.parametrize("argv", [
    ["-c", "import normlab.cli"],
    ["-m", "normlab.cli", "--version"],
    ["-m", "normlab.cli", "--help"],
    ["-m", "normlab.cli", "run", "--help"],
    ["-m", "normlab.cli", "list"],
], ids=["import", "--version", "--help", "run --help", "list"])
def test_startup_imports_no_torch(argv):
    assert imported_heavy_modules(argv) == set()


def test_the_probe_sees_torch_where_a_command_needs_it():
    assert "torch" in imported_heavy_modules(["-m", "normlab.cli", "list", "norms"])


def test_the_study_index_is_the_registry():
    index = [(row["name"], row["description"], tuple(row["experiments"]))
             for row in json.loads(STUDY_INDEX.read_text(encoding="utf-8"))]
    assert index == registered_studies(builtin_only=True), (
        "normlab/cli/study_index.json is out of date: `python -m normlab.cli.listing` rewrites "
        "it from the registry")


def test_list_in_a_fresh_process_prints_the_registry():
    listed = subprocess.run([sys.executable, "-m", "normlab.cli", "list"], capture_output=True,
                            text=True, timeout=120, check=True).stdout.splitlines()
    assert listed == study_lines(registered_studies(builtin_only=True))


def test_a_loaded_registry_is_listed_with_the_studies_registered_in_this_process():
    import fake_study  # noqa: F401 (registers the study "fake")

    assert "fake" in [name for name, _, _ in study_rows()]
