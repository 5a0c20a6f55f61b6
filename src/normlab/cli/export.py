"""`normlab export DIR --to tensorboard OUT` and `normlab export DIR --to mlflow URI`: a study
folder written for TensorBoard, or sent to an MLflow tracking server.

DIR is checked as `show`, `report` and `verify` check it (a study folder, every file sound),
and the target before anything is written (OUT: writable; new, empty, or an earlier export of
DIR; URI: an http(s) address of a server that answers). An export replaces each run's earlier
export, keyed by run id, so running it twice leaves each run once. Live logging during a run
is not there yet (docs/tracking.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from normlab.utils.config import check_choice

FORMATS = ("tensorboard", "mlflow")


def add_export_parser(commands: Any, check_study_folder: Callable[[Path], None]) -> None:
    """Add the `export` subcommand to `commands` (argparse subparsers); `check_study_folder`
    refuses a folder that is no study folder or has damaged files (the other commands' check)."""
    export = commands.add_parser(
        "export", help="write a study folder for TensorBoard (tensorboard --logdir OUT) or send "
                       "it to an MLflow tracking server")
    export.add_argument("dir", help="the study folder")
    export.add_argument("--to", nargs=2, required=True, metavar=("FORMAT", "OUT"),
                        help="tensorboard and the folder to write into, or mlflow and the "
                             "tracking server's URI")
    export.set_defaults(handler=partial(run_export, check_study_folder=check_study_folder))


def run_export(args: argparse.Namespace, check_study_folder: Callable[[Path], None]) -> int:
    """Check FORMAT, DIR and OUT, then export; print what was written."""
    # imported on use: the export reads studies (pandas, torch), which --help does not need
    from normlab.export import export_mlflow, export_tensorboard

    to, target = args.to
    check_choice("--to", to, FORMATS)
    check_study_folder(Path(args.dir))
    export = export_tensorboard if to == "tensorboard" else export_mlflow
    print(export(args.dir, target).summary())
    return 0
