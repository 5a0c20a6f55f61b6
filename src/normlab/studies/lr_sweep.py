"""The `lr-sweep` study (E1, E10, R1): how large a learning rate does each normalization allow?

Three groups of "train" runs (`RunSpec.group`):
- "sweep" (R1): norm in {none, batch, group, layer, instance, batch_renorm} x a log grid of
  learning rates x seeds, at the scale's depth.
- "E10": no norm and BN at further depths over the same grid (the sweep supplies the
  scale's own depth): does depth limit the usable learning rate without normalization?
- "E1": the paper's four runs, BN at lr 0.1, 0.003, 0.0001 and no norm at 0.0001, each with its
  own length (the paper trained the small learning rates far longer), compared as "% of
  training".

All runs: CIFAR ResNet (post-activation basic blocks, shortcut A), Xavier-normal init (what the
paper appears to use; with He init an unnormalized ResNet-110 blows up ~1e9 at init), SGD with
momentum 0.9 and weight decay 5e-4, lr divided by 10 at 50 % and 75 % of training, standard
augmentation. GroupNorm uses width/4 groups; BatchRenorm relaxes rmax, dmax from BatchNorm's
(1, 0) to (3, 5) between 5 % and 50 % of training.

"Stable" and "trains" as every study defines them (`studies._trains`): no divergence
(mini-batch loss finite and <= 1e3, the paper's criterion) in any run of the point, and for
"trains" also a final test accuracy >= 20 %. Figures report both, since unnormalized networks
often collapse to chance accuracy without diverging.

Divergence near the limit is a random event (a 1e-7 change of the initial weights can flip it),
so the study measures p(diverge) per (norm, depth, lr) and reports each curve's frontier as a
bracket [largest lr with p = 0, smallest lr with p = 1]. After the grid's first round, every
point within one grid step of a frontier gets `replicates` perturbation replicates per seed
(`studies._frontier`; `--set replicates=R`, default per scale), in rounds until the frontiers
settle. The verdicts on the paper's claims (R1, E10, and E1's runs) read the brackets, and say
"not testable at this scale" where two brackets overlap; R1 is also judged by "trains" (BN's
largest lr that trains against no norm's at every depth), each verdict beside its own numbers.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from normlab.runs.spec import RunSpec
from normlab.studies._findings import (
    AGREES,
    DIFFERS,
    MEASURED,
    NOT_TESTABLE,
    REVIEW_ONLY,
    Finding,
    verdict,
)
from normlab.studies._frontier import (
    REPLICATES,
    follow_up_note,
    frontier_replicates,
    replicates_setting,
    status_series,
)
from normlab.studies._lr_sweep_figures import (
    FRONTIER_GROUPS,
    PAPER_E1,
    accuracy_vs_lr,
    divergence_vs_lr,
    e1_curves,
    stable_lr_bars,
    stable_lr_vs_depth,
)
from normlab.studies._options import Option
from normlab.studies._scales import ScaleConfig, default_data, pick_scale, resnet_spec
from normlab.studies._trains import bracket_text, frontier_order, lr_text, stable_and_trained
from normlab.studies.base import Study, StudyResults, register_study
from normlab.studies.figures import FigureInfo, draw_figures

NORMS = ("none", "batch", "group", "layer", "instance", "batch_renorm")
E1_MATCHED_MARGIN = 0.05  # "no advantage": BN at 1e-4 within 5 points of no norm at 1e-4
E1_FITS_TRAINING = 0.95  # the paper's E1 runs all reach ~100 % train accuracy


@dataclass(frozen=True)
class SweepGrid(ScaleConfig):
    """The runs of one scale. `e1_runs` holds (norm, lr, epochs) per E1 run; `replicates` is
    the number of perturbation replicates per seed of each point near a frontier."""

    depth: int
    width: int
    batch_size: int
    epochs: float
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    e10_depths: tuple[int, ...]
    e1_depth: int
    e1_runs: tuple[tuple[str, float, float], ...]
    e1_seeds: tuple[int, ...]
    log_every: int
    norms: tuple[str, ...] = NORMS
    replicates: int = 3


def _half_decades(low: float, high: float) -> tuple[float, ...]:
    """1, 3, 10, 30, ... between low and high (both powers of ten or 3x one), rounded."""
    count = round(2 * np.log10(high / low)) + 1
    return tuple(float(f"{v:.0e}") for v in np.geomspace(low, high, count))


GRIDS = {
    # digits, ResNet-20 of width 8 (E10 adds ResNet-8; E1 uses ResNet-8): 1-3 minutes on
    # 2 CPU cores. Depth 20, because at depth 8 no norm trains at BN's learning rates (E10).
    "smoke": SweepGrid(depth=20, width=8, batch_size=64, epochs=3,
                       lrs=_half_decades(0.01, 10.0), seeds=(0,), e10_depths=(8,), e1_depth=8,
                       e1_runs=(("batch", 0.1, 5), ("batch", 0.003, 40),
                                ("batch", 0.0001, 72), ("none", 0.0001, 72)),
                       e1_seeds=(0,), log_every=5, replicates=3),
    # CIFAR-10, ResNet-20 (E10: 56; E1: 56), shortened schedules: one GPU, hours
    "reduced": SweepGrid(depth=20, width=16, batch_size=128, epochs=30,
                         lrs=_half_decades(0.001, 3.0), seeds=(0,), e10_depths=(56,),
                         e1_depth=56,
                         e1_runs=(("batch", 0.1, 30), ("batch", 0.003, 120),
                                  ("batch", 0.0001, 200), ("none", 0.0001, 200)),
                         e1_seeds=(0,), log_every=50, replicates=3),
    # the paper: ResNet-110, CIFAR-10, 165 epochs (E1: 165, 1320, 2400, 2400), 5 seeds
    "paper": SweepGrid(depth=110, width=16, batch_size=128, epochs=165,
                       lrs=_half_decades(0.0001, 1.0), seeds=(0, 1, 2, 3, 4),
                       e10_depths=(20, 56), e1_depth=110,
                       e1_runs=(("batch", 0.1, 165), ("batch", 0.003, 1320),
                                ("batch", 0.0001, 2400), ("none", 0.0001, 2400)),
                       e1_seeds=(0, 1, 2, 3, 4), log_every=100, replicates=1),
}


def norm_options(norm: str, width: int) -> dict:
    """GroupNorm: width/4 groups (divides every stage); BatchRenorm: relaxed over 5-50 %."""
    if norm == "group":
        return {"groups": max(1, width // 4)}
    if norm == "batch_renorm":
        return {"renorm_warmup": [0.05, 0.5]}
    return {}


@register_study
class LrSweepStudy(Study):
    name = "lr-sweep"
    description = ("p(diverge) vs learning rate and the frontier bracket per normalization and "
                   "depth, final accuracy, and the paper's four E1 runs (E1, E10, R1).")
    experiments = ("E1", "E10", "R1")
    settings: ClassVar[Mapping[str, Option]] = REPLICATES

    def __init__(self, grids: Mapping[str, SweepGrid] | None = None) -> None:
        self.grids = dict(GRIDS if grids is None else grids)

    def specs(self, scale: str, data: str | None = None) -> list[RunSpec]:
        grid = pick_scale(self.grids, scale)
        base = resnet_spec(default_data(scale, data), width=grid.width,
                           batch_size=grid.batch_size, schedule="step", milestones=(0.5, 0.75),
                           lr_decay=0.1, epochs=float(grid.epochs), log_every=grid.log_every)

        def run(group: str, norm: str, depth: int, lr: float, seed: int, **more) -> RunSpec:
            return base.replace(group=group, norm=norm, depth=depth, lr=lr, seed=seed,
                                norm_options=norm_options(norm, grid.width), **more)

        specs = [run("sweep", norm, grid.depth, lr, seed)
                 for norm in grid.norms for lr in grid.lrs for seed in grid.seeds]
        specs += [run("E10", norm, depth, lr, seed)
                  for depth in grid.e10_depths if depth != grid.depth
                  for norm in ("none", "batch") for lr in grid.lrs for seed in grid.seeds]
        specs += [run("E1", norm, grid.e1_depth, lr, seed, epochs=float(epochs))
                  for norm, lr, epochs in grid.e1_runs for seed in grid.e1_seeds]
        return specs

    def follow_ups(self, planned: Sequence[RunSpec], results: StudyResults, scale: str,
                   settings: Mapping[str, Any]) -> list[RunSpec]:
        """Perturbation replicates of the sweep's and E10's points near their frontiers."""
        return frontier_replicates(planned, status_series(results.runs),
                                   ("group", "norm", "depth"), self._replicates(scale, settings),
                                   lambda spec: spec.group in FRONTIER_GROUPS)

    def follow_up_note(self, scale: str, settings: Mapping[str, Any]) -> str:
        return follow_up_note(self._replicates(scale, settings),
                              "per norm and depth, groups " + " and ".join(FRONTIER_GROUPS))

    def _replicates(self, scale: str, settings: Mapping[str, Any]) -> int:
        return replicates_setting(settings, pick_scale(self.grids, scale).replicates)

    def figures(self, results: StudyResults, fig_dir: Path) -> list[FigureInfo]:
        return draw_figures(results, fig_dir, divergence_vs_lr, accuracy_vs_lr, stable_lr_bars,
                            stable_lr_vs_depth, e1_curves)

    def findings(self, results: StudyResults) -> list[Finding]:
        runs = results.runs
        if runs.empty or "group" not in runs:
            return []
        return [*_trains_findings(runs), *_stable_lr_findings(runs), *_e1_findings(runs),
                *_depth_findings(runs)]


def _brackets(runs, by: list[str]):
    """`stable_and_trained` of the sweep's and E10's runs (the curves with a frontier)."""
    return stable_and_trained(runs[runs["group"].isin(FRONTIER_GROUPS)], by)


def _trains_findings(runs) -> list[Finding]:
    """R1 by "trains": BN's largest lr that trains against no norm's, at every depth that has
    both (the sweep's and E10's)."""
    table = _brackets(runs[runs["norm"].isin(["none", "batch"])], ["depth", "norm"])
    pairs = {int(depth): part.set_index("norm") for depth, part in table.groupby("depth")
             if {"none", "batch"} <= set(part["norm"])}
    if not pairs:
        return []
    ours = "; ".join(f"depth {d}: BN {_trained(p.loc['batch'])}, no norm {_trained(p.loc['none'])}"
                     for d, p in sorted(pairs.items()))
    judged, reason = _trains_verdict({d: (p.loc["batch"], p.loc["none"])
                                     for d, p in pairs.items()})
    return [Finding("R1", "BN trains at larger learning rates than no normalization (largest "
                    "lr that trains)", "BN at 0.1; no BN converged only up to 0.0001",
                    f"largest lr that trains: {ours}", judged, reason)]


def _trains_verdict(pairs: Mapping[int, tuple[Any, Any]]) -> tuple[str, str]:
    """The verdict on "BN trains at larger lrs than no norm" from (BN, no norm) rows of
    `stable_and_trained` per depth: "agrees" when at every depth BN's largest lr that trains
    exceeds no norm's (or no norm trains at no lr of the grid and BN at some), "differs" when at
    some depth it does not (no norm's is as large, or BN trains at none while no norm does),
    else not testable (neither trains at any lr, or both train at the grid's largest lr)."""
    below, open_ = [], []
    for depth, (bn, none) in sorted(pairs.items()):
        a, b = bn["largest_trained_lr"], none["largest_trained_lr"]
        where = f"depth {depth} (BN {_trained(bn)}, no norm {_trained(none)})"
        if np.isnan(a) and np.isnan(b):
            open_.append(f"{where}: neither trains at any lr of the grid")
        elif bool(bn["trained_censored"]) and bool(none["trained_censored"]):
            open_.append(f"{where}: both train at the grid's largest lr")
        elif np.isnan(a) or (not np.isnan(b) and a <= b):
            below.append(where)
        # else: BN's limit lies above no norm's (no norm's NaN, or a > b)
    if below:
        return DIFFERS, "no norm trains at an lr as large as BN's or larger at " + "; ".join(below)
    if open_:
        return NOT_TESTABLE, "the grid does not reach the limits at " + "; ".join(open_)
    return AGREES, "at every depth BN's largest lr that trains exceeds no norm's"


def _stable_lr_findings(runs) -> list[Finding]:
    """R1 by the paper's criterion (divergence), read off the frontier brackets."""
    table = stable_and_trained(runs[runs["group"] == "sweep"], ["norm"]).set_index("norm")
    if not {"none", "batch"} <= set(table.index):
        return []
    bn, none = table.loc["batch"], table.loc["none"]
    ours = f"frontier bracket: BN {bracket_text(bn)}, no norm {bracket_text(none)}"
    order = frontier_order(bn, none)
    depth = int(runs.loc[runs["group"] == "sweep", "depth"].iloc[0])
    if order > 0:
        judged, reason = AGREES, f"at depth {depth} BN's bracket lies wholly above no norm's"
    elif order < 0:
        judged, reason = DIFFERS, (f"at depth {depth} no norm's bracket lies at or above BN's; "
                                   f"the paper's gap is at depth 110 (E10)")
    elif bn["stable_censored"] and none["stable_censored"]:
        judged, reason = NOT_TESTABLE, (f"both are stable up to the largest lr of the grid "
                                        f"({bn['largest_lr_tried']:g}): the grid does not "
                                        f"reach either frontier")
    else:
        judged, reason = NOT_TESTABLE, _overlap("BN", bn, "no norm", none,
                                                f" at depth {depth}; the paper's gap is at "
                                                f"depth 110 (E10)")
    out = [Finding("R1", "BN's divergence frontier lies at far larger learning rates than no "
                   "normalization's (the paper's divergence criterion)",
                   "BN at 0.1; no BN converged only up to 0.0001", ours, judged, reason)]
    for norm in table.index.difference(["none", "batch"]):
        row = table.loc[norm]
        out.append(Finding("R1", f"{norm} allows a learning rate as large as BN's",
                           "not tested in the paper (the review asks)",
                           f"frontier bracket: {norm} {bracket_text(row)}, BN "
                           f"{bracket_text(bn)}; largest that trains: {norm}: {_trained(row)}, "
                           f"BN: {_trained(bn)}", MEASURED, REVIEW_ONLY))
    return out


def _overlap(a_name: str, a, b_name: str, b, where: str = "") -> str:
    return (f"the frontier brackets overlap ({a_name} {bracket_text(a)}, {b_name} "
            f"{bracket_text(b)}): the grid cannot order the two frontiers{where}")


def _e1_findings(runs) -> list[Finding]:
    e1 = runs[runs["group"] == "E1"]
    if e1.empty or "test_acc" not in e1:
        return []
    keys = list(PAPER_E1)
    done = e1[e1["status"] == "completed"]
    acc = done.groupby(["norm", "lr"])["test_acc"].mean()
    if not all(k in acc.index for k in keys):
        diverged = ", ".join(f"{n} at {lr:g}" for n, lr in
                             e1.loc[e1["status"] == "diverged", ["norm", "lr"]].itertuples(
                                 index=False))
        if not diverged:
            return []
        return [Finding("E1", "BN's benefit is the large learning rate", _paper_e1(),
                        f"diverged: {diverged}", NOT_TESTABLE,
                        "an E1 run diverged, so its final accuracy does not exist")]
    measured = [float(acc.loc[k]) for k in keys]
    fitted = done.groupby(["norm", "lr"])["train_acc"].min() if "train_acc" in done else None
    ours = ", ".join(f"{_label(n)} {lr:g}: {100 * a:.1f} %"
                     for (n, lr), a in zip(keys, measured, strict=True))
    bn_hi, bn_mid, bn_lo, none_lo = measured
    reason, judged = _e1_on_the_edge(runs, int(e1["depth"].iloc[0])), None
    unfitted = [] if fitted is None else [k for k in keys if fitted.loc[k] < E1_FITS_TRAINING]
    if reason:
        judged = NOT_TESTABLE
    elif unfitted:
        judged = NOT_TESTABLE
        reason = ("the budget does not let every run fit the training set (final train "
                  "accuracy " + ", ".join(f"{_label(n)} {lr:g}: {100 * fitted.loc[(n, lr)]:.0f} %"
                                          for n, lr in unfitted)
                  + f"; below {E1_FITS_TRAINING:.0%}), while the paper compares runs that all "
                  "reach ~100 %: the final accuracies compare unfinished runs")
    ordered = verdict(bn_hi >= bn_mid >= bn_lo, "BN's accuracy at 0.1 >= at 0.003 >= at 0.0001")
    matched = verdict(bn_lo - none_lo < E1_MATCHED_MARGIN,
                      f"BN at 1e-4 less than {100 * E1_MATCHED_MARGIN:.0f} points above no norm")
    return [
        Finding("E1", "With BN, a larger learning rate gives better final test accuracy",
                _paper_e1(), ours, *((judged, reason) if judged else ordered)),
        Finding("E1", "At a matched small learning rate (1e-4) BN gives no advantage",
                "BN 81 % vs no BN 82 %",
                f"BN {100 * bn_lo:.1f} % vs no BN {100 * none_lo:.1f} %",
                *((judged, reason) if judged else matched)),
    ]


def _e1_on_the_edge(runs, depth: int) -> str:
    """Why E1 cannot be read (an E1 lr above its norm's largest lr with p(diverge) = 0 at the
    E1 depth, where its outcome is chance), or "" when every E1 lr lies below its bracket."""
    table = _brackets(runs[runs["depth"] == depth], ["norm"]).set_index("norm")
    risky = [(norm, lr) for norm, lr in PAPER_E1 if norm in table.index
             and not lr <= table.loc[norm, "largest_stable_lr"]]  # NaN: not below either
    if not risky:
        return ""
    return ("E1 reads runs at learning rates where divergence is chance or certain: "
            + ", ".join(f"{_label(n)} at {lr:g} is not below its frontier bracket "
                        f"{bracket_text(table.loc[n])} at depth {depth}" for n, lr in risky)
            + " (brackets from the sweep's budget)")


def _depth_findings(runs) -> list[Finding]:
    """E10 by the paper's criterion, read off the frontier brackets of no norm per depth."""
    table = _brackets(runs[runs["norm"] == "none"], ["depth"]).sort_values("depth")
    if len(table) < 2:
        return []
    rows = [row for _, row in table.iterrows()]
    ours = ", ".join(f"depth {int(r['depth'])}: {bracket_text(r)}" for r in rows)
    pairs = list(itertools.pairwise(rows))
    orders = [frontier_order(shallow, deep) for shallow, deep in pairs]
    if all(o > 0 for o in orders):
        judged, reason = AGREES, "each shallower depth's bracket lies wholly above the deeper one's"
    elif any(o < 0 for o in orders):
        shallow, deep = pairs[orders.index(-1)]
        judged, reason = DIFFERS, (f"the deeper network's bracket lies at or above the "
                                   f"shallower one's: depth {int(deep['depth'])} "
                                   f"{bracket_text(deep)} vs depth {int(shallow['depth'])} "
                                   f"{bracket_text(shallow)}")
    else:
        judged = NOT_TESTABLE
        shallow, deep = pairs[orders.index(0)]
        reason = _overlap(f"depth {int(shallow['depth'])}", shallow,
                          f"depth {int(deep['depth'])}", deep)
    return [Finding("E10", "Without normalization, deeper networks tolerate smaller learning "
                    "rates", "shallower ResNets tolerate larger learning rates",
                    f"frontier bracket (no norm): {ours}", judged, reason)]


def _trained(row) -> str:
    return lr_text(row["largest_trained_lr"], bool(row["trained_censored"]))


def _label(norm: str) -> str:
    return "BN" if norm == "batch" else "no norm"


def _paper_e1() -> str:
    return ", ".join(f"{v:g} %" for v in PAPER_E1.values())
