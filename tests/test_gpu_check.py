"""scripts/gpu-check.sh, run for real on a machine without CUDA.

Its parts cannot pass here, which is the point: every part must still be attempted under its
own timeout, say why it failed in one line, be reported in summary.txt with its status, fail
the script's exit status, and leave the recorded throughput table alone (rows are written only
by a benchmark that measured them).
On a GPU the script itself is the check (see docs/training.md).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "src" / "normlab" / "execute" / "packing_throughput.json"
PARTS = ("nvidia-smi", "versions", "tests", "throughput", "packed", "packed110", "packed_small",
         "estimate", "paper", "per_example", "hessian", "thr_nhwc")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_check(out: Path, budget_s: int, timeout: int) -> tuple[int, str, str]:
    """Run the script on this machine with `budget_s`: (exit status, its output, summary.txt)."""
    env = {**os.environ, "GPU_CHECK_BUDGET_S": str(budget_s), "PYTHON": sys.executable}
    env.pop("NORMLAB_TEST_DEVICE", None)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout[-2000:] + done.stderr[-2000:], \
        (out / "summary.txt").read_text()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path without a GPU")
def test_gpu_check_attempts_every_part_and_reports_the_failures(tmp_path):
    out = tmp_path / "out"
    before = digest(TABLE)
    code, output, summary = run_check(out, 100, timeout=400)
    assert code == 1, output
    status = {line.split()[0]: line.split()[1] for line in summary.splitlines()[2:-1]}
    assert tuple(status) == PARTS
    assert status["versions"] == "passed"  # python and torch report themselves without a GPU
    for name in ("tests", "throughput", "packed", "packed110", "packed_small", "estimate",
                 "per_example", "hessian", "thr_nhwc"):
        assert status[name] == "FAILED", (name, (out / f"{name}.log").read_text()[-1500:])
    # 100 s of budget less the parts before it and the 110 s kept for the later ones: no paper
    assert status["paper"] == "SKIPPED" and "budget left" in summary
    for name in ("tests", "throughput", "packed", "estimate", "per_example", "hessian"):
        log = (out / f"{name}.log").read_text()  # one clear line, not a traceback
        assert "CUDA is not available" in log and "Traceback" not in log, log
    targets = (out / "targets.txt").read_text().splitlines()[1:]  # one line per target
    assert len(targets) == 14 and all("not measured" in line for line in targets), targets
    assert digest(TABLE) == before  # nothing measured, nothing recorded
    assert digest(out / "packing_throughput.json") == before  # the copy for the report


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path without a GPU")
def test_gpu_check_keeps_to_its_budget(tmp_path):
    """Each part's timeout is capped by what is left of the budget, and once it is spent the
    remaining parts are skipped, said so in the summary: the lease is never overrun."""
    out = tmp_path / "out"
    code, output, summary = run_check(out, 8, timeout=120)
    assert code == 1, output
    spent = [line.split()[0] for line in summary.splitlines() if "budget is spent" in line]
    assert spent and spent[-1] == "thr_nhwc", summary  # the last part, at least, never ran
    total = int(summary.splitlines()[-1].split()[1])
    assert total <= 8 + 5 + 2, summary  # the budget, the kill grace, the summary
