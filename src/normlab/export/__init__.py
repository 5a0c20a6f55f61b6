"""Exports of a study folder to the tools researchers watch runs in, after the fact.

`export_tensorboard(DIR, OUT)` (`normlab export DIR --to tensorboard OUT`) writes TensorBoard
event files: scalars, the HParams dashboard, the report's figures (docs/tracking.md). What is
exported (`normlab.export.series`) does not depend on the tool; `normlab.export.target` keeps
the export folder to one study and one folder per run.
"""

from normlab.export.tensorboard import TensorBoardExport, export_tensorboard

__all__ = ["TensorBoardExport", "export_tensorboard"]
