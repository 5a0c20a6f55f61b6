"""`normlab list` (studies): each study's name, description and experiment ids, without
importing the studies.

The study modules import torch, pandas and matplotlib (2-5 s); the listing reads them from
study_index.json instead, which holds the built-in studies (tests/test_startup.py checks it
against the registry; `python -m normlab.cli.listing` rewrites it). Where normlab.studies is
imported already (a script or test that registers its own studies), the live registry is
listed, so those studies show too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from normlab.utils.atomic import atomic_write_text

STUDY_INDEX = Path(__file__).with_name("study_index.json")
StudyRow = tuple[str, str, tuple[str, ...]]  # name, description, experiment ids


def study_rows() -> list[StudyRow]:
    """The studies to list: the index, or the registry when it is loaded already."""
    if "normlab.studies" in sys.modules:
        return registered_studies()
    return [(row["name"], row["description"], tuple(row["experiments"]))
            for row in json.loads(STUDY_INDEX.read_text(encoding="utf-8"))]


def registered_studies(builtin_only: bool = False) -> list[StudyRow]:
    """The rows of the study registry (with `builtin_only`, of normlab's own studies)."""
    # imported on use: normlab.studies imports torch (2-5 s), which study_index.json spares
    # `normlab list`
    from normlab.studies import get_study, list_studies

    studies = [get_study(name) for name in list_studies()]
    return [(s.name, s.description, tuple(s.experiments)) for s in studies
            if not builtin_only or type(s).__module__.startswith("normlab.studies.")]


def study_lines(rows: list[StudyRow]) -> list[str]:
    """"name  description [E1, E10]", the names padded to one width."""
    width = max((len(name) for name, _, _ in rows), default=0)
    return [f"{name.ljust(width)}  {description}"
            + (f" [{', '.join(experiments)}]" if experiments else "")
            for name, description, experiments in rows]


def write_study_index() -> None:
    """Rewrite study_index.json from the registry's built-in studies."""
    rows = [{"name": name, "description": description, "experiments": list(experiments)}
            for name, description, experiments in registered_studies(builtin_only=True)]
    atomic_write_text(STUDY_INDEX, json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    write_study_index()
