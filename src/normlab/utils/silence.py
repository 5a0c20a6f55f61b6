"""`silenced(message)`: one known warning dropped inside a block, every other one let through.

For torch warnings that say nothing to a normlab user and would otherwise reach the progress
display once per call (the reason is written where each is silenced). The message is matched
from its start, literally. Cost: one `warnings.catch_warnings` per block.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def silenced(message: str, category: type[Warning] = UserWarning) -> Iterator[None]:
    """Inside the block, ignore warnings of `category` whose text starts with `message`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
        yield
