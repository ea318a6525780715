"""Atomic file writes: a reader (or a resumed run) never sees half a file."""

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_write_folder", "remove_partial_writes"]

_TEMP_MARK = ".tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """Call `write(temp_path)`, fsync the file, then rename it over `path`.

    The temp file sits in the same folder (so the rename is atomic) and keeps `path`'s suffix (so
    writers that pick the format from it, e.g. `np.save` or `savefig`, behave as for `path`). It is
    removed if `write` fails or the run is interrupted by an exception.
    """
    path = Path(path)
    temp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}{_TEMP_MARK}{path.suffix}")
    try:
        write(temp)
        with temp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_write_folder(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call `write(temp_folder)`, then put the folder in place of `path` (replacing an older one).

    The temp folder is a hidden sibling with a fixed name, so a run killed mid-write leaves it to be
    cleared by the next write of the same `path`; an exception clears it at once. A reader sees the old
    folder or the new one, except for the instant between removing the old one and the rename.
    Returns `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.partial")
    shutil.rmtree(temp, ignore_errors=True)
    try:
        write(temp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(temp, path)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return path


def remove_partial_writes(folder: str | os.PathLike) -> int:
    """Delete the temp files that `atomic_write` calls killed mid-write left under `folder`; returns how many.

    An exception cleans up after itself, a SIGKILL cannot: a resumed run calls this first.
    """
    removed = 0
    for path in Path(folder).rglob(f".*{_TEMP_MARK}*"):
        if path.is_file() and _looks_like_temp(path.name):
            path.unlink()
            removed += 1
    return removed


def _looks_like_temp(name: str) -> bool:
    # ".<stem>.<32 hex>.tmp<suffix>", as atomic_write names them; anything else is not ours to delete.
    parts = name.split(_TEMP_MARK, 1)[0].rsplit(".", 1)
    return name.startswith(".") and len(parts) == 2 and len(parts[1]) == 32 and all(c in "0123456789abcdef" for c in parts[1])
