"""What `--log-to` costs the main job: the smoke lr-sweep without live logging, with
`--log-to tensorboard:DIR`, and with `--log-to mlflow:URI` to a local MLflow server.

    python benchmarks/live_log.py                 # 2 repeats of each row (about 10 minutes)
    python benchmarks/live_log.py --quick         # 1 repeat, --set steps=40
    python benchmarks/live_log.py --repeats 3

Each run is `normlab run lr-sweep --scale smoke` (the README's main job, report and the closing
export included) in its own process and folder, timed by wall clock and by the process's CPU
time (user + system: the MLflow server's own CPU is not in it, its wall-clock effect is). The
rows take turns, repeat by repeat, so that a machine whose load drifts affects each row alike;
the table gives the median of the repeats and its ratio to the row without live logging
(target: at most 1.10, issue 21). The MLflow server is the test suite's (tests/mlflow_server.py:
SQLite, one worker, a loopback port), started once before the rows. A row whose extra is not
installed (tensorboardX, mlflow) is left out, with a line saying so.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
from pathlib import Path

import pandas as pd
from frontier import main_job

from normlab.report.terminal import format_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from mlflow_server import MlflowServer  # the tests' real server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, every run 40 steps")
    parser.add_argument("--repeats", type=int, default=None, help="repeats of each row (2)")
    parser.add_argument("--device", default=None, help="--device of every run")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 2)
    settings = ["steps=40"] if args.quick else []
    rows = [row for row, module in (("tensorboard", "tensorboardX"), ("mlflow", "mlflow"))
            if importlib.util.find_spec(module) is not None]
    for row in {"tensorboard", "mlflow"} - set(rows):
        print(f"left out: the {row} row (pip install 'normlab[test]')", file=sys.stderr)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "mlflow").mkdir()
        server = MlflowServer(root / "mlflow")
        if "mlflow" in rows:
            server.start()
        try:
            times: dict[str, list[tuple[float, float]]] = {}
            for repeat in range(repeats):
                for row, extra in (("without", []),
                                   ("tensorboard", ["--log-to", f"tensorboard:{root}/tb{repeat}"]),
                                   ("mlflow", ["--log-to", f"mlflow:{server.uri}"])):
                    if row != "without" and row not in rows:
                        continue
                    out = root / f"{row}{repeat}"
                    seconds, cpu = main_job(out, settings, None, args.device, extra)
                    times.setdefault(row, []).append((seconds, cpu))
                    print(f"{row} #{repeat + 1}: {seconds:.1f} s wall, {cpu:.1f} s CPU",
                          file=sys.stderr, flush=True)
        finally:
            server.stop()
    table = pd.DataFrame([{"log-to": row, "repeats": len(pairs),
                           "wall_s": statistics.median(w for w, _ in pairs),
                           "cpu_s": statistics.median(c for _, c in pairs)}
                          for row, pairs in times.items()])
    table["wall x without"] = table["wall_s"] / table["wall_s"].iloc[0]
    table["cpu x without"] = table["cpu_s"] / table["cpu_s"].iloc[0]
    print(f"smoke lr-sweep{', 40 steps' if settings else ''}: `normlab run` with and without "
          "--log-to (report and closing export included); medians and ratios to 'without'")
    print(format_table(table, ["log-to", "repeats", "wall_s", "cpu_s", "wall x without",
                               "cpu x without"]))


if __name__ == "__main__":
    main()
