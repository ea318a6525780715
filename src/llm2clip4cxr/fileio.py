"""Atomic file writes: a reader (or a resumed run) never sees half a file."""

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """Call `write(temp_path)`, fsync the file, then rename it over `path`.

    The temp file sits in the same folder (so the rename is atomic) and keeps `path`'s suffix (so
    writers that pick the format from it, e.g. `np.save` or `savefig`, behave as for `path`). It is
    removed if `write` fails or the run is interrupted by an exception.
    """
    path = Path(path)
    temp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.tmp{path.suffix}")
    try:
        write(temp)
        with temp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
