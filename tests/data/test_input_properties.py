"""Property-based tests of the readers of user files (CSV, JSON lines, text): a well-formed file in any
encoding detail (BOM, line endings, quotes, commas and newlines in cells, blank and huge cells, any
unicode) is read exactly; any damage to it ends in a result or in one `InputError`, never a traceback."""

import csv
import io
import json
import tempfile
from pathlib import Path

import datasets
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llm2clip4cxr.data import load_text_dataset
from llm2clip4cxr.data.tables import read_text_lines
from llm2clip4cxr.errors import InputError

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
BOM = "\ufeff".encode()

# Cells: anything a report or an id could hold, with the characters that stress CSV quoting well represented.
cell = st.one_of(
    st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), max_size=30),
    st.text(st.sampled_from(list(' ,"\n\r\t;\'\u00e9\u4e2d\U0001f600')), max_size=12),
    st.just(""), st.just("   "),
)
huge_cell = st.integers(131_073, 140_000).map(lambda n: "x" * n)  # over the csv module's default field limit
damage = st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(
    [b'"', b",", b"\n", b"\r", b"\xff", b"\xc3", b"\x00", BOM, b"{", b"}", b"[", b"\\", b"null", b""]
)), min_size=1, max_size=4)


_FILES = []  # the folder the examples' files go to, set by the fixture below


@pytest.fixture(scope="module", autouse=True)
def private_folders(tmp_path_factory):
    """Each example writes a file and builds an Arrow file in the datasets cache: keep both in pytest's
    temporary folders, out of the user's cache."""
    _FILES.append(tmp_path_factory.mktemp("inputs"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets-cache")))
        yield
    _FILES.pop()


def write(suffix: str, data: bytes) -> Path:
    folder = Path(tempfile.mkdtemp(dir=_FILES[-1]))
    path = folder / f"table{suffix}"
    path.write_bytes(data)
    return path


def expected_rows(rows):
    """What load_text_dataset must return: rows with non-blank text, in order."""
    return [{"id": uid, "text": text, "view": view} for uid, text, view in rows if text.strip()]


def load_or_input_error(path: Path, *args, **kwargs):
    """The rows, or None after an InputError; any other exception fails the test."""
    try:
        return load_text_dataset(path, *args, **kwargs).to_list()
    except InputError as error:
        assert str(path) in str(error) or "extra column" in str(error)  # the message names the file
        return None


def csv_bytes(
    rows, header=("uid", "findings", "view"), terminator="\r\n", bom=False, quoting=csv.QUOTE_MINIMAL
) -> bytes:
    buffer = io.StringIO(newline="")
    csv.writer(buffer, lineterminator=terminator, quoting=quoting).writerows([header, *rows])
    return (BOM if bom else b"") + buffer.getvalue().encode("utf-8")


# (line terminator, quoting) of well-formed files. Not ("\n", QUOTE_MINIMAL): the csv module then leaves a
# cell holding a bare "\r" unquoted, which every reader takes for a line break (RFC 4180 requires the quotes).
DIALECTS = st.sampled_from([("\r\n", csv.QUOTE_MINIMAL), ("\r\n", csv.QUOTE_ALL), ("\n", csv.QUOTE_ALL)])


def apply(data: bytes, edits) -> bytes:
    for at, insert in edits:
        at %= len(data) + 1
        data = data[:at] + insert + data[at + (1 if not insert else 0):]  # an empty insert deletes a byte
    return data


rows_strategy = st.lists(
    st.tuples(st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), min_size=1, max_size=8)
              .filter(str.strip), cell, cell),
    max_size=6, unique_by=lambda row: row[0],
)


@SETTINGS
@given(rows=rows_strategy, dialect=DIALECTS, bom=st.booleans())
def test_a_well_formed_csv_is_read_exactly(rows, dialect, bom):
    path = write(".csv", csv_bytes(rows, terminator=dialect[0], quoting=dialect[1], bom=bom))
    result = load_or_input_error(path, "findings", "uid", extra_columns=["view"])
    expected = expected_rows(rows)
    if not rows or not expected:
        assert result is None  # a header without rows, or no text at all: one clear error
    else:
        assert result == expected


@settings(max_examples=3, deadline=None)
@given(text=huge_cell)
def test_a_csv_cell_longer_than_the_csv_modules_default_limit_is_read(text):
    path = write(".csv", csv_bytes([("r1", text, "PA")]))
    assert load_text_dataset(path, "findings", "uid")["text"] == [text]


@SETTINGS
@given(rows=rows_strategy.filter(bool), edits=damage, bom=st.booleans())
def test_a_damaged_csv_is_read_or_refused_in_one_clear_error(rows, edits, bom):
    data = apply(csv_bytes(rows, bom=bom), edits)
    result = load_or_input_error(write(".csv", data), "findings", "uid", extra_columns=["view"])
    if result is not None:
        assert all(set(row) == {"id", "text", "view"} and row["text"].strip() for row in result)


json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                        st.floats(allow_nan=False, allow_infinity=False), cell)
json_value = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=5)


@SETTINGS
@given(
    records=st.lists(st.fixed_dictionaries({"uid": st.text(min_size=1, max_size=8).filter(str.strip),
                                            "findings": st.one_of(cell, st.none(), st.integers(0, 99))},
                                           optional={"other": json_value}),
                     max_size=6, unique_by=lambda record: record["uid"]),
    separator=st.sampled_from(["\n", "\r\n", "\n\n"]), bom=st.booleans(), ascii_only=st.booleans(),
)
def test_well_formed_json_lines_are_read_exactly(records, separator, bom, ascii_only):
    data = separator.join(json.dumps(record, ensure_ascii=ascii_only) for record in records)
    path = write(".jsonl", (BOM if bom else b"") + data.encode("utf-8"))
    result = load_or_input_error(path, "findings", "uid")
    texts = [(r["uid"], r["findings"] if isinstance(r["findings"], str) or r["findings"] is None
              else json.dumps(r["findings"])) for r in records]
    expected = [{"id": uid, "text": text} for uid, text in texts if text is not None and text.strip()]
    assert result == (expected or None)


@SETTINGS
@given(records=st.lists(st.dictionaries(st.sampled_from(["uid", "findings", "x"]), json_value, min_size=1),
                        min_size=1, max_size=5),
       edits=damage)
def test_damaged_json_lines_are_read_or_refused_in_one_clear_error(records, edits):
    data = apply("\n".join(json.dumps(record) for record in records).encode(), edits)
    result = load_or_input_error(write(".jsonl", data), "findings", "uid")
    if result is not None:
        assert all(set(row) == {"id", "text"} and row["text"].strip() for row in result)


def lines_of(text: str) -> list[str]:
    """Lines as `read_text_lines` defines them: split at \\n, \\r\\n or \\r (not at other Unicode separators,
    which can occur inside a report), without a final empty line."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines[-1] == "" else lines


@SETTINGS
@given(text=st.text(st.characters(exclude_categories=("Cs",))), bom=st.booleans(), edits=st.none() | damage)
@example(text="", bom=True, edits=[(1, b""), (1, b"")])  # a BOM cut to its first byte: not UTF-8, not an empty file
def test_text_files_are_read_as_lines_or_refused(text, bom, edits):
    data = (BOM if bom else b"") + text.encode("utf-8")
    if edits is None:
        # One leading BOM is an encoding mark, not text.
        assert read_text_lines(write(".txt", data)) == lines_of(text if bom else text.removeprefix("\ufeff"))
        return
    data = apply(data, edits)
    path = write(".txt", data)
    try:
        lines = read_text_lines(path)
    except InputError as error:
        assert str(path) in str(error) and "not UTF-8" in str(error)
    else:
        assert lines == lines_of(data.decode("utf-8").removeprefix("\ufeff"))
