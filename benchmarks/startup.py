"""Startup time of the commands that import no torch, against `python -c pass` in the same run.

    python benchmarks/startup.py            # 10 repeats of each command
    python benchmarks/startup.py --quick    # 3 repeats

Each row is one command in a fresh process: the median wall time over the repeats (after one
unmeasured warm-up, which fills the OS file cache), the process's CPU time (user + system; the
steadier measure on a machine shared with other jobs), and the ratio of the median to the
baseline `python -c pass` measured in the same run. The target (issue 22): `normlab --version`,
`--help` and `list` under 1 s. `python -c "import torch"` is what each of them cost before, for
reference. `--device` is accepted (`normlab bench` passes it) and unused: nothing here runs on
a device. Like the other benchmarks it reports and does not fail: a loaded machine is slower.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

NORMLAB = [sys.executable, "-m", "normlab.cli"]
COMMANDS = {  # label -> argv
    "python -c pass (baseline)": [sys.executable, "-c", "pass"],
    "python -c 'import normlab.cli'": [sys.executable, "-c", "import normlab.cli"],
    "normlab --version": [*NORMLAB, "--version"],
    "normlab --help": [*NORMLAB, "--help"],
    "normlab list": [*NORMLAB, "list"],
    "normlab run --help": [*NORMLAB, "run", "--help"],
    "python -c 'import torch' (reference)": [sys.executable, "-c", "import torch"],
}
TARGET_S = 1.0
TARGETED = ("normlab --version", "normlab --help", "normlab list")


def timed(argv: list[str], repeats: int) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds) of running `argv` to its end."""
    subprocess.run(argv, check=True, capture_output=True)  # warm-up
    walls, cpus = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 10")
    parser.add_argument("--device", default=None, help="unused (nothing runs on a device)")
    args = parser.parse_args()
    repeats = 3 if args.quick else 10
    rows = {label: timed(argv, repeats) for label, argv in COMMANDS.items()}
    baseline = rows["python -c pass (baseline)"][0]
    width = max(len(label) for label in rows)
    print(f"startup, median of {repeats} (Python {sys.version.split()[0]})")
    print(f"{'command'.ljust(width)}  wall s  CPU s  x baseline  under {TARGET_S:g} s")
    for label, (wall, cpu) in rows.items():
        verdict = ("yes" if wall < TARGET_S else "NO") if label in TARGETED else ""
        print(f"{label.ljust(width)}  {wall:6.3f}  {cpu:5.3f}  {wall / baseline:10.1f}  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
