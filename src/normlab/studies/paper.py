"""The `paper` study: every experiment of the paper (E1-E10) and every request of the review
(R1-R9), run into one folder and reported together.

It is the union of the member studies' runs; each member draws its own figures and findings from
its share of the results, and the report groups them into one section per experiment id. Its
settings are the members' (each member takes those it declares), and its follow-up rounds are
the members' (each asks on its own share).
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from normlab.runs.spec import RunSpec
from normlab.studies._options import Option
from normlab.studies.base import (
    FAILED,
    FigureInfo,
    Finding,
    Study,
    StudyResults,
    get_study,
    read_study_file,
    register_study,
)
from normlab.studies.plan import follow_ups_so_far, plan_study

MEMBERS = ("lr-sweep", "gradients", "radial", "curvature", "rmt", "init", "noise-scale",
           "small-batch")

# One line per experiment: what the paper claimed or the review asked (the report's section intros).
EXPERIMENTS = {
    "E1": "BN's benefit is the large learning rate: at a matched small learning rate BN gives no "
          "advantage (paper: 93 %, 90.5 %, 81 % for BN at 0.1, 0.003, 0.0001; 82 % without BN "
          "at 0.0001).",
    "E2": "SGD noise grows with the learning rate: E||a g - a g_SGD||^2 = a^2 (N-b)/(b(N-1)) C.",
    "E3": "Gradients at initialization: roughly Gaussian within about +-0.04 with BN, heavy-tailed "
          "and about 100x wider without.",
    "E4": "Loss along the gradient: flat with BN; without BN it explodes past 1e6 by a step of "
          "about 3e-3.",
    "E5": "A diverging step: activations grow with depth along the step (layer 80 means ~1e8, "
          "variances ~1e16).",
    "E6": "Channel means and standard deviations grow roughly exponentially with depth without BN "
          "(~1e-1.5 to ~1e3.5) and stay within ~1e-1...1e1 with BN.",
    "E7": "Output-layer gradients: without BN one class column dominates (input-independent).",
    "E8": "Gradient terms cancel with BN: |sum| is ~2 orders below sum |terms|; without BN they "
          "are of similar size.",
    "E9": "Products of random matrices become ill-conditioned: largest singular values 2.00, 3.08, "
          "3.86 for 1, 3, 5 matrices (Fuss-Catalan law).",
    "E10": "Depth limits the usable learning rate of unnormalized networks.",
    "R1": "Do LayerNorm, GroupNorm, InstanceNorm and Batch Renormalization allow equally large "
          "learning rates, including at small batch sizes?",
    "R2": "The data-independent gradient component, estimated by averaging over many batches: is "
          "it radial or tangential?",
    "R3": "Does following it reduce the loss? The loss along it versus a random orthogonal "
          "direction.",
    "R4": "Hypothesis: radial gradients are large and constrain the learning rate; tangential "
          "ones are small.",
    "R5": "Eq. 2 and Smith & Le's noise scale: accuracy and stability against g = lr N / (B(1-m)).",
    "R6": "Table 1 as a bar plot.",
    "R7": "Initialization: delta-orthogonal and the order/chaos view of signal propagation.",
    "R8": "Leslie Smith's LR range test beside the largest stable learning rate.",
    "R9": "Sharp versus flat minima: the Hessian's top eigenvalue of what each regime finds.",
}


@register_study
class PaperStudy(Study):
    name = "paper"
    description = "Every experiment of the paper (E1-E10) and the review (R1-R9), one report."
    experiments = tuple(EXPERIMENTS)
    @property
    def settings(self) -> Mapping[str, Option]:  # type: ignore[override]
        """The members' study settings (each member takes those it declares)."""
        return {key: option for member in self.members()
                for key, option in member.settings.items()}

    def members(self) -> list[Study]:
        return [get_study(name) for name in MEMBERS]

    def specs(self, scale: str, data: str | None = None) -> list[RunSpec]:
        specs = [spec for member in self.members() for spec in member.specs(scale, data)]
        return list(dict.fromkeys(specs))

    def follow_ups(self, planned: Sequence[RunSpec], results: StudyResults, scale: str,
                   settings: Mapping[str, Any]) -> list[RunSpec]:
        """Each member's follow-ups, asked on the member's share of `results`."""
        return [spec for _, plan, _ in self._plans(results, scale) for spec in plan]

    def follow_up_note(self, scale: str, settings: Mapping[str, Any]) -> str:
        notes = [(m.name, m.follow_up_note(scale, self._own(m, settings)))
                 for m in self.members()]
        return "; ".join(f"{name}: {note}" for name, note in notes if note)

    def _own(self, member: Study, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The `overrides` a member takes: every RunSpec override, and the study settings it
        declares."""
        return {k: v for k, v in overrides.items()
                if k not in self.settings or k in member.settings}

    def _plans(self, results: StudyResults, scale: str
               ) -> list[tuple[Study, list[RunSpec], StudyResults]]:
        """Each member with its whole plan as far as `results` decide it (its first round and
        every follow-up so far), and its share of `results`."""
        plan = read_study_file(results.out_dir)
        out = []
        for member in self.members():
            given = self._own(member, plan.get("overrides") or {})
            first = plan_study(member, scale, plan.get("data"), given)
            specs = follow_ups_so_far(member, first, results, scale, given)
            out.append((member, specs, results.subset([s.run_id for s in specs])))
        return out

    def _shares(self, results: StudyResults) -> list[tuple[Study, StudyResults]]:
        """Each member study with the results of its own runs (as planned for this folder)."""
        plan = read_study_file(results.out_dir)
        return [(member, share) for member, _, share in self._plans(results, plan["scale"])]

    def figures(self, results: StudyResults, fig_dir: Path) -> list[FigureInfo]:
        """Each member's figures; a member whose figures fail gets an error entry, not silence."""
        figures: list[FigureInfo] = []
        for member, share in self._shares(results):
            try:
                figures.extend(member.figures(share, fig_dir / member.name))
            except Exception as err:  # one broken study must not cost the other sections
                figures.append(FigureInfo(
                    member.experiments[0], f"{member.name}-error",
                    f"The figures of study {member.name!r} could not be drawn", "",
                    error=f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
        return figures

    def findings(self, results: StudyResults) -> list[Finding]:
        """Each member's findings; a member whose findings fail is reported as such."""
        findings: list[Finding] = []
        for member, share in self._shares(results):
            try:
                findings.extend(member.findings(share))
            except Exception as err:  # reported in the summary table instead of raised
                findings.append(Finding(member.experiments[0],
                                        f"findings of study {member.name!r}", "—", "—",
                                        FAILED, f"{type(err).__name__}: {err}"))
        return findings

