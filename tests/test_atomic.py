"""Atomic writes: a failed write names the file asked for and its reason, never the temporary
file, and leaves nothing behind."""

from __future__ import annotations

import errno
import os

import pytest

from normlab.utils import atomic
from normlab.utils.atomic import atomic_write_text


def _fail(code: int, *names: str):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), *names)
    return fail


@pytest.mark.parametrize("step", ["fsync", "replace", "mkstemp"])
def test_a_failed_write_names_the_target_and_the_reason(step, tmp_path, monkeypatch):
    target = tmp_path / "report.html"
    temporary = str(tmp_path / ".report.html.w0uoj5ry.tmp")
    if step == "mkstemp":
        monkeypatch.setattr(atomic.tempfile, "mkstemp", _fail(errno.EROFS, temporary))
    else:
        names = (temporary, str(target)) if step == "replace" else ()
        monkeypatch.setattr(atomic.os, step, _fail(errno.ENOSPC, *names))
    with pytest.raises(OSError) as err:
        atomic_write_text(target, "<html></html>")
    assert err.value.filename == str(target) and err.value.filename2 is None
    code = errno.EROFS if step == "mkstemp" else errno.ENOSPC
    assert (err.value.errno, err.value.strerror) == (code, os.strerror(code))
    assert list(tmp_path.iterdir()) == []  # no temporary file left

