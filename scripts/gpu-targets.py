"""The GPU targets of issues 9 and 10, checked against what `scripts/gpu-check.sh OUTDIR` measured.

    python scripts/gpu-targets.py OUTDIR    # prints the table, writes OUTDIR/targets.txt

Reads the benchmarks' rows (throughput.json, per_example.json, hessian.json, packed.json,
packed110.json, written with their --json option), the smoke paper study's status and wall time
in summary.txt, and the reduced plan's device-hours in estimate.log (`normlab run paper --scale
reduced --dry-run --device cuda`, read after the packed rows were recorded). Each target is
"met", "missed", "undecided" (a bound on the wrong side of it) or "not measured" with the
reason: a part that failed or did not run, or a measurement at other settings than the
target's. The absolute images/s are the issues' H200
figures. Standard library only; exit status 0 whatever the verdicts (2 for a bad OUTDIR).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple


class Value(NamedTuple):
    """A measured value; `side` says whether it is exact or a bound on the true value
    ("upper": the true value is at most this, "lower": at least)."""

    value: float
    note: str = ""
    side: str = "exact"


Measured = Value | str  # a value, or why there is none


@dataclass(frozen=True)
class Target:
    issue: int
    what: str
    relation: str  # ">=" or "<="
    bound: float
    measure: Callable[[Path], Measured]
    part: str | None = None  # the benchmark whose JSON `measure` reads

    def verdict(self, out: Path) -> tuple[str, str]:
        """(measured, verdict) as printed. A bound decides only on its own side: an upper
        bound within a "<=" target meets it, a lower bound beyond it misses it. A benchmark
        that ran on a CPU measures nothing here (the targets are a GPU's)."""
        device = measured_on(out, self.part) if self.part else None
        if device is not None and device.startswith("CPU"):
            return "-", f"not measured: {self.part} ran on {device}, not a GPU"
        got = self.measure(out)
        if isinstance(got, str):
            return "-", f"not measured: {got}"
        value, note, side = got
        met = value >= self.bound if self.relation == ">=" else value <= self.bound
        decides = side == "exact" or met == ((side == "upper") == (self.relation == "<="))
        word = ("met" if met else "missed") if decides else "undecided"
        shown = f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
        return shown, word + (f" ({note})" if note else "")


def measured_on(out: Path, part: str) -> str | None:
    """The device named in a benchmark's JSON (benchmarks/_timing.py: "CPU ..." on a CPU)."""
    path = out / f"{part}.json"
    return json.loads(path.read_text(encoding="utf-8"))["device"] if path.is_file() else None


def rows(out: Path, part: str) -> list[dict[str, Any]] | str:
    path = out / f"{part}.json"
    if not path.is_file():
        return f"no {part}.json (the part failed or did not run: see {part}.log)"
    return json.loads(path.read_text(encoding="utf-8"))["rows"]


def row_value(part: str, column: str, transform: Callable[[float], float] = float,
              **match: Any) -> Callable[[Path], Measured]:
    """The `column` of the first row of `part` whose fields equal `match`."""
    def measure(out: Path) -> Measured:
        found = rows(out, part)
        if isinstance(found, str):
            return found
        hits = [r for r in found if all(r.get(k) == v for k, v in match.items())]
        if not hits:
            wanted = ", ".join(f"{k}={v}" for k, v in match.items())
            return f"{part}.json has no row with {wanted}"
        return Value(transform(hits[0][column]))
    return measure


def best_packed(out: Path) -> Measured:
    found = rows(out, "packed110")
    if isinstance(found, str):
        return found
    packed = [r for r in found if r["kind"] == "packed"]
    if not packed:
        return "packed110.json has no packed rows"
    best = max(packed, key=lambda r: r["images_per_s"])
    return Value(best["images_per_s"], f"K = {best['pack']}")


def paper_seconds(out: Path) -> Measured:
    """Wall seconds of the smoke paper study, if it finished every run."""
    summary = out / "summary.txt"
    if not summary.is_file():
        return "no summary.txt"
    line = next((ln for ln in summary.read_text().splitlines() if ln.startswith("paper ")), "")
    if not line:
        return "summary.txt has no paper line"
    if "passed" in line:
        return Value(float(line.split()[2]))
    limit = re.search(r"TIMEOUT \((\d+)s\)", line)
    if limit:
        log = out / "paper.log"
        done = re.search(r"paper: (\d+) runs finished", log.read_text()) if log.is_file() else None
        return Value(float(limit.group(1)), f"stopped at its time limit with "
                     f"{done.group(1) if done else '?'} runs finished", "lower")
    if "SKIPPED" in line:
        return "skipped " + line[line.index("("):]
    return line.split()[1].lower() + " (see paper.log)"


def reduced_estimate(out: Path) -> Measured:
    """GPU-hours of the reduced plan from the dry run's "estimate on cuda" line."""
    log = out / "estimate.log"
    if not log.is_file():
        return "no estimate.log"
    found = re.search(r"estimate on cuda \(packs of at most \d+\): (at most )?([\d.]+) "
                      r"device-(hours|minutes)", log.read_text())
    if not found:
        return "estimate.log has no 'estimate on cuda' line (see it)"
    hours = float(found.group(2)) / (60 if found.group(3) == "minutes" else 1)
    if found.group(1):
        return Value(hours, "some batch sizes not measured", "upper")
    return Value(hours)


def on_rows(issue: int, what: str, relation: str, bound: float, part: str, column: str,
            transform: Callable[[float], float] = float, **match: Any) -> Target:
    """A target read off one row of a benchmark's JSON (see `row_value`)."""
    return Target(issue, what, relation, bound, row_value(part, column, transform, **match), part)


GRAPH = "normlab, CUDA graph"
TARGETS = (
    on_rows(9, "ResNet-20, b128: CUDA-graph loop / plain loop", ">=", 2.0, "throughput", "ratio",
            depth=20, loop=GRAPH),
    on_rows(9, "ResNet-20, b128: CUDA-graph images/s (H200)", ">=", 19_000, "throughput",
            "images_per_s", depth=20, loop=GRAPH),
    on_rows(9, "ResNet-110, b128: CUDA-graph loop / plain loop", ">=", 2.0, "throughput",
            "ratio", depth=110, loop=GRAPH),
    on_rows(9, "contributions / backward, BN", "<=", 3.0, "per_example", "x_backward",
            method="contributions", norm="batch"),
    on_rows(9, "contributions / backward, no norm", "<=", 3.0, "per_example", "x_backward",
            method="contributions", norm="none"),
    on_rows(9, "HVP / gradient, BN: reused graph, eager", "<=", 3.0, "hessian", "x_gradient",
            quantity="HVP (reused graph)", norm="batch"),
    on_rows(9, "HVP / gradient, BN: both CUDA graphs (GPU default)", "<=", 3.0, "hessian",
            "x_graph_gradient", quantity="HVP (CUDA graph)", norm="batch"),
    on_rows(9, "exact per-example, BN, B=128: naive loop / exact", ">=", 2.0, "per_example",
            "x_naive", lambda x: 1 / x, method="exact (auto)", norm="batch", batch=128),
    Target(9, "smoke paper study on one GPU, seconds", "<=", 300, paper_seconds),
    on_rows(10, "ResNet-20, b128, K=8: packed / solo run", ">=", 4.0, "packed", "x_solo",
            kind="packed", pack=8, batch=128),
    on_rows(10, "ResNet-20, b128, K=8: aggregate images/s (H200)", ">=", 49_000, "packed",
            "images_per_s", kind="packed", pack=8, batch=128),
    Target(10, "ResNet-110, b128: best aggregate images/s", ">=", 14_000, best_packed,
           "packed110"),
    Target(10, "reduced plan (--dry-run), GPU-hours", "<=", 3.0, reduced_estimate),
    Target(10, "smoke paper study on one GPU, seconds", "<=", 180, paper_seconds),
)


def table(out: Path) -> str:
    lines = [f"{'issue':<6}{'target':<52}{'bound':>10}  {'measured':>10}  verdict"]
    for target in TARGETS:
        measured, verdict = target.verdict(out)
        bound = f"{target.relation} {target.bound:,g}"
        lines.append(f"{target.issue:<6}{target.what:<52}{bound:>10}  {measured:>10}  {verdict}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python scripts/gpu-targets.py OUTDIR  (a folder gpu-check.sh wrote)",
              file=sys.stderr)
        return 2
    out = Path(argv[0])
    text = table(out)
    print(text)
    (out / "targets.txt").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
