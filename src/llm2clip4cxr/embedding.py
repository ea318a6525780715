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
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .data import datasets_progress_bars_off
from .errors import InputError
from .fileio import atomic_write, output_lock, remove_partial_writes
from .tables import iter_csv_rows, iter_jsonl_rows

__all__ = ["EMBEDDINGS_FILE", "embed_in_chunks", "load_text_dataset"]

EMBEDDINGS_FILE = "embeddings.npy"
_MANIFEST_FILE = "manifest.json"
_CHUNKS_DIR = "chunks"


def load_text_dataset(
    path: str | os.PathLike, column: str, id_column: str | None = None, extra_columns: Sequence[str] = ()
):
    """A CSV / parquet / JSON-lines file as a `datasets.Dataset` of its non-empty `column` cells.

    The rows are streamed into a `datasets` Arrow file (memory-mapped from its cache), so a collection
    larger than RAM can be embedded. CSV and JSON lines are read strictly (`llm2clip4cxr.tables`): UTF-8
    with or without a BOM, every cell as text (no "007" -> 7), and any problem (bad quoting, a row with
    too many cells, a byte that is not UTF-8, a header without rows) is an `InputError` naming the file and
    line. Rows whose `column` is empty or blank are dropped; the result has the columns `id` (from
    `id_column`, else the row's position among the kept rows, as a string), `text` and `extra_columns`
    (as strings).

    Raises:
        FileNotFoundError: `path` does not exist.
        InputError (a ValueError): unknown suffix, unreadable content, a missing column, no non-empty text,
            or missing or repeated ids.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    # Reading and filtering are quick next to encoding, whose own bar shows progress; datasets' bars
    # for each of its steps would only bury it.
    with datasets_progress_bars_off():
        return _load_text_dataset(path, column, id_column, extra_columns)


_TEXT_READERS = {".csv": iter_csv_rows, ".jsonl": iter_jsonl_rows, ".json": iter_jsonl_rows}
_READER_VERSION = 2  # part of the cache fingerprint: bump when the readers change what they yield


def _generate_rows(path: str, columns: tuple[str, ...], suffix: str):
    yield from _TEXT_READERS[suffix](path, list(columns))


def _read_table(path: Path, wanted: list[str]):
    """The `wanted` columns of `path` as a datasets.Dataset (CSV / JSON lines: all strings)."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    if path.suffix == ".parquet":
        try:
            dataset = datasets.load_dataset("parquet", data_files=str(path), split="train")
        except Exception as error:  # pyarrow / datasets raise many types for a damaged file
            raise InputError(f"{path}: not a readable parquet file ({_last_line(error)}).") from None
        missing = [name for name in wanted if name not in dataset.column_names]
        if missing:
            raise InputError(f"{path} has no column(s) {missing}; its columns are {dataset.column_names}.")
        return dataset.select_columns(wanted)
    stat = path.stat()
    # The file's identity and version, so the Arrow cache is reused for the same file and never for an edited one.
    fingerprint = hashlib.sha256(json.dumps(
        [str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, wanted, _READER_VERSION]
    ).encode()).hexdigest()[:32]
    features = datasets.Features({name: datasets.Value("string") for name in wanted})
    try:
        return datasets.Dataset.from_generator(
            _generate_rows, features=features, fingerprint=fingerprint,
            # a tuple: datasets would split a list in gen_kwargs into shards
            gen_kwargs={"path": str(path), "columns": tuple(wanted), "suffix": path.suffix},
        )
    except DatasetGenerationError as error:
        cause = error.__cause__
        if isinstance(cause, (InputError, OSError)):
            raise cause from None
        raise InputError(f"{path}: could not be read ({_last_line(cause or error)}).") from None


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _load_text_dataset(path: Path, column: str, id_column: str | None, extra_columns: Sequence[str]):
    if path.suffix not in (*_TEXT_READERS, ".parquet"):
        raise InputError(f"{path}: expected a .csv, .parquet or .jsonl file, got {path.suffix!r}.")
    reserved = [name for name in extra_columns if name in ("id", "text")]
    if reserved:
        raise InputError(f"extra column names {reserved} clash with the output columns 'id' and 'text'.")
    wanted = list(dict.fromkeys(name for name in (column, id_column, *extra_columns) if name))
    dataset = _read_table(path, wanted)
    dataset = dataset.filter(
        lambda batch: [text is not None and bool(str(text).strip()) for text in batch[column]],
        batched=True, desc="dropping empty reports",
    )
    if len(dataset) == 0:
        raise InputError(f"{path}: column {column!r} has no non-empty text.")

    def to_output_columns(batch, indices):
        out = {"id": [None if value is None else str(value) for value in batch[id_column]] if id_column
               else [str(i) for i in indices]}
        out["text"] = [str(text) for text in batch[column]]
        out.update({name: ["" if value is None else str(value) for value in batch[name]] for name in extra_columns})
        return out

    dataset = dataset.map(
        to_output_columns, batched=True, with_indices=True, remove_columns=dataset.column_names, desc="reading texts"
    )
    if id_column:
        ids = list(dataset["id"])
        empty = next((i for i, id_ in enumerate(ids) if id_ is None or not id_.strip()), None)
        if empty is not None:
            raise InputError(
                f"{path}: id column {id_column!r} is empty for the report {dataset[empty]['text'][:60]!r}; every "
                "report needs an id."
            )
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            repeated = next(id_ for id_ in ids if id_ in seen or seen.add(id_))
            raise InputError(f"{path}: id column {id_column!r} repeats the id {repeated!r}; ids must be unique.")
    return dataset.select_columns(["id", "text", *extra_columns])


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
    manifest = {
        "num_rows": len(dataset),
        "column": column,
        "chunk_size": chunk_size,
        "encoder": encoder_name,
        "dtype": np.dtype(dtype).name,
        "data_fingerprint": _fingerprint(dataset, column),
    }
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
                atomic_write(path, lambda temp: np.save(temp, embeddings.astype(dtype, copy=False)))
                bar.update(1)

        _join_chunks(paths, final, dtype)
        shutil.rmtree(chunks_dir)
        return np.load(final, mmap_mode="r")


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
    path = output_dir / _MANIFEST_FILE
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        differing = sorted(key for key in manifest if saved.get(key) != manifest[key])
        if differing:
            details = ", ".join(f"{key}: {saved.get(key)!r} there, {manifest[key]!r} now" for key in differing)
            raise ValueError(
                f"{output_dir} holds embeddings of another run ({details}). Use a new output folder, or delete "
                "this one to start over."
            )
        return
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ValueError(f"{output_dir} is not empty and holds no {_MANIFEST_FILE}: give an empty or new folder.")
    output_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"))


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
