"""scripts/gpu-targets.py: issues 9 and 10's GPU targets read off gpu-check.sh's outputs.

The verdicts are checked on a folder written here in the formats the benchmarks and gpu-check.sh
write (a GPU's device name, values chosen on both sides of each bound); the formats themselves
are checked by running the benchmarks on this CPU with --json and reading them back.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    path = ROOT / "scripts" / "gpu-targets.py"
    spec = importlib.util.spec_from_file_location("gpu_targets", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_targets"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


targets = load_script()


def write(out: Path, part: str, rows: list[dict], device: str = "NVIDIA H200") -> None:
    (out / f"{part}.json").write_text(json.dumps({"benchmark": part, "device": device,
                                                  "rows": rows}))


def verdicts(out: Path) -> dict[str, str]:
    assert targets.main([str(out)]) == 0
    lines = (out / "targets.txt").read_text().splitlines()[1:]
    return {t.what + f" [{t.issue}]": line.split(None, 1)[1][len(t.what):].split(None, 3)[-1]
            for t, line in zip(targets.TARGETS, lines, strict=True)}


def test_each_target_is_met_missed_or_undecided_by_what_was_measured(tmp_path):
    graph = "normlab, CUDA graph"
    write(tmp_path, "throughput", [
        {"depth": 20, "loop": graph, "images_per_s": 30_000.0, "ratio": 2.5},
        {"depth": 110, "loop": graph, "images_per_s": 4_000.0, "ratio": 1.5}])
    write(tmp_path, "per_example", [
        {"norm": "none", "batch": 128, "method": "contributions", "x_backward": 2.0},
        {"norm": "batch", "batch": 128, "method": "contributions", "x_backward": 3.5},
        {"norm": "batch", "batch": 128, "method": "exact (auto)", "x_naive": 0.4}])
    write(tmp_path, "hessian", [
        {"norm": "batch", "quantity": "HVP (reused graph)", "x_gradient": 4.2},
        {"norm": "batch", "quantity": "HVP (CUDA graph)", "x_gradient": 2.0,
         "x_graph_gradient": 2.9}])
    write(tmp_path, "packed", [{"batch": 128, "kind": "packed", "pack": 8,
                                "images_per_s": 50_000.0, "x_solo": 4.4}])
    write(tmp_path, "packed110", [{"kind": "packed", "pack": k, "images_per_s": v}
                                  for k, v in {4: 9_000.0, 8: 15_000.0}.items()])
    (tmp_path / "summary.txt").write_text(
        "normlab gpu-check\npart status wall_s\npaper        TIMEOUT (200s)         205.1\n")
    (tmp_path / "paper.log").write_text("...\npaper: 100 runs finished (result.json files)\n")
    (tmp_path / "estimate.log").write_text(
        "estimate on cuda (packs of at most 16): at most 38.75 device-hours for 32x32 images\n")
    got = verdicts(tmp_path)
    assert got == {
        "ResNet-20, b128: CUDA-graph loop / plain loop [9]": "met",
        "ResNet-20, b128: CUDA-graph images/s (H200) [9]": "met",
        "ResNet-110, b128: CUDA-graph loop / plain loop [9]": "missed",
        "contributions / backward, BN [9]": "missed",
        "contributions / backward, no norm [9]": "met",
        "HVP / gradient, BN: reused graph, eager [9]": "missed",
        "HVP / gradient, BN: both CUDA graphs (GPU default) [9]": "met",
        "exact per-example, BN, B=128: naive loop / exact [9]": "met",
        # stopped at 200 s: at least 200 s, which neither meets nor misses 300 s ...
        "smoke paper study on one GPU, seconds [9]":
            "undecided (stopped at its time limit with 100 runs finished)",
        "ResNet-20, b128, K=8: packed / solo run [10]": "met",
        "ResNet-20, b128, K=8: aggregate images/s (H200) [10]": "met",
        "ResNet-110, b128: best aggregate images/s [10]": "met (K = 8)",
        # ... an upper bound above 3 h decides nothing either ...
        "reduced plan (--dry-run), GPU-hours [10]": "undecided (some batch sizes not measured)",
        # ... but at least 200 s is more than 180 s
        "smoke paper study on one GPU, seconds [10]":
            "missed (stopped at its time limit with 100 runs finished)",
    }
    # an upper bound within the target meets it; minutes are read as minutes
    (tmp_path / "estimate.log").write_text(
        "estimate on cuda (packs of at most 16): at most 90.0 device-minutes for 32x32 images\n")
    (tmp_path / "summary.txt").write_text("x\ny\npaper        passed         150.0\n")
    got = verdicts(tmp_path)
    assert got["reduced plan (--dry-run), GPU-hours [10]"] == \
        "met (some batch sizes not measured)"
    assert got["smoke paper study on one GPU, seconds [10]"] == "met"
    assert "1.50" in (tmp_path / "targets.txt").read_text()


def test_what_did_not_run_or_ran_on_a_cpu_is_not_measured(tmp_path):
    write(tmp_path, "hessian", [{"norm": "batch", "quantity": "HVP (reused graph)",
                                 "x_gradient": 2.0}], device="CPU x86_64, 2 threads")
    write(tmp_path, "per_example", [{"norm": "batch", "batch": 16, "method": "exact (auto)",
                                     "x_naive": 0.1}])
    (tmp_path / "summary.txt").write_text("x\ny\npaper        SKIPPED      -  (only 12s left)\n")
    got = verdicts(tmp_path)
    assert got["HVP / gradient, BN: reused graph, eager [9]"] == \
        "not measured: hessian ran on CPU x86_64, 2 threads, not a GPU"
    assert got["exact per-example, BN, B=128: naive loop / exact [9]"].startswith(
        "not measured: per_example.json has no row with method=exact (auto), norm=batch, "
        "batch=128")
    assert got["ResNet-20, b128, K=8: packed / solo run [10]"].startswith(
        "not measured: no packed.json (the part failed or did not run")
    assert got["smoke paper study on one GPU, seconds [9]"] == \
        "not measured: skipped (only 12s left)"
    assert targets.main([str(tmp_path / "missing")]) == 2


@pytest.mark.slow
def test_the_benchmarks_json_has_what_the_targets_read(tmp_path):
    """Each benchmark run here with --json: the targets it can measure on a CPU find their
    rows (the CUDA-graph loop, B = 128 exact gradients and ResNet-110 need a GPU or more time)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    commands = {
        "per_example": ["--batch", "4", "--repeats", "1", "--chunks", "4"],
        "hessian": ["--batch", "4", "--repeats", "1", "--power-iters", "5"],
        "packed": ["--device", "cpu", "--batch", "16", "128", "--packs", "8", "--steps", "1",
                   "--warmup", "1", "--repeats", "1"],
        "throughput": ["--quick", "--device", "cpu"],
    }
    for part, flags in commands.items():
        script = "train_throughput" if part == "throughput" else part
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *flags,
                        "--json", str(tmp_path / f"{part}.json")], env=env, check=True,
                       capture_output=True, timeout=300)
    measurable = {"contributions / backward, BN", "contributions / backward, no norm",
                  "HVP / gradient, BN: reused graph, eager",
                  "ResNet-20, b128, K=8: packed / solo run",
                  "ResNet-20, b128, K=8: aggregate images/s (H200)"}
    for target in targets.TARGETS:
        got = target.measure(tmp_path)
        if target.what in measurable:
            assert isinstance(got, targets.Value) and got.value > 0, (target.what, got)
        else:
            assert isinstance(got, str), (target.what, got)
    throughput = json.loads((tmp_path / "throughput.json").read_text())
    assert throughput["device"].startswith("CPU") and throughput["rows"][0]["depth"] == 20
