"""`normlab export DIR --to tensorboard OUT`: a study folder written for TensorBoard.

DIR is checked as `show`, `report` and `verify` check it (a study folder, every file sound),
and OUT before anything is written (writable; new, empty, or an earlier export of DIR). The
export replaces each run's earlier export, so running it twice leaves each run once.
MLflow and live logging during a run are not there yet (docs/tracking.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from normlab.utils.config import check_choice

FORMATS = ("tensorboard",)


def add_export_parser(commands: Any, check_study_folder: Callable[[Path], None]) -> None:
    """Add the `export` subcommand to `commands` (argparse subparsers); `check_study_folder`
    refuses a folder that is no study folder or has damaged files (the other commands' check)."""
    export = commands.add_parser(
        "export", help="write a study folder for TensorBoard (tensorboard --logdir OUT)")
    export.add_argument("dir", help="the study folder")
    export.add_argument("--to", nargs=2, required=True, metavar=("FORMAT", "OUT"),
                        help=f"{' | '.join(FORMATS)} and the folder to write into")
    export.set_defaults(handler=partial(run_export, check_study_folder=check_study_folder))


def run_export(args: argparse.Namespace, check_study_folder: Callable[[Path], None]) -> int:
    """Check FORMAT, DIR and OUT, then export; print what was written."""
    # imported on use: the export reads studies (pandas, torch), which --help does not need
    from normlab.export import export_tensorboard

    to, out = args.to
    check_choice("--to", to, FORMATS)
    check_study_folder(Path(args.dir))
    print(export_tensorboard(args.dir, out).summary())
    return 0
