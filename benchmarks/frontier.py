"""The main job's frontier and cost: the smoke lr-sweep with and without replicates, packed and not.

    python benchmarks/frontier.py                  # four runs of the smoke lr-sweep (minutes)
    python benchmarks/frontier.py --quick          # the same with --set steps=40
    python benchmarks/frontier.py --steps 40 --replicates 39 --keep DIR
                                                   # packed vs solo over 200+ edge runs

Each row is `normlab run lr-sweep --scale smoke` in its own process and folder, timed with its
report (as the README's main job runs) by wall clock and by the process's CPU time (user +
system; on a machine shared with other jobs the CPU time is the steadier measure, best with
OMP_NUM_THREADS=1, where no thread spins waiting for a core):
- before: `--set replicates=0` (main's plan before issue 18: the same run ids), default --pack:
  the baseline;
- after: the default replicates, default --pack: the main job now; its ratio to "before" is the
  cost of the replicates (target <= 1.5 on the 2-core CPU, issue 18);
- pack 1, pack 8: the default replicates with --pack 1 and --pack 8.

Then, pack 1 against pack 8: how many runs have byte-identical metric rows in both folders (on
a CPU all of them, normlab.train.invariance); whether the findings' verdicts agree and every
curve's frontier brackets agree (or at least meet); the runs whose status differs between the
two, whether each is an edge run in both folders (issue 18's criterion) and whether each lies
within its curve's bracket in both; and over the runs at edge points (0 < p < 1 in either
folder)
the paired comparison of p(diverge | pack 8) with p(diverge | pack 1): McNemar's exact test and
a 95 % interval (normlab.studies._compare). `--replicates R` sets the replicates of the last
three rows (more edge runs for the comparison).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from normlab.report.terminal import format_table
from normlab.studies import StudyResults, get_study, load_results
from normlab.studies._compare import (
    brackets_overlap,
    flipped_runs,
    paired_divergence,
    paired_runs,
    same_brackets,
    verdicts,
    within_bracket,
)
from normlab.studies._lr_sweep_figures import divergence_table

CURVE = ["group", "norm", "depth"]


def main_job(out: Path, settings: list[str], pack: int | None, device: str | None,
             extra: Sequence[str] = ()) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of `normlab run lr-sweep --scale smoke` into `out` (its
    report included), with the options `extra`."""
    command = [sys.executable, "-m", "normlab.cli", "run", "lr-sweep", "--scale", "smoke",
               "--out", str(out), *(["--pack", str(pack)] if pack else []),
               *(["--device", device] if device else []), *extra]
    for setting in settings:
        command += ["--set", setting]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          check=False)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"error: {' '.join(command)} exited {done.returncode}:\n"
                         f"{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu


def compare(solo: Path, packed: Path) -> None:
    """Pack 1 (a) against pack 8 (b): verdicts, brackets, flipped runs, p(diverge)."""
    study, results = get_study("lr-sweep"), [StudyResults.load(d) for d in (solo, packed)]
    agree_verdicts = verdicts(study.findings(results[0])) == verdicts(study.findings(results[1]))
    brackets = [divergence_table(r) for r in results]
    curve = ["depth", "norm"]
    bracket_text = ("agree" if same_brackets(*brackets, curve) else
                    "differ but meet" if brackets_overlap(*brackets, curve) else "DO NOT MEET")
    pairs = paired_runs(load_results(solo), load_results(packed))
    identical = sum((solo / "runs" / run_id / "metrics.jsonl").read_bytes()
                    == (packed / "runs" / run_id / "metrics.jsonl").read_bytes()
                    for run_id in pairs["run_id"])
    print(f"\npack 1 vs pack 8: {identical} of {len(pairs)} runs have byte-identical metric rows.")
    flipped = flipped_runs(pairs)
    not_edge = flipped[~(flipped["edge_a"].astype(bool) & flipped["edge_b"].astype(bool))]
    inside = within_bracket(flipped, brackets[0], curve) & within_bracket(flipped, brackets[1],
                                                                            curve)
    print(f"pack 1 vs pack 8: verdicts {'agree' if agree_verdicts else 'DIFFER'}, frontier "
          f"brackets {bracket_text}; {len(flipped)} of {len(pairs)} runs changed status: "
          f"{len(not_edge)} of them not an edge run (0 < p < 1) in both folders, "
          f"{int((~inside).sum())} outside their curve's bracket in either folder.")
    if len(flipped):
        shown = flipped.assign(replicate=flipped.get("options.replicate"))
        print(format_table(shown, [*CURVE, "lr", "seed", "replicate", "status_a", "status_b",
                                   "p_diverge_a", "p_diverge_b"]))
    edge = pairs[pairs["edge_a"].astype(bool) | pairs["edge_b"].astype(bool)]
    counts = paired_divergence(edge)
    low, high = counts.interval
    print(f"\nover the {counts.runs} runs at edge points (0 < p < 1 in either folder): "
          f"p(diverge | pack 1) = {counts.p_a:.3f}, p(diverge | pack 8) = {counts.p_b:.3f}, "
          f"difference {counts.difference:+.3f} (95 % interval {low:+.3f} .. {high:+.3f}); "
          f"diverged with pack 1 only: {counts.only_a}, with pack 8 only: {counts.only_b}; "
          f"McNemar exact p = {counts.p_value:.3g}.")
    per_point = pd.DataFrame([{**dict(zip([*CURVE, "lr"], key, strict=True)),
                               **vars(paired_divergence(part))}
                              for key, part in edge.groupby([*CURVE, "lr"])])
    print(format_table(per_point, [*CURVE, "lr", "runs", "diverged_a", "diverged_b", "only_a",
                                   "only_b"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every run 40 steps (--steps 40)")
    parser.add_argument("--steps", type=int, default=None, help="--set steps=N in every row")
    parser.add_argument("--replicates", type=int, default=None,
                        help="--set replicates=R in the rows after the baseline")
    parser.add_argument("--keep", default=None, metavar="DIR",
                        help="write the four study folders under DIR (default: a temporary one)")
    parser.add_argument("--device", default=None, help="--device of every run")
    args = parser.parse_args()
    steps = 40 if args.quick and args.steps is None else args.steps
    common = [f"steps={steps}"] if steps else []
    after = common + ([f"replicates={args.replicates}"] if args.replicates is not None else [])
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.keep or scratch)
        rows = []
        for name, settings, pack in (("before (replicates=0)", [*common, "replicates=0"], None),
                                     ("after (default replicates)", after, None),
                                     ("pack 1", after, 1), ("pack 8", after, 8)):
            out = root / name.split(" (")[0].replace(" ", "")
            seconds, cpu = main_job(out, settings, pack, args.device)
            runs = load_results(out)
            rows.append({"row": name, "pack": pack or "default", "wall_s": seconds,
                         "cpu_s": cpu, "runs": len(runs), "edge_runs": int(runs["edge"].sum())})
            print(f"{name}: {seconds:.1f} s wall, {cpu:.1f} s CPU", file=sys.stderr, flush=True)
        table = pd.DataFrame(rows)
        table["wall x before"] = table["wall_s"] / table["wall_s"].iloc[0]
        table["cpu x before"] = table["cpu_s"] / table["cpu_s"].iloc[0]
        print(f"smoke lr-sweep{f', {steps} steps' if steps else ''}: wall and CPU time of "
              f"`normlab run` (report included), ratios to the row before issue 18's replicates")
        print(format_table(table, ["row", "pack", "runs", "edge_runs", "wall_s", "cpu_s",
                                   "wall x before", "cpu x before"]))
        compare(root / "pack1", root / "pack8")


if __name__ == "__main__":
    main()
