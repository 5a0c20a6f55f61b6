"""The scripts in examples/ run, at tiny size, as a user would run them."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = {
    "resnet18_probes.py": ["--width", "4", "--image-size", "8", "--batch", "4", "--device",
                           "cpu"],
    "transformer_block_probes.py": ["--dim", "8", "--tokens", "4", "--batch", "4", "--device",
                                    "cpu"],
    "training_loop_probes.py": ["--steps", "6", "--every", "3", "--device", "cpu"],
}


def test_every_example_is_run_here():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(TINY)


@pytest.mark.parametrize("script", sorted(TINY))
def test_example_runs_at_tiny_size(script, monkeypatch, capsys, tmp_path):
    args = TINY[script]
    if script == "training_loop_probes.py":
        args = [*args, "--out", str(tmp_path / "log.csv")]
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    out = capsys.readouterr().out
    assert out.strip()
    if script == "training_loop_probes.py":
        assert "identical to the run without: True" in out
        assert (tmp_path / "log.csv").stat().st_size > 0
    if script == "transformer_block_probes.py":
        assert "method=vmap" in out and "Dropout in train mode" in out
    if script == "resnet18_probes.py":
        assert "method=vjp" in out
