"""The `gradients` study: the structure of gradients with and without normalization (E3-E8, R6).

For every norm kind, one run of the "gradients" task: a ResNet at a chosen depth and init is
trained for `steps` SGD steps (BN-family nets at lr 0.1, the unnormalized net at 1e-4, as in the
paper), and at the steps in `measure_at` (default: initialization and after the last step) the
task measures, on a fixed measurement batch of training images and a held-out batch of test
images:
- E3 the histogram and tail statistics of the middle layer's mini-batch gradient;
- E4 (at `step_loss_at`, default mini-batches 1, 4, 7) the relative loss along the gradient;
- E5 the anatomy of a step along the gradient at three depths;
- E6 per-channel activation statistics every few layers;
- E7 the output-layer gradients;
- E8/R6 the gradient coherence (Table 1) at three depths;
- per-example gradient spectra (exact loss gradients and contributions) at every measured layer.
Every probe runs with normalization in train mode (batch statistics), running statistics frozen.
"Mini-batch k" in the paper's numbering is the model after k - 1 updates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from normlab.config import ConfigError, interval_problem
from normlab.result import RunResult
from normlab.spec import RunSpec
from normlab.studies import _gradients_figures as figures_module
from normlab.studies.base import (
    FigureInfo,
    Finding,
    Study,
    StudyResults,
    check_scale,
    default_data,
    register_study,
)
from normlab.tasks import RunContext, register_task

PAPER_DEPTHS = (8, 44, 80)  # of 110: the paper's anatomy layers, scaled to other depths


def default_options(depth: int, steps: int, probe_batch: int, points: int) -> dict[str, Any]:
    """The task's measurement plan for a network of `depth` weight layers."""
    layers = sorted({max(1, round(depth * d / 110)) for d in PAPER_DEPTHS})
    return {"measure_at": [0, steps], "step_loss_at": [0, 3, 6], "probe_batch": probe_batch,
            "layers": layers, "histogram_layer": max(1, depth // 2),
            "stats_every": max(1, round(depth / 9)), "anatomy_points": points}


def task_options(spec: RunSpec) -> dict[str, Any]:
    """The "gradients" task's options, validated (all problems at once)."""
    options, problems = spec.task_options(
        default_options(spec.depth, spec.steps or 1, min(32, spec.batch_size), 20))
    for key in ("measure_at", "step_loss_at", "layers"):
        value = options[key]
        if not (isinstance(value, list) and value and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
            problems.append(f"The 'options.{key}' setting must be a non-empty list of ints "
                            f">= 0; got {value!r}.")
    for key, low in (("probe_batch", 2), ("histogram_layer", 1), ("stats_every", 1),
                     ("anatomy_points", 2)):
        problem = interval_problem(f"options.{key}", options[key], low, kind=int,
                                   low_open=False)
        problems += [problem] if problem else []
    if spec.steps is None:
        problems.append("The 'steps' setting must be set for the 'gradients' task (the number "
                        "of SGD steps between the measurements); got None.")
    if problems:
        raise ConfigError(problems)
    return options


@register_task("gradients")
def gradients_task(spec: RunSpec, context: RunContext) -> RunResult:
    """Train `spec.steps` steps and measure E3-E8 at `options.measure_at` (see module doc)."""
    from normlab.studies._gradients_measure import Measurement
    from normlab.train import train

    options = task_options(spec)
    training = spec.replace(task="train", options={}, probes=())
    measurement = Measurement(options, context)
    result = train(training, callbacks=[measurement], context=context)
    result.provenance["run_id"] = spec.run_id
    return result


@register_study
class GradientsStudy(Study):
    name = "gradients"
    description = ("Gradient structure with and without normalization: histograms, loss along "
                   "the gradient, step anatomy, channel statistics vs depth, output gradients, "
                   "gradient coherence (Table 1) and per-example gradient spectra.")
    experiments = ("E3", "E4", "E5", "E6", "E7", "E8", "R6")

    SCALES: ClassVar[dict[str, tuple[int, ...]]] = {  # depth, steps, batch, probe batch, points
        "smoke": (20, 10, 64, 16, 10),
        "reduced": (56, 50, 128, 64, 30),
        "paper": (110, 100, 128, 128, 50),
    }

    def specs(self, scale: str, data: str | None = None) -> list[RunSpec]:
        from normlab.nn import list_norms

        check_scale(scale)
        depth, steps, batch, probe_batch, points = self.SCALES[scale]
        options = default_options(depth, steps, probe_batch, points)
        return [RunSpec(task="gradients", group="E3-E8", data=default_data(scale, data),
                        model="resnet", depth=depth, norm=norm, init="xavier_normal",
                        batch_size=batch, lr=1e-4 if norm == "none" else 0.1, momentum=0.9,
                        weight_decay=5e-4, schedule="constant", steps=steps, options=options,
                        seed=0)
                for norm in list_norms()]

    def figures(self, results: StudyResults, fig_dir: Path) -> list[FigureInfo]:
        return figures_module.draw_all(results, Path(fig_dir))

    def findings(self, results: StudyResults) -> list[Finding]:
        from normlab.studies._gradients_findings import gradient_findings

        return gradient_findings(results)


def measurement_batch(data, size: int, seed: int, device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """`size` examples of `data` drawn without replacement by a generator seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data), generator=gen)[:size].to(data.x.device)
    return data.x[index].to(device), data.y[index].to(device)
