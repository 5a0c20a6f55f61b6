"""The pieces of a self-contained HTML report, each a function returning an HTML string.

Pieces take lists so that one study's report and a multi-study report are composed the same way:
`page(title, [section(...), ...])`. Figures are embedded as base64 PNG (data: URIs), so the page
needs no other file; it links to each figure's PDF and CSV beside it.
"""

from __future__ import annotations

import base64
import html
import os
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from normlab.report.columns import KEY_METRICS, common_settings, metric_columns, varying_settings
from normlab.report.terminal import format_value, status_counts
from normlab.studies.base import (
    AGREES,
    DIFFERS,
    FAILED,
    MEASURED,
    NOT_TESTABLE,
    FigureInfo,
    Finding,
)

_VERDICT_CSS = {AGREES: "agree-yes", DIFFERS: "agree-no", NOT_TESTABLE: "not-testable",
                MEASURED: "measured", FAILED: "agree-no"}

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .88em; }
.table-wrap { max-width: 100%; overflow-x: auto; margin: .6em 0; }
.table-wrap table { margin: 0; }
table.runs td, table.runs th { white-space: nowrap; }
table.runs tr > :first-child { position: sticky; left: 0; background: #fff; }
table.runs tr > th:first-child { background: #f3f3f3; }
.verdict-reason { display: block; font-size: .85em; color: #555; }
th, td { border: 1px solid #ddd; padding: .25em .55em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .92em; color: #333; }
.error { border: 2px solid #c62828; background: #fdecea; padding: .6em .9em; margin: 1em 0; }
.error pre { white-space: pre-wrap; font-size: .8em; }
.status-completed { color: #2e7d32; } .status-diverged { color: #e65100; }
.status-failed, .status-unfinished { color: #c62828; }
.agree-yes { color: #2e7d32; } .agree-no { color: #c62828; } .not-testable { color: #8d6e00; }
.measured { color: #455a64; }
nav a { margin-right: 1em; }
"""


def page(title: str, sections: Sequence[str], header: str = "") -> str:
    """A whole HTML document: `title`, an optional header block, then the sections in order."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{_esc(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{_esc(title)}</h1>\n{header}\n" + "\n".join(sections) + "\n</body>\n</html>\n"
    )


def section(anchor: str, title: str, parts: Sequence[str], intro: str = "") -> str:
    """A titled section with an id (for links), an optional intro paragraph and its parts."""
    intro_html = f"<p>{_esc(intro)}</p>\n" if intro else ""
    return (f"<section id=\"{_esc(anchor)}\">\n<h2>{_esc(title)}</h2>\n{intro_html}"
            + "\n".join(parts) + "\n</section>")


def navigation(links: Sequence[tuple[str, str]]) -> str:
    """A line of links to sections: (anchor, label) pairs."""
    items = "".join(f"<a href=\"#{_esc(a)}\">{_esc(label)}</a>" for a, label in links)
    return f"<nav>{items}</nav>"


def figure_block(figure: FigureInfo, base: Path) -> str:
    """The figure's PNG embedded, its title and caption, and links to its PDF and CSV.

    Links are relative to `base` (the folder the report is written to). A figure without a
    readable PNG becomes an error box.
    """
    if figure.error is not None:
        return error_block(figure.title, figure.error)
    png = figure.files.get("png")
    try:
        data = base64.b64encode(Path(png).read_bytes()).decode("ascii") if png else None
    except OSError as err:
        return error_block(f"Figure {figure.name}: its PNG cannot be read", err)
    if data is None:
        return error_block(f"Figure {figure.name}: no PNG file was saved",
                           f"files: {sorted(figure.files)}")
    links = " · ".join(
        f"<a href=\"{_esc(_relative(figure.files[ext], base))}\">{ext.upper()}</a>"
        for ext in ("pdf", "csv", "png") if ext in figure.files)
    return (
        f"<figure id=\"fig-{_esc(figure.name)}\">\n"
        f"<img alt=\"{_esc(figure.title)}\" src=\"data:image/png;base64,{data}\">\n"
        f"<figcaption><b>{_esc(figure.title)}.</b> {_esc(figure.caption)} "
        f"<span class=\"links\">[{links}]</span></figcaption>\n</figure>"
    )


def error_block(title: str, error: BaseException | str) -> str:
    """A red box saying what failed, with the message and (for an exception) its traceback."""
    if isinstance(error, BaseException):
        message = f"{type(error).__name__}: {error}"
        trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        details = f"<details><summary>traceback</summary><pre>{_esc(trace)}</pre></details>"
    else:
        message, details = str(error), ""
    return (f"<div class=\"error\"><b>{_esc(title)}</b><pre>{_esc(message)}</pre>"
            f"{details}</div>")


def findings_table(findings: Sequence[Finding]) -> str:
    """The paper-vs-normlab table: experiment, claim, what the paper reports, what we measured,
    and the verdict ("agrees", "differs", "not testable at this scale", "measured", "could not
    be computed") with its reason (every verdict is named: `Finding` refuses an unknown one)."""
    if not findings:
        return ""
    rows = []
    for f in findings:
        css = _VERDICT_CSS[f.verdict]
        reason = f"<span class=\"verdict-reason\">{_esc(f.reason)}</span>" if f.reason else ""
        rows.append(f"<tr><td>{_esc(f.experiment)}</td><td>{_esc(f.claim)}</td>"
                    f"<td>{_esc(f.paper)}</td><td>{_esc(f.ours)}</td>"
                    f"<td class=\"{css}\">{_esc(f.verdict)}{reason}</td></tr>")
    return ("<div class=\"table-wrap\"><table class=\"findings\">\n<tr><th>experiment</th>"
            "<th>claim</th><th>paper</th><th>normlab</th><th>verdict</th></tr>\n"
            + "\n".join(rows) + "\n</table></div>")


def run_table(runs: pd.DataFrame) -> str:
    """Every run: its id, the settings that vary, status, the key metrics, steps, divergence,
    wall time and the other final metrics, in that order (key columns first).

    The table scrolls sideways inside its own box (its first column stays in view), so the page
    keeps its width. Settings shared by all runs are listed once above the table (collapsed).
    A failed run's error is shown on hovering its status.
    """
    if runs.empty:
        return "<p>No runs.</p>"
    varying = varying_settings(runs)
    metrics = metric_columns(runs)
    key = [c for c in KEY_METRICS if c in metrics]
    columns = ["run_id", *varying, "status", *key, "steps_done", "diverged_step",
               "diverged_loss", "wall_time_s", *(c for c in metrics if c not in key)]
    columns = [c for c in columns if c in runs.columns]
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = []
    for _, row in runs.iterrows():
        cells = []
        for c in columns:
            value = row[c]
            if c == "status":
                error = row.get("error")
                title = f" title=\"{_esc(error)}\"" if isinstance(error, str) else ""
                cells.append(f"<td class=\"status-{_esc(value)}\"{title}>{_esc(value)}</td>")
            else:
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                css = " class=\"num\"" if numeric else ""
                cells.append(f"<td{css}>{_esc(format_value(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    common = common_settings(runs)
    shared = settings_table(common)
    shared_html = (f"<details><summary>Settings shared by every run ({len(common)})</summary>"
                   f"{shared}</details>\n") if common else ""
    return (f"<p>{_esc(status_counts(runs['status']))}.</p>\n{shared_html}"
            f"<div class=\"table-wrap\"><table class=\"runs\">\n<tr>{head}</tr>\n"
            + "\n".join(body) + "\n</table></div>")


def settings_table(settings: Mapping[str, Any]) -> str:
    """A two-column table of name and value."""
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(format_value(v))}</td></tr>"
                   for k, v in settings.items())
    return f"<table class=\"settings\">{rows}</table>"


def environment_table(recorded: Sequence[Mapping[str, Any]], current: Mapping[str, Any]) -> str:
    """The environment: what the runs recorded (every distinct value) beside the report's own.

    `recorded` are the runs' provenance dicts (versions, device, git commit); `current` is
    `provenance`-like information about the process that built the report.
    """
    keys = list(dict.fromkeys([*current, *(k for p in recorded for k in p)]))
    keys = [k for k in keys if k not in ("run_id", "seed")]
    rows = []
    for key in keys:
        seen = list(dict.fromkeys(str(p.get(key)) for p in recorded if p.get(key) is not None))
        rows.append(f"<tr><th>{_esc(key)}</th><td>{_esc(', '.join(seen))}</td>"
                    f"<td>{_esc(format_value(current.get(key)))}</td></tr>")
    return ("<table class=\"environment\">\n<tr><th></th><th>recorded by the runs</th>"
            "<th>this report</th></tr>\n" + "\n".join(rows) + "\n</table>")


def experiment_sections(experiments: Sequence[str], figures: Sequence[FigureInfo],
                        findings: Sequence[Finding], base: Path,
                        intros: Mapping[str, str] | None = None) -> list[str]:
    """One section per experiment id: its findings, then its figures.

    Ids come in the order of `experiments`, then any other id a figure or finding names.
    Experiments with neither figures nor findings get no section.
    """
    intros = intros or {}
    ids = list(dict.fromkeys([*experiments, *(f.experiment for f in figures),
                              *(f.experiment for f in findings)]))
    out = []
    for experiment in ids:
        mine = [f for f in findings if f.experiment == experiment]
        figs = [figure_block(f, base) for f in figures if f.experiment == experiment]
        if mine or figs:
            parts = [findings_table(mine), *figs] if mine else figs
            out.append(section(experiment, experiment, parts, intros.get(experiment, "")))
    return out


def _relative(path: str | os.PathLike, base: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)
