"""A fake task and fake studies for testing the runner, store, CLI and report without training.

The "fake" task logs `steps` metric rows (a loss that depends on lr and seed) and is steered by
`spec.options`:

    sleep          seconds to sleep per step (so a test can kill a run mid-way)
    diverge_lr     the run diverges at step 2 when lr > diverge_lr
    edge_lr        ... and also at lr == edge_lr when seed + replicate is odd (an edge point)
    replicate      the perturbation replicate (as the train task's option)
    crash          raise RuntimeError(crash) at step 1
    crash_unless   crash unless this file exists (a failure that a re-run can get past)
    counter        append the run id to this file when the run completes (counts executions)

Importing this module registers the task and the study "fake".
Worker processes import it too (the executor imports the module that defines a task).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from normlab.runs.result import RunResult, provenance
from normlab.runs.spec import RunSpec
from normlab.runs.tasks import RunContext, register_task, register_task_check
from normlab.studies.base import AGREES, FigureInfo, Finding, Study, StudyResults, register_study
from normlab.studies.figures import NORM_COLORS, new_figure, save_figure
from normlab.utils.config import ConfigError

LRS = (0.01, 0.1, 1.0)
STEPS = 5
OPTIONS = {"steps": STEPS, "sleep": 0.0, "diverge_lr": None, "edge_lr": None, "replicate": 0,
           "crash": None, "crash_unless": None, "counter": None}


@register_task_check("fake")
def fake_options(spec: RunSpec) -> None:
    """ConfigError for an option the fake task does not take."""
    _, problems = spec.task_options(OPTIONS)
    if problems:
        raise ConfigError(problems)


@register_task("fake")
def fake_task(spec: RunSpec, context: RunContext) -> RunResult:
    options = spec.mapping("options")
    steps = int(options.get("steps", STEPS))
    for step in range(1, steps + 1):
        time.sleep(float(options.get("sleep", 0.0)))
        if "crash" in options and step == 1:
            raise RuntimeError(options["crash"])
        if "crash_unless" in options and not Path(options["crash_unless"]).exists():
            raise RuntimeError(f"{options['crash_unless']} does not exist")
        loss = spec.lr * step + 0.001 * spec.seed
        odd = (spec.seed + options.get("replicate", 0)) % 2
        above = "diverge_lr" in options and spec.lr > options["diverge_lr"]
        if (above or (spec.lr == options.get("edge_lr") and odd)) and step == 2:
            context.log_metrics({"step": step, "train_loss": 1e4})
            return RunResult(status="diverged", steps=step, diverged_step=step,
                             diverged_loss=1e4, provenance=provenance(spec.run_id, "cpu", 0))
        context.log_metrics({"step": step, "train_loss": loss})
        context.progress(step / steps, f"step {step}")
    if "counter" in options:
        with open(options["counter"], "a", encoding="utf-8") as handle:
            handle.write(spec.run_id + "\n")
    final = {"train_loss": loss, "test_acc": 1.0 / (1.0 + spec.lr + 0.01 * spec.seed)}
    return RunResult(status="completed", steps=steps, final=final,
                     provenance=provenance(spec.run_id, "cpu", spec.seed))


@register_study
class FakeStudy(Study):
    name = "fake"
    description = "A fake study: three learning rates of a task that only logs numbers."
    experiments = ("E1",)

    def specs(self, scale: str, data: str | None = None) -> list[RunSpec]:
        return [RunSpec(task="fake", model="mlp", depth=3, norm="none", lr=lr,
                        data=data or "digits", group="E1") for lr in LRS]

    def figures(self, results: StudyResults, fig_dir: Path) -> list[FigureInfo]:
        runs = results.runs
        runs = runs[runs["status"] == "completed"] if "status" in runs else pd.DataFrame(
            columns=["lr", "test_acc"])
        fig, axes = new_figure()
        axes[0, 0].plot(runs["lr"], runs["test_acc"], "o-", color=NORM_COLORS["none"])
        axes[0, 0].set_xscale("log")
        files = save_figure(fig, fig_dir, "fake_acc_vs_lr", runs[["lr", "test_acc"]])
        return [FigureInfo("E1", "fake_acc_vs_lr", "Fake accuracy vs learning rate",
                           "Final fake test accuracy (no norm, eval mode) per learning rate.",
                           files)]

    def findings(self, results: StudyResults) -> list[Finding]:
        return [Finding("E1", "A fake claim", "paper: 1", f"ours: {len(results.runs)}", AGREES)]


def runs_table(out_dir: Path) -> pd.DataFrame:
    """The run table without wall times (which differ between executions)."""
    from normlab.studies import load_results

    runs = load_results(out_dir)
    return runs.drop(columns=["wall_time_s"]).sort_values("run_id").reset_index(drop=True)
