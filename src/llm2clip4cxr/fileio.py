"""Safe writes: a reader (or a resumed run) never sees half a file, two writers never interleave, files
honour the umask.

- `atomic_write(path, write)`: one file, through a hidden temp file and a rename; `atomic_write_text` and
  `atomic_write_json` for the common cases.
- `atomic_write_folder(path, write)`: a whole folder, through a hidden temp folder and a rename.
- `output_lock(path)`: the inter-process lock (the `filelock` package) a writer of `path` holds; a second
  writer waits for it, or fails at once with `OutputLockedError`.
- `remove_partial_writes(folder)`: the temp files a killed writer left behind.
- `start_or_resume(folder, ...)`: begin a resumable output folder, or check that the one there was begun alike.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import OutputLockedError

__all__ = [
    "atomic_write",
    "atomic_write_folder",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_directory",
    "is_partial_write",
    "lock_path",
    "output_lock",
    "remove_partial_writes",
    "sha256_file",
    "start_or_resume",
]

_TEMP_MARK = ".tmp"
# ".<name without suffix>.<32 hex>.tmp<suffix>": how atomic_write names its temp files, and all that
# remove_partial_writes deletes.
_TEMP_NAME = re.compile(r"^\.(?P<stem>.*)\.(?P<token>[0-9a-f]{32})\.tmp(?P<suffix>\.[^.]*)?$")
_LOCK_SUFFIX = ".lock"

# Called with a step name at each point of a save where a kill would leave a distinct state on disk.
# Tests set it to snapshot the folder at every step (fault injection); None otherwise.
write_step_hook: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if write_step_hook is not None:
        write_step_hook(name)


def temp_path_for(path: str | os.PathLike) -> Path:
    """A fresh hidden temp name beside `path` that keeps its suffix (writers such as `np.save` or `savefig`
    pick the format from it) and that `is_partial_write` recognises."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{uuid.uuid4().hex}{_TEMP_MARK}{path.suffix}")


def is_partial_write(name: str) -> bool:
    """Whether a file name is an `atomic_write` temp file (what a writer killed mid-write leaves)."""
    return _TEMP_NAME.match(name) is not None


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (the only portable way to read it)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Give a file (or, recursively, a folder) the permissions a plain `open()`/`mkdir()` would have.

    Some writers (safetensors' `save_file`, temp-file based ones) create files 0600 whatever the umask.
    """
    path = Path(path)
    mask = current_umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        if item.is_symlink():
            continue
        mode = 0o777 if item.is_dir() else (0o777 if os.stat(item).st_mode & stat.S_IXUSR else 0o666)
        os.chmod(item, mode & ~mask)


def fsync_directory(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename in it survives a power cut); a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """Call `write(temp_path)`, fsync the file, then rename it over `path`.

    The temp file sits in the same folder (so the rename is atomic), is hidden and keeps `path`'s suffix
    (`.<name>.<32 hex>.tmp<suffix>`, see `is_partial_write`). It is removed if `write` fails or the run is
    interrupted by an exception; a SIGKILL leaves it for `remove_partial_writes`. The file gets the
    permissions the umask gives (not a writer's private 0600).
    """
    path = Path(path)
    temp = temp_path_for(path)
    try:
        write(temp)
        _step("temp-written")
        honour_umask(temp)
        with temp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _step("replaced")
    fsync_directory(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`text` written to `path` as UTF-8, through `atomic_write`."""
    atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, payload, **dumps_options) -> None:
    """`payload` as JSON (`json.dumps(payload, **dumps_options)` and a newline), through `atomic_write`."""
    atomic_write_text(path, json.dumps(payload, **dumps_options) + "\n")


def start_or_resume(
    folder: Path,
    manifest_name: str,
    manifest: dict,
    check: Callable[[dict], None],
    not_resumable: Callable[[], Exception],
) -> bool:
    """Begin the resumable output `folder`, or resume it: returns True when resuming.

    If `folder/manifest_name` exists, it is what started the folder: `check(saved manifest)` raises when that
    run was started differently (other options, other data), so that two runs never mix their output.
    Otherwise `folder` must be new or empty (else `not_resumable()` is raised: it holds something else); it is
    created and `manifest` written into it atomically.
    """
    path = folder / manifest_name
    if path.is_file():
        check(json.loads(path.read_text(encoding="utf-8")))
        return True
    if folder.exists() and any(folder.iterdir()):
        raise not_resumable()
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, manifest, indent=2, sort_keys=True)
    return False


def atomic_write_folder(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call `write(temp_folder)`, then put the folder in place of `path` (replacing an older one).

    Holds `output_lock(path)` throughout, so two writers of the same folder take turns. The temp folder
    is a hidden sibling with a fixed name, so a run killed mid-write leaves it to be cleared by the next
    write of the same `path`; an exception clears it at once. A reader sees the old folder or the new one,
    except for the instant between removing the old one and the rename. Returns `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.partial")
    with output_lock(path):
        shutil.rmtree(temp, ignore_errors=True)
        try:
            write(temp)
            honour_umask(temp)
            if path.exists():
                shutil.rmtree(path)
            os.replace(temp, path)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
    fsync_directory(path.parent)
    return path


def remove_partial_writes(folder: str | os.PathLike, recursive: bool = True) -> int:
    """Delete the temp files that `atomic_write` calls killed mid-write left under `folder`; returns how many.

    An exception cleans up after itself, a SIGKILL cannot: a resumed run or the next save calls this first.
    Only names `is_partial_write` recognises are touched.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for path in folder.rglob(".*") if recursive else folder.glob(".*"):
        if path.is_file() and is_partial_write(path.name):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def lock_path(target: str | os.PathLike, inside: bool = False) -> Path:
    """The lock file of an output: `<folder>/.lock` inside a folder that outlives every run (`inside=True`,
    e.g. an index folder), else a hidden sibling `.<name>.lock` (files, and folders that get replaced or
    deleted, whose own lock would vanish with them)."""
    # Resolved: the same output named two ways (relative, absolute, via a symlink) has one lock, and one
    # filelock instance in this process, which is what makes holding it reentrant.
    target = Path(target).resolve()
    return target / _LOCK_SUFFIX if inside else target.with_name(f".{target.name}{_LOCK_SUFFIX}")


@contextlib.contextmanager
def output_lock(
    target: str | os.PathLike,
    *,
    wait: bool = True,
    inside: bool = False,
    on_wait: Callable[[Path], None] | None = None,
) -> Iterator[Path]:
    """Hold the inter-process lock of the output `target` (see `lock_path`) for the block.

    Reentrant within a process (the same `filelock` instance serves every holder of a path), exclusive
    between processes and between threads. If another holder has it: with `wait=True` call
    `on_wait(lock_file)` (e.g. to tell the user) and block until it is free; with `wait=False` raise
    `OutputLockedError` naming the output. The lock is released by the OS if the holder dies.
    """
    from filelock import FileLock, Timeout

    lock_file = lock_path(target, inside)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_file, is_singleton=True)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not wait:
            raise OutputLockedError(
                f"{target} is being written by another process (lock file {lock_file}); wait for it to finish, "
                "choose another output, or drop --no-wait to wait for it."
            ) from None
        if on_wait is not None:
            on_wait(lock_file)
        lock.acquire()
    try:
        yield lock_file
    finally:
        lock.release()
