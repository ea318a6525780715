"""Strict readers for the tables and text files users give: UTF-8 (with or without a BOM), CSV with a header
row, JSON lines. Every problem is an `InputError` naming the file, the line and what to do, instead of a
parser's traceback; rows stream one at a time (constant memory whatever the file size).

`load_text_dataset` streams one such file (or a parquet file) into a `datasets.Dataset` of its texts, the
input of `llm2clip4cxr encode` / `index build` / `similar`.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from ..errors import InputError

__all__ = [
    "bad_utf8_error", "csv_header", "datasets_progress_bars_off", "iter_csv_rows", "iter_jsonl_rows", "json_lines",
    "load_text_dataset", "read_text_lines",
]

_UTF8_HINT = "save it as UTF-8"


def bad_utf8_error(path: Path) -> InputError:
    """Locate the first byte that is not UTF-8 (a second pass, only on failure) and name it."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    number = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                decoder.decode(raw)
            except UnicodeDecodeError as error:
                return InputError(
                    f"{path}, line {number}: not UTF-8 text "
                    f"(byte {raw[error.start]:#04x} at column {error.start + 1}); "
                    f"{_UTF8_HINT}."
                )
    return InputError(
        f"{path}, line {max(number, 1)}: not UTF-8 text (the file ends inside a multi-byte character: truncated?); "
        f"{_UTF8_HINT}."
    )


@contextlib.contextmanager
def _text(path: Path) -> Iterator[io.TextIOBase]:
    """`path` opened as UTF-8 text; a leading BOM is dropped, newlines are left to the csv module."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            yield handle
    except UnicodeDecodeError:
        raise bad_utf8_error(path) from None


@contextlib.contextmanager
def _large_fields() -> Iterator[None]:
    # The csv module refuses cells over 128 KiB by default; a report can be longer than that.
    previous = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _records(path: Path, handle) -> Iterator[tuple[int, list[str]]]:
    """(first line, cells) of each non-blank CSV record; strict quoting, so an unterminated quote cannot
    silently swallow the rest of the file into one cell."""
    reader = csv.reader(handle, strict=True)
    while True:
        start = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            message = str(error)
            if "unexpected end of data" in message:
                message = "a quoted cell starting here is never closed (unterminated quote)"
            elif "NUL" in message:
                message = "contains a NUL byte (is it a binary file?)"
            raise InputError(f"{path}, line {start}: {message}; fix the CSV quoting.") from None
        if record:
            yield start, record


def csv_header(path: str | os.PathLike) -> list[str]:
    """The column names of a CSV file's header row."""
    path = Path(path)
    with _large_fields(), _text(path) as handle:
        for _, record in _records(path, handle):
            return record
    raise InputError(f"{path} is empty: expected a header row naming the columns, then one row per report.")


def iter_csv_rows(path: str | os.PathLike, columns: Sequence[str]) -> Iterator[dict[str, str | None]]:
    """`{column: cell}` for each data row of a CSV file with a header row; a cell missing from a short row
    is None.

    Raises:
        InputError: not UTF-8, no header, a wanted column missing or named twice, a row with more cells than
            the header, broken quoting, or a header but no rows.
    """
    path = Path(path)
    with _large_fields(), _text(path) as handle:
        records = _records(path, handle)
        header = next(records, (0, None))[1]
        if header is None:
            raise InputError(f"{path} is empty: expected a header row naming the columns, then one row per report.")
        missing = [name for name in columns if name not in header]
        if missing:
            raise InputError(f"{path} has no column(s) {missing}; its columns are {header}.")
        twice = [name for name in columns if header.count(name) > 1]
        if twice:
            raise InputError(f"{path}: the header names the column(s) {twice} more than once; rename them.")
        positions = {name: header.index(name) for name in columns}
        rows = 0
        for line, record in records:
            if len(record) > len(header):
                raise InputError(
                    f"{path}, line {line}: {len(record)} cells, but the header has {len(header)}; quote cells that "
                    "contain commas."
                )
            rows += 1
            yield {name: record[i] if i < len(record) else None for name, i in positions.items()}
        if not rows:
            raise InputError(f"{path} has a header row but no data rows.")


def _json_cell(value, path: Path, line: int, column: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    raise InputError(
        f"{path}, line {line}: {column!r} holds a JSON {type(value).__name__}, expected text (a string or number)."
    )


def iter_jsonl_rows(path: str | os.PathLike, columns: Sequence[str]) -> Iterator[dict[str, str | None]]:
    """`{column: value as text}` for each JSON object of a JSON-lines file (or of a `.json` file holding one
    array of objects); a key missing from an object is None, numbers become their JSON text.

    Raises:
        InputError: not UTF-8, a line that is not a JSON object, a wanted column absent from the first
            object, a nested value in a wanted column, or no objects at all.
    """
    path = Path(path)
    with _text(path) as handle:
        first = handle.read(1)
        while first.isspace():
            first = handle.read(1)
        handle.seek(0)
        if first == "[":  # a whole-file JSON array (a .json export), not JSON lines
            try:
                objects = json.load(handle)
            except json.JSONDecodeError as error:
                raise InputError(f"{path}, line {error.lineno}: not valid JSON ({error.msg}).") from None
            numbered = enumerate(objects, 1)
            where = "item"
        else:
            numbered = ((number, line) for number, line in enumerate(handle, 1) if line.strip())
            where = "line"
        rows = 0
        for number, item in numbered:
            if where == "line":
                try:
                    item = json.loads(item)
                except json.JSONDecodeError as error:
                    raise InputError(
                        f"{path}, line {number}: not valid JSON ({error.msg}); expected one object per line."
                    ) from None
            if not isinstance(item, dict):
                raise InputError(f"{path}, {where} {number}: expected a JSON object, got {type(item).__name__}.")
            if not rows:
                missing = [name for name in columns if name not in item]
                if missing:
                    raise InputError(
                        f"{path} has no column(s) {missing}; its first object has the keys {sorted(item)}."
                    )
            rows += 1
            yield {name: _json_cell(item.get(name), path, number, name) for name in columns}
        if not rows:
            raise InputError(f"{path} holds no JSON objects.")


def json_lines(lines: Iterable[str], source, keys: Sequence[str]) -> Iterator[tuple[int, dict]]:
    """`(line number, object)` for each non-blank line of JSON-lines text; a line that is not one JSON object is
    an `InputError` naming `source`, the line and the keys each line needs."""
    keys = tuple(keys)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(
                f"{source}, line {number}: not valid JSON ({error.msg}); "
                f"each line must be one object with keys {keys}."
            ) from None
        if not isinstance(record, dict):
            raise InputError(
                f"{source}, line {number}: expected a JSON object with keys {keys}, got {type(record).__name__}."
            )
        yield number, record


def read_text_lines(path: str | os.PathLike) -> list[str]:
    """The lines of a UTF-8 text file (BOM dropped), without line endings.

    Lines end at \\n, \\r\\n or \\r only: unlike `str.splitlines`, not at the other Unicode separators
    (U+2028, U+0085, ...), which a report pasted from elsewhere can contain.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    raw = path.read_bytes()
    # Not open(encoding="utf-8-sig"): its decoder silently drops a file's last bytes when they are the start of a
    # BOM (a file holding just b"\xef" reads as ""), so a truncated file would pass as an empty one.
    try:
        text = raw.removeprefix(codecs.BOM_UTF8).decode("utf-8")
    except UnicodeDecodeError:
        raise bad_utf8_error(path) from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines[-1] == "" else lines


@contextlib.contextmanager
def datasets_progress_bars_off() -> Iterator[None]:
    """Silence `datasets`' per-step progress bars inside the block (restoring them after), for steps whose
    progress a bar of our own already shows."""
    import datasets

    were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if were_on:
            datasets.enable_progress_bars()


def load_text_dataset(
    path: str | os.PathLike, column: str, id_column: str | None = None, extra_columns: Sequence[str] = ()
):
    """A CSV / parquet / JSON-lines file as a `datasets.Dataset` of its non-empty `column` cells.

    The rows are streamed into a `datasets` Arrow file (memory-mapped from its cache), so a collection
    larger than RAM can be embedded. CSV and JSON lines are read strictly (`llm2clip4cxr.data.tables`): UTF-8
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
