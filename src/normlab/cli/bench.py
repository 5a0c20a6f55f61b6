"""`normlab bench`: run the benchmark scripts of a source checkout (`benchmarks/*.py`).

Each benchmark is a script that prints a table of ratios against a baseline measured in the same
run (see benchmarks/RESULTS.md); this only finds the scripts and runs them one after the other
with the same Python. An installed wheel has no benchmarks/: the message says where to get them.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from normlab.utils.config import ConfigError, choice_problem


def benchmarks_dir() -> Path | None:
    """benchmarks/ of the checkout normlab is imported from (an editable install), else None."""
    folder = Path(__file__).resolve().parents[3] / "benchmarks"
    return folder if folder.is_dir() else None


def available(folder: Path) -> list[str]:
    """The benchmark names in `folder`: its scripts, without helpers starting with "_"."""
    return sorted(p.stem for p in folder.glob("*.py") if not p.name.startswith("_"))


def run_benchmarks(names: Sequence[str] = (), quick: bool = False,
                   device: str | None = None) -> int:
    """Run the named benchmarks (all when none are named); the exit code of the first that
    fails, else 0. Unknown names and a device this machine lacks are refused first."""
    folder = benchmarks_dir()
    if folder is None:
        raise ConfigError("`normlab bench` runs the scripts in benchmarks/ of a source checkout, "
                          "and this normlab is installed without them: clone the repository "
                          "and `pip install -e .` from it.")
    known = available(folder)
    problems = [choice_problem("benchmark", name, known) for name in names if name not in known]
    if device is not None:
        # imported on use: the device check imports torch (1.3 s), which `bench NAME` without
        # --device leaves to the benchmark scripts
        from normlab.execute.preflight import device_problem

        problem = device_problem(device, f"--device {device}")
        problems += [problem] if problem else []
    if problems:
        raise ConfigError(problems)
    flags = (["--quick"] if quick else []) + (["--device", device] if device else [])
    for name in names or known:
        command = [sys.executable, str(folder / f"{name}.py"), *flags]
        print(f"$ python benchmarks/{name}.py {' '.join(flags)}".rstrip(), flush=True)
        code = subprocess.run(command, check=False).returncode
        if code:
            return code
    return 0
