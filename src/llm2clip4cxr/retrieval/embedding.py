"""Embedding large collections in resumable chunks.

`embed_in_chunks` reads a `datasets.Dataset` (memory-mapped Arrow, so a 10M-report collection is not
loaded into RAM) chunk by chunk, encodes each chunk and writes it as its own `.npy` file, atomically.
A run that is killed resumes where it stopped: finished chunk files are kept and not recomputed.
When every chunk is done they are joined into one `embeddings.npy` that is returned memory-mapped, so
`EmbeddingIndex.add` can stream it without a second copy in RAM.

`datasets` has no resumable `map` (a killed `Dataset.map` starts over), hence the chunk files here.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..fileio import atomic_write, output_lock, remove_partial_writes, start_or_resume

__all__ = ["EMBEDDINGS_FILE", "embed_in_chunks"]

EMBEDDINGS_FILE = "embeddings.npy"
_MANIFEST_FILE = "manifest.json"
_CHUNKS_DIR = "chunks"


def embed_in_chunks(
    dataset,
    encode: Callable[[list[str]], np.ndarray],
    output_dir: str | os.PathLike,
    *,
    column: str = "text",
    chunk_size: int = 10_000,
    encoder_name: str = "",
    dtype: str = "float32",
    progress: bool = True,
    wait: bool = True,
    on_wait: Callable[[Path], None] | None = None,
) -> np.memmap:
    """Encode `dataset[column]` chunk by chunk into `output_dir`, resuming a run that was interrupted.

    Args:
        dataset (`datasets.Dataset`): the texts (or any values `encode` takes) in `column`.
        encode (`Callable[[list], np.ndarray]`): one chunk of values -> a `(len(chunk), dim)` array.
        output_dir: where `chunks/`, `manifest.json` and finally `embeddings.npy` are written.
        column (`str`, defaults to `"text"`): the column to encode.
        chunk_size (`int`, defaults to 10000): rows per chunk file, i.e. the work lost to a kill.
        encoder_name (`str`): identifies the encoder (model path + instruction); a resumed run must give
            the same one, so that chunks from two models are never mixed.
        dtype (`str`, defaults to `"float32"`): dtype of the stored embeddings (`"float16"` halves disk).
        progress (`bool`, defaults to True): show a tqdm bar over chunks.
        wait (`bool`, defaults to True): if another process works in `output_dir` (it holds
            `output_lock(output_dir)`), wait for it; with False raise `OutputLockedError`.
        on_wait (`Callable[[Path], None]`, *optional*): called with the lock file before waiting.

    Returns:
        The `(len(dataset), dim)` embeddings, memory-mapped read-only from `output_dir/embeddings.npy`.

    Raises:
        ValueError: `output_dir` holds a run with other data, chunk size, encoder or dtype; or `encode`
            returned the wrong number of rows or a different width than earlier chunks.
    """
    from tqdm.auto import tqdm

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    if column not in dataset.column_names:
        raise ValueError(f"The dataset has no column {column!r}; its columns are {dataset.column_names}.")
    output_dir = Path(output_dir)
    final = output_dir / EMBEDDINGS_FILE
    manifest = _run_manifest(dataset, column, chunk_size, encoder_name, dtype)
    # Two runs on one folder would write and delete each other's chunks: they take turns.
    with output_lock(output_dir, wait=wait, on_wait=on_wait):
        _check_or_write_manifest(output_dir, manifest)
        if final.is_file():  # a finished run: nothing to compute
            return np.load(final, mmap_mode="r")

        chunks_dir = output_dir / _CHUNKS_DIR
        chunks_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_writes(chunks_dir)  # a chunk a killed run was writing
        num_chunks = math.ceil(len(dataset) / chunk_size)
        paths = [chunks_dir / f"chunk-{i:06d}-of-{num_chunks:06d}.npy" for i in range(num_chunks)]
        done = sum(path.is_file() for path in paths)
        dim = None
        with tqdm(total=num_chunks, initial=done, desc="embedding chunks", unit="chunk", disable=not progress) as bar:
            for i, path in enumerate(paths):
                if path.is_file():
                    continue
                start = i * chunk_size
                values = dataset[start : start + chunk_size][column]
                embeddings = np.asarray(encode(values))
                if embeddings.ndim != 2 or embeddings.shape[0] != len(values):
                    raise ValueError(
                        f"encode() returned shape {embeddings.shape} for a chunk of {len(values)} rows; "
                        "expected (rows, dim)."
                    )
                dim = dim or _existing_dim(paths) or embeddings.shape[1]
                if embeddings.shape[1] != dim:
                    raise ValueError(f"encode() returned width {embeddings.shape[1]}, earlier chunks have {dim}.")
                atomic_write(path, lambda temp, array=embeddings: np.save(temp, array.astype(dtype, copy=False)))
                bar.update(1)

        _join_chunks(paths, final, dtype)
        shutil.rmtree(chunks_dir)
        return np.load(final, mmap_mode="r")


def _run_manifest(dataset, column: str, chunk_size: int, encoder_name: str, dtype: str) -> dict:
    """What a resumable embedding folder records about its run (`manifest.json`); a rerun must match it, so that
    chunks of two datasets, chunkings, encoders or dtypes are never mixed (`_check_or_write_manifest`)."""
    return {
        "num_rows": len(dataset),
        "column": column,
        "chunk_size": chunk_size,
        "encoder": encoder_name,
        "dtype": np.dtype(dtype).name,
        "data_fingerprint": _fingerprint(dataset, column),
    }


def _fingerprint(dataset, column: str) -> str:
    """A hash of the column's values, so a resumed run cannot silently mix two datasets.

    `Dataset._fingerprint` changes with every in-memory rebuild of the same data, so it cannot serve;
    one pass over the values is cheap next to encoding them.
    """
    digest = hashlib.sha256()
    for batch in dataset.select_columns([column]).iter(batch_size=65_536):
        for value in batch[column]:
            digest.update(value.encode() if isinstance(value, str) else repr(value).encode())
            digest.update(b"\0")
    return digest.hexdigest()


def _check_or_write_manifest(output_dir: Path, manifest: dict) -> None:
    def same_run(saved: dict) -> None:
        differing = sorted(key for key in manifest if saved.get(key) != manifest[key])
        if differing:
            details = ", ".join(f"{key}: {saved.get(key)!r} there, {manifest[key]!r} now" for key in differing)
            raise ValueError(
                f"{output_dir} holds embeddings of another run ({details}). Use a new output folder, or delete "
                "this one to start over."
            )

    start_or_resume(output_dir, _MANIFEST_FILE, manifest, same_run, lambda: ValueError(
        f"{output_dir} is not empty and holds no {_MANIFEST_FILE}: give an empty or new folder."
    ))


def _existing_dim(paths: Sequence[Path]) -> int | None:
    for path in paths:
        if path.is_file():
            return int(np.load(path, mmap_mode="r").shape[1])
    return None


def _join_chunks(paths: Sequence[Path], final: Path, dtype: str) -> None:
    """Concatenate the chunk files into `final` through a memmap (never all of it in RAM), atomically."""
    shapes = [np.load(path, mmap_mode="r").shape for path in paths]
    rows, dim = sum(shape[0] for shape in shapes), shapes[0][1]

    def write(temp: Path) -> None:
        out = np.lib.format.open_memmap(temp, mode="w+", dtype=dtype, shape=(rows, dim))
        offset = 0
        for path in paths:
            chunk = np.load(path, mmap_mode="r")
            out[offset : offset + len(chunk)] = chunk
            offset += len(chunk)
        out.flush()
        del out

    atomic_write(final, write)
