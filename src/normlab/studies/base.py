"""Studies: a named grid of runs, the figures drawn from them, and what they found.

A study subclasses `Study`, declares `name`, `description` and the experiment ids it covers
(E1-E10, R1-R9), its scales (a `ScaleConfig` dataclass per scale, by keyword), and implements
`specs(scale, data)` (the grid), `figures(results, fig_dir)` and `findings(results)`.
`@register_study` makes it available to `normlab run NAME`.

A study may also declare `settings` of its own (given with `--set KEY=VALUE` beside the RunSpec
settings, e.g. "replicates") and `follow_ups`: runs it adds once it has seen results, e.g.
perturbation replicates of the points near a divergence frontier; `run_study` runs such rounds
until no new run appears.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from normlab.runs.result import RunResult
from normlab.runs.spec import RunSpec
from normlab.runs.store import RunStore, read_json, read_jsonl, read_result
from normlab.studies._findings import (  # noqa: F401 (re-exported)
    AGREES,
    DIFFERS,
    FAILED,
    MEASURED,
    NOT_TESTABLE,
    VERDICTS,
    Finding,
    verdict,
)
from normlab.studies._options import Option
from normlab.studies._scales import SCALES, check_scale, default_data  # noqa: F401 (re-exported)
from normlab.studies._trains import is_edge, p_diverge
from normlab.studies.figures import FigureInfo
from normlab.utils.config import ConfigError
from normlab.utils.plugins import import_submodules
from normlab.utils.registry import Registry


class Study(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    experiments: ClassVar[tuple[str, ...]] = ()
    # Study settings `--set KEY=VALUE` may give besides the RunSpec settings, checked like task
    # options (a default of None: the scale's own value, see `follow_ups`).
    settings: ClassVar[Mapping[str, Option]] = {}

    @abstractmethod
    def specs(self, scale: str, data: str | None = None) -> list[RunSpec]:
        """The runs at `scale`; `data` replaces the scale's default data set when given."""

    @abstractmethod
    def figures(self, results: StudyResults, fig_dir: Path) -> list[FigureInfo]:
        """Draw the study's figures from its results into `fig_dir` (PNG, PDF and CSV each)."""

    def findings(self, results: StudyResults) -> list[Finding]:
        """Measured answers to the paper's claims, for the summary table (none by default)."""
        return []

    def follow_ups(self, planned: Sequence[RunSpec], results: StudyResults, scale: str,
                   settings: Mapping[str, Any]) -> list[RunSpec]:
        """Runs to add now that the `planned` runs' `results` are in (finished ones only): the
        next adaptive round. `settings` holds the study settings the user gave (parsed and
        checked); the plan's overrides are already in `planned`. None by default."""
        return []

    def follow_up_note(self, scale: str, settings: Mapping[str, Any]) -> str:
        """One sentence on what `follow_ups` adds, for `--dry-run` ("" when nothing)."""
        return ""


_STUDIES: Registry[type[Study]] = Registry("study")


def register_study(cls: type[Study]) -> type[Study]:
    _STUDIES.register(cls.name)(cls)
    return cls


def list_studies() -> list[str]:
    _load_builtin_studies()
    return _STUDIES.names()


def get_study(name: str) -> Study:
    _load_builtin_studies()
    return _STUDIES.get(name)()


def _load_builtin_studies() -> None:
    import_submodules("normlab.studies")


# -- reading a study's folder ----------------------------------------------------------------------

_MAPPING_FIELDS = ("data_options", "norm_options", "options")


def _spec_columns(spec: dict[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in spec.items() if k not in (*_MAPPING_FIELDS, "probes", "milestones")}
    for name in _MAPPING_FIELDS:
        for key, value in (spec.get(name) or {}).items():
            plain = not isinstance(value, (list, dict))
            row[f"{name}.{key}"] = value if plain else json.dumps(value)
    row["milestones"] = json.dumps(spec.get("milestones", []))
    row["probes"] = json.dumps(spec.get("probes", []))
    return row


# The settings that tell the runs of one point apart: p(diverge) is measured over them.
_REPLICATED_BY = ("seed", "options.replicate")


def result_columns(result: RunResult, device: Any = None) -> dict[str, Any]:
    """A run's columns of the runs table that its result gives: status, steps_done,
    diverged_step, diverged_loss, wall_time_s, error, the device it ran on (`device`, the
    spec's, where its provenance does not say), its pack size (1 alone; None for a run without
    provenance, one that failed before training), then its final metrics."""
    return {"status": result.status, "steps_done": result.steps,
            "diverged_step": result.diverged_step, "diverged_loss": result.diverged_loss,
            "wall_time_s": result.wall_time_s, "error": result.error,
            "device": result.provenance.get("device", device),
            "pack_size": result.provenance.get("pack_size", 1) if result.provenance else None,
            **result.final}


def load_results(out_dir: str | Path) -> pd.DataFrame:
    """One row per run: run_id, every spec setting (`steps` is the budget), status, steps_done
    (the optimizer steps the run made), divergence, the pack size it was trained in
    (`pack_size`: 1 alone; None for a failed run), final metrics, and its point's
    `p_diverge` and `edge`.

    A point is every setting but `seed` and `options.replicate` (the perturbation replicate);
    `p_diverge` is the fraction of its finished runs that diverged (NaN: none finished) and
    `edge` says 0 < p_diverge < 1 (studies._trains). Runs without a result.json have status
    "unfinished". A corrupt spec or result file raises CorruptRecordError naming the file.
    """
    rows, settings = [], {}
    for run_dir in RunStore(out_dir).run_dirs():
        spec_path = run_dir / "spec.json"
        if not spec_path.exists():
            continue
        spec = _spec_columns(read_json(spec_path))
        settings.update(dict.fromkeys(spec))
        row = {"run_id": run_dir.name, **spec}
        result_path = run_dir / "result.json"
        if result_path.exists():
            row.update(result_columns(read_result(result_path), row.get("device")))
        else:
            row["status"] = "unfinished"
        rows.append(row)
    runs = pd.DataFrame(rows)
    if runs.empty:
        return runs
    point = [c for c in settings if c not in _REPLICATED_BY]
    runs["p_diverge"] = runs.groupby(point, dropna=False)["status"].transform(p_diverge)
    runs["edge"] = is_edge(runs["p_diverge"])
    return runs


@dataclass
class StudyResults:
    """A study's stored results as tidy tables, joined with each run's settings."""

    out_dir: Path
    runs: pd.DataFrame

    @classmethod
    def load(cls, out_dir: str | Path) -> StudyResults:
        return cls(Path(out_dir), load_results(out_dir))

    def in_group(self, group: str) -> pd.DataFrame:
        """The runs table restricted to runs whose spec `group` is `group` (empty when none)."""
        if self.runs.empty or "group" not in self.runs:
            return pd.DataFrame()
        return self.runs[self.runs["group"] == group]

    def subset(self, run_ids: list[str]) -> StudyResults:
        """The results of the given runs only (e.g. one study's share of a combined folder)."""
        if self.runs.empty:
            return self
        return StudyResults(self.out_dir, self.runs[self.runs["run_id"].isin(run_ids)])

    def _joined(self, filename: str, probe: str | None = None) -> pd.DataFrame:
        frames = []
        # Unfinished runs are skipped: a killed run may end in a partial line, and is redone.
        finished = self.runs[self.runs["status"] != "unfinished"] if "status" in self.runs \
            else self.runs
        run_ids = set(finished["run_id"]) if "run_id" in finished else set()
        for run_dir in RunStore(self.out_dir).run_dirs():
            if run_dir.name not in run_ids:
                continue
            rows = read_jsonl(run_dir / filename)
            if probe is not None:
                rows = [r for r in rows if r.get("probe") == probe]
            if rows:
                frame = pd.DataFrame(rows)
                frame.insert(0, "run_id", run_dir.name)
                frames.append(frame)
        if not frames:
            return pd.DataFrame()
        table = pd.concat(frames, ignore_index=True)
        settings = self.runs.drop(columns=[c for c in self.runs.columns
                                           if c in table.columns and c != "run_id"])
        return table.merge(settings, on="run_id", how="left")

    def metrics(self) -> pd.DataFrame:
        """Every metric row of every run (metrics.jsonl), with the run's settings as columns."""
        return self._joined("metrics.jsonl")

    def records(self, probe: str | None = None) -> pd.DataFrame:
        """Every probe record (records.jsonl), optionally of one probe, with the run's settings."""
        return self._joined("records.jsonl", probe)


def read_study_file(out_dir: str | Path) -> dict[str, Any]:
    """The study.json that `run_study` writes: study name, scale, data, overrides, run ids."""
    path = Path(out_dir) / "study.json"
    if not path.exists():
        raise ConfigError(f"{out_dir} is not a study folder: it has no study.json. "
                          "Run `normlab run STUDY --out DIR` first.")
    return read_json(path)
