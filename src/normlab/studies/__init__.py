"""Built-in studies. Importing this package registers each of them."""

from normlab.studies.base import (
    SCALES,
    FigureInfo,
    Finding,
    Study,
    StudyResults,
    get_study,
    list_studies,
    load_results,
    register_study,
)

__all__ = [
    "SCALES",
    "FigureInfo",
    "Finding",
    "Study",
    "StudyResults",
    "get_study",
    "list_studies",
    "load_results",
    "register_study",
]

from normlab.utils.plugins import import_submodules

import_submodules(__name__)  # every module of this package registers its study on import
