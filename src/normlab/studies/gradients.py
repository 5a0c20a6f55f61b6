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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.nn import list_norms
from normlab.runs.result import RunResult
from normlab.runs.spec import RunSpec
from normlab.runs.tasks import RunContext, register_task
from normlab.studies import _gradients_figures as figures_module
from normlab.studies._findings import Finding
from normlab.studies._gradients_findings import gradient_findings
from normlab.studies._gradients_measure import Measurement
from normlab.studies._options import Option, declare_options, read_options
from normlab.studies._scales import ScaleConfig, default_data, pick_scale
from normlab.studies.base import Study, StudyResults, register_study
from normlab.studies.figures import FigureInfo
from normlab.train import train

PAPER_DEPTHS = (8, 44, 80)  # of 110: the paper's anatomy layers, scaled to other depths


def default_options(depth: int, steps: int, probe_batch: int, points: int) -> dict[str, Any]:
    """The task's measurement plan for a network of `depth` weight layers."""
    layers = sorted({max(1, round(depth * d / 110)) for d in PAPER_DEPTHS})
    return {"measure_at": [0, steps], "step_loss_at": [0, 3, 6], "probe_batch": probe_batch,
            "layers": layers, "histogram_layer": max(1, depth // 2),
            "stats_every": max(1, round(depth / 9)), "anatomy_points": points}


def _plan(key: str):
    """The default of option `key`: the measurement plan for the spec's depth and steps."""
    return lambda spec: default_options(spec.depth, spec.steps or 1, min(32, spec.batch_size),
                                        20)[key]


def _steps_are_set(spec: RunSpec, options: dict[str, Any]) -> list[str]:
    return [] if spec.steps is not None else [
        "The 'steps' setting must be set for the 'gradients' task (the number of SGD steps "
        "between the measurements); got None."]


OPTIONS = declare_options(
    "gradients", _steps_are_set,
    measure_at=Option(_plan("measure_at"), kind="int_list", low=0),
    step_loss_at=Option(_plan("step_loss_at"), kind="int_list", low=0),
    layers=Option(_plan("layers"), kind="int_list", low=0),
    probe_batch=Option(_plan("probe_batch"), low=2),
    histogram_layer=Option(_plan("histogram_layer"), low=1),
    stats_every=Option(_plan("stats_every"), low=1),
    anatomy_points=Option(_plan("anatomy_points"), low=2))


@register_task("gradients")
def gradients_task(spec: RunSpec, context: RunContext) -> RunResult:
    """Train `spec.steps` steps and measure E3-E8 at `options.measure_at` (see module doc)."""
    options = read_options(spec)
    training = spec.replace(task="train", options={}, probes=())
    measurement = Measurement(options, context)
    result = train(training, callbacks=[measurement], context=context)
    result.provenance["run_id"] = spec.run_id
    return result


@dataclass(frozen=True)
class GradientsScale(ScaleConfig):
    """One run per norm: a ResNet of `depth` trained `steps` steps at `batch_size`; probes on
    `probe_batch` examples, the anatomy at `anatomy_points` points; the full set of probes at
    initialization, and after the last step too when `measure_trained`."""

    depth: int
    steps: int
    batch_size: int
    probe_batch: int
    anatomy_points: int
    measure_trained: bool = True


# The experiments are at initialization (E4 at mini-batches 1, 4, 7), so every scale uses the
# paper's ResNet-110: at depth 8-20 the effects of E3, E6 and E8 do not show.
SCALES = {
    # digits, CPU: measured at initialization (and E4 over 6 steps) only; 8 per-example
    # gradients (exact ones under BN cost one backward each through 110 layers)
    "smoke": GradientsScale(depth=110, steps=6, batch_size=64, probe_batch=8, anatomy_points=10,
                            measure_trained=False),
    "reduced": GradientsScale(depth=110, steps=50, batch_size=128, probe_batch=64,
                              anatomy_points=30),
    "paper": GradientsScale(depth=110, steps=100, batch_size=128, probe_batch=128,
                            anatomy_points=50),
}


@register_study
class GradientsStudy(Study):
    name = "gradients"
    description = ("Gradient structure with and without normalization: histograms, loss along "
                   "the gradient, step anatomy, channel statistics vs depth, output gradients, "
                   "gradient coherence (Table 1) and per-example gradient spectra.")
    experiments = ("E3", "E4", "E5", "E6", "E7", "E8", "R6")

    # -- the grid ---------------------------------------------------------------------------------
    def specs(self, scale: str, data: str | None = None) -> list[RunSpec]:
        s = pick_scale(SCALES, scale)
        options = default_options(s.depth, s.steps, s.probe_batch, s.anatomy_points)
        if not s.measure_trained:
            options["measure_at"] = [0]
        return [RunSpec(task="gradients", group="E3-E8", data=default_data(scale, data),
                        model="resnet", depth=s.depth, norm=norm, init="xavier_normal",
                        batch_size=s.batch_size, lr=1e-4 if norm == "none" else 0.1,
                        momentum=0.9, weight_decay=5e-4, schedule="constant", steps=s.steps,
                        options=options, seed=0)
                for norm in list_norms()]

    # -- figures ----------------------------------------------------------------------------------
    def figures(self, results: StudyResults, fig_dir: Path) -> list[FigureInfo]:
        return figures_module.draw_all(results, Path(fig_dir))

    # -- findings ---------------------------------------------------------------------------------
    def findings(self, results: StudyResults) -> list[Finding]:
        return gradient_findings(results)
