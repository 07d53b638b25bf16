"""Write an output directory somewhere else first, then move it in whole.

Nothing the user had is lost and no half-written directory is left behind: the work happens in
a fresh directory beside the target, which replaces the target in one rename on success and is
removed on any error.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def staged_directory(out: str | os.PathLike, replace: bool = False) -> Iterator[str]:
    """Yields a fresh directory that becomes ``out`` when the block succeeds.

    ``out`` may be absent or empty; a non-empty ``out`` is replaced only with ``replace=True``
    (callers check and refuse first, so that an error comes before any work).
    """
    out = os.path.abspath(os.fspath(out))
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
    try:
        yield stage
        if os.path.isdir(out):
            if replace:
                shutil.rmtree(out)
            else:
                os.rmdir(out)  # empty: a non-empty one raises rather than being lost
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
