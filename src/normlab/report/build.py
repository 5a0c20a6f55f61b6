"""`build_report`: a study folder -> figures (PNG, PDF, CSV) -> one self-contained report.html.

A study whose figure or findings code raises still gets its report: the failure is shown as an
error box with its message, and every other part of the report is kept.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from normlab.report import html
from normlab.report.columns import in_plan_order
from normlab.report.terminal import status_counts
from normlab.runs.result import provenance
from normlab.runs.store import RunStore, read_result
from normlab.studies._trains import FRONTIER_DEFINITION, TRAINS_DEFINITION
from normlab.studies.base import Finding, Study, StudyResults, get_study, read_study_file
from normlab.studies.paper import EXPERIMENTS
from normlab.utils.atomic import atomic_write_text

T = TypeVar("T")


def build_report(out_dir: str | Path) -> Path:
    """Write `out_dir/report.html` for the study run into `out_dir`; return its path.

    Reads study.json (which study, scale, data, overrides, planned runs), loads the results of the
    planned runs, draws the study's figures into `out_dir/figures` and writes the page atomically.
    A corrupt run file raises CorruptRecordError naming it.
    """
    out_dir = Path(out_dir)
    plan = read_study_file(out_dir)
    study = get_study(plan["study"])
    run_ids = plan.get("run_ids") or []
    loaded = StudyResults.load(out_dir)
    results = StudyResults(out_dir, in_plan_order(loaded.runs, run_ids))
    sections, findings = study_sections(study, results, out_dir / "figures", out_dir,
                                        experiment_intros())
    if findings:
        sections.append(html.section(
            "summary", "Summary: the paper's claims and normlab's results",
            [html.findings_table(findings)],
            "Every finding of this report in one table. 'agrees' and 'differs' compare normlab's "
            "measurement at this scale with what the paper reported; 'not testable at this "
            "scale' says why this scale's budget, data or grid cannot decide the claim. "
            f"Divergence: a mini-batch loss non-finite or above diverge_loss (1e3, the paper's "
            f"criterion); {TRAINS_DEFINITION}; {FRONTIER_DEFINITION}, and a verdict that "
            f"compares two overlapping brackets is not testable at this scale."))
    sections.append(html.section("runs", "Runs", [html.run_table(results.runs)]))
    sections.append(html.section("environment", "Environment", [
        html.environment_table(run_provenances(out_dir, list(results.runs.get("run_id", []))),
                               report_environment())]))
    title = f"normlab report: {study.name} ({plan.get('scale', '?')} scale)"
    header = study_header(study, plan, results)
    path = out_dir / "report.html"
    atomic_write_text(path, html.page(title, sections, header))
    return path


def study_sections(study: Study, results: StudyResults, fig_dir: Path, base: Path,
                   intros: Mapping[str, str] | None = None) -> tuple[list[str], list[Finding]]:
    """The sections of one study, one per experiment id (findings, figures), errors first; and
    the study's findings, for a summary table.

    Usable for a combined report: call it once per study and join the sections in one `page`.
    """
    errors: list[str] = []
    figures = _attempt(study.figures, (results, fig_dir), errors,
                       f"The figures of study {study.name!r} could not be drawn")
    findings = _attempt(study.findings, (results,), errors,
                        f"The findings of study {study.name!r} could not be computed")
    sections = errors + html.experiment_sections(study.experiments, figures or [],
                                                 findings or [], base, intros)
    return sections, findings or []


def study_header(study: Study, plan: Mapping[str, Any], results: StudyResults) -> str:
    """What was run: description, scale, data, overrides, run counts, links to the sections."""
    counts = status_counts(results.runs["status"]) if "status" in results.runs else "0 runs"
    built = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    settings = {"study": study.name, "description": study.description,
                "scale": plan.get("scale"), "data": plan.get("data") or "(the scale's default)",
                "overrides": ", ".join(f"{k}={v}" for k, v in (plan.get("overrides") or {}).items())
                or "(none)", "runs": counts, "built": built}
    links = [(e, e) for e in study.experiments] + [("summary", "Summary"), ("runs", "Runs"),
                                                   ("environment", "Environment")]
    return html.settings_table(settings) + "\n" + html.navigation(links)


def experiment_intros() -> dict[str, str]:
    """One line per experiment id (E1-E10, R1-R9): the claim it tests, as section intro."""
    return dict(EXPERIMENTS)


def run_provenances(out_dir: Path, run_ids: list[str]) -> list[dict[str, Any]]:
    """The provenance each finished run recorded (versions, device, git commit)."""
    store, out = RunStore(out_dir), []
    for run_id in run_ids:
        path = store.runs_dir / run_id / "result.json"
        if path.exists():
            out.append(read_result(path).provenance)
    return out


def report_environment() -> dict[str, Any]:
    """The provenance fields of the process building the report."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {k: v for k, v in provenance("report", device, 0).items()
            if k not in ("run_id", "seed")}


def _attempt(fn: Callable[..., T], args: tuple, errors: list[str], title: str) -> T | None:
    """`fn(*args)`, or None with an error box appended to `errors` if it raises."""
    try:
        return fn(*args)
    except Exception as err:  # a broken figure must not cost the whole report
        errors.append(html.error_block(title, err))
        return None
