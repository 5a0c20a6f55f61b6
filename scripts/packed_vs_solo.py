"""Is p(diverge | packed) equal to p(diverge | solo)? Perturbation replicates of edge points.

    python scripts/packed_vs_solo.py --out DIR [--replicates 64] [--pack 8]

Takes the smoke lr-sweep's runs at the points where its replicates found 0 < p(diverge) < 1
(`POINTS`: norm, depth, lr, at the smoke budget of 3 epochs), makes perturbation replicates
0 .. R-1 of each (`options.replicate`, docs/training.md), and trains every one twice: alone by
the plain loop (`normlab.train.train`, single convolutions) into DIR/solo, and in packs of
`--pack` into DIR/packed (normlab's LocalExecutor, the path `normlab run --pack` takes; on a CPU
a lone run there is a pack of one, normlab.train.invariance, which is why the solo side is the
plain loop). Then it pairs the two folders run by run (normlab.studies._compare) and prints,
over the runs at edge points (0 < p < 1 in either folder) and per point: p(diverge) alone and
packed, the runs that diverged one way only, McNemar's exact test and a 95 % interval of the
difference. Resumable: finished runs in DIR are kept. Cost: 2 x R x len(POINTS) smoke runs
(about an hour on the 2-core CPU at R = 64).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from normlab.execute.local import LocalExecutor
from normlab.report.terminal import format_table
from normlab.runs.store import RunStore
from normlab.runs.tasks import RunContext
from normlab.studies import get_study, load_results
from normlab.studies._compare import paired_divergence, paired_runs
from normlab.studies._frontier import with_replicate
from normlab.train import train

POINTS = (("group", 20, 3.0), ("instance", 20, 10.0), ("batch", 8, 10.0), ("batch", 20, 10.0))
POINT = ["norm", "depth", "lr"]


def replicates(count: int) -> list:
    """Replicates 0 .. count-1 of the smoke lr-sweep's seed-0 run at each point of POINTS."""
    specs = {(s.norm, s.depth, s.lr): s for s in get_study("lr-sweep").specs("smoke")
             if s.group in ("sweep", "E10")}
    return [with_replicate(specs[point], r) if r else specs[point]
            for point in POINTS for r in range(count)]


def train_packed(specs: list, out: Path, pack: int) -> None:
    for _ in LocalExecutor(pack=pack).run(specs, out):
        pass


def train_plain(specs: list, out: Path) -> None:
    """Each spec by the plain loop into its run folder (finished ones kept)."""
    store = RunStore(out)
    for spec in specs:
        if (store.run_dir(spec) / "result.json").exists():
            continue
        run_dir = store.begin(spec)
        store.finish(spec, train(spec, context=RunContext(run_id=spec.run_id, run_dir=run_dir)))


def report(solo: Path, packed: Path) -> None:
    pairs = paired_runs(load_results(solo), load_results(packed))
    edge = pairs[pairs["edge_a"].astype(bool) | pairs["edge_b"].astype(bool)]
    rows = []
    for key, part in [(("all edge points", "", ""), edge), *edge.groupby(POINT)]:
        counts = paired_divergence(part)
        low, high = counts.interval
        rows.append({**dict(zip(POINT, key, strict=True)), "runs": counts.runs,
                     "p_solo": counts.p_a, "p_packed": counts.p_b,
                     "solo_only": counts.only_a, "packed_only": counts.only_b,
                     "difference": counts.difference, "ci95_low": low, "ci95_high": high,
                     "mcnemar_p": counts.p_value})
    print(f"{len(edge)} runs at edge points (of {len(pairs)} paired runs): p(diverge) alone "
          f"and packed, runs that diverged one way only, McNemar's exact test, 95 % Wald "
          f"interval of p_packed - p_solo")
    print(format_table(pd.DataFrame(rows), list(rows[0])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for DIR/solo and DIR/packed")
    parser.add_argument("--replicates", type=int, default=64, help="replicates per point")
    parser.add_argument("--pack", type=int, default=8, help="pack size of the packed runs")
    args = parser.parse_args()
    specs = replicates(args.replicates)
    out = Path(args.out)
    train_plain(specs, out / "solo")
    train_packed(specs, out / "packed", args.pack)
    report(out / "solo", out / "packed")


if __name__ == "__main__":
    main()
