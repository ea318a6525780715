"""Checks on a model folder before anything loads it: one clear error instead of a library's traceback,
and no code from the folder run unless the caller trusts it.

- `check_model_folder(path)`: the folder exists, its `config.json` is UTF-8 JSON, its safetensors weights
  are whole (`check_safetensors_file`).
- `no_remote_code(path, trust_remote_code)`: the keyword arguments for `from_pretrained` (always an
  explicit `trust_remote_code`, so transformers never asks on stdout) and a guard that turns transformers'
  refusal into `UntrustedCodeError` naming the folder's Python files.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import CorruptFileError, InputError, UntrustedCodeError

__all__ = [
    "check_model_folder",
    "check_safetensors_file",
    "read_json_object",
    "remote_code_guard",
    "store_weights_in_half_precision",
]

# What torch.save / pickle files start with: a zip archive, or a pickle protocol opcode.
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON file holding an object; every problem is an error naming the file (and line)."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise InputError(
            f"{path}, line {line}: not UTF-8 text (byte {raw[error.start]:#04x}); save it as UTF-8."
        ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path}, line {error.lineno}: not valid JSON ({error.msg}).") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(value).__name__}.")
    return value


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Raise `CorruptFileError` unless `path` is a whole safetensors file (header read only, no tensors).

    safetensors checks that the header parses and that the data it declares fills the file exactly, so an
    empty, truncated or padded file, or a pickle renamed `.safetensors`, is caught before a loader fails.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="np"):
            pass
    except SafetensorError as error:
        with open(path, "rb") as handle:
            head = handle.read(4)
        if not head:
            what = "it is empty (0 bytes)"
        elif head.startswith(_PICKLE_MAGIC):
            what = "it is a PyTorch pickle (torch.save), not safetensors; re-save it with save_pretrained"
        else:
            what = f"it is truncated or not a safetensors file ({error})"
        raise CorruptFileError(f"{path}: unreadable weights: {what}. Re-save or re-download the checkpoint.") from None


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CorruptFileError(f"{index}: no \"weight_map\" object naming the shards.")
        shards = [folder / name for name in sorted(set(map(str, weight_map.values())))]
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: the shard(s) {missing} named by {index.name} are missing.")
        return shards
    return sorted(folder.glob("*.safetensors"))


def store_weights_in_half_precision(folder: str | os.PathLike) -> int:
    """Rewrite the float32 tensors of a saved model's safetensors file(s) as float16, in place and atomically;
    returns how many tensors changed.

    Halves the folder's size (a model shipped inside the package). `config.json` keeps `"dtype": "float32"`, so
    `from_pretrained` (transformers' default `dtype="auto"` reads the config) and sentence-transformers load the
    model as float32, as before; only the stored weights are rounded.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .fileio import atomic_write

    folder = Path(folder)
    config = read_json_object(folder / "config.json")
    dtype = config.get("dtype", config.get("torch_dtype"))  # transformers 4 wrote torch_dtype
    if dtype not in (None, "float32"):
        raise InputError(f"{folder}: config.json says dtype {dtype!r}; only a float32 model is halved "
                         "(its config keeps float32, so it loads as float32).")
    changed = 0
    for path in _weight_files(folder):
        check_safetensors_file(path)
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
        changed += sum(tensor.dtype == torch.float32 for tensor in tensors.values())
        halved = {name: t.half() if t.dtype == torch.float32 else t for name, t in tensors.items()}
        atomic_write(path, lambda temp, halved=halved, metadata=metadata: save_file(halved, str(temp), metadata))
    return changed


def check_model_folder(path: str | os.PathLike, argument: str = "--model", kind: str = "checkpoint") -> Path:
    """Check a model folder before loading it; returns it as a Path.

    Raises:
        FileNotFoundError: no such folder, or no config.json in it.
        InputError: a file instead of a folder, or a config.json that is not UTF-8 JSON.
        CorruptFileError: a safetensors file that is empty, truncated or a pickle.
    """
    path = Path(path)
    named = f"{argument} {path}" if argument else str(path)
    if not path.exists():
        raise FileNotFoundError(f"{named}: no such directory (give a saved {kind} folder).")
    if not path.is_dir():
        raise InputError(f"{named}: a file, not a folder (give the saved {kind} folder).")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{named}: no config.json, so it is not a saved {kind} folder.")
    read_json_object(path / "config.json")
    for weights in _weight_files(path):
        check_safetensors_file(weights)
    return path


@contextlib.contextmanager
def remote_code_guard(path: str | os.PathLike, trust_remote_code: bool) -> Iterator[dict]:
    """Around a `from_pretrained` of `path`: yields `{"trust_remote_code": ...}` to pass on (explicit, so
    transformers never prompts on stdout), and turns its refusal to run the folder's code into
    `UntrustedCodeError` naming the folder's Python files."""
    try:
        yield {"trust_remote_code": bool(trust_remote_code)}
    except ValueError as error:
        if trust_remote_code or "trust_remote_code" not in str(error):
            raise
        files = sorted(file.name for file in Path(path).glob("*.py")) if Path(path).is_dir() else []
        shipped = f" ({', '.join(files)})" if files else ""
        raise UntrustedCodeError(
            f"{path} needs Python code it ships{shipped} to load, which is not run by default; if you trust its "
            "author, pass --trust-remote-code (Python: trust_remote_code=True)."
        ) from None
