"""Report tables: reading the Open-I reports shipped beside the project and user CSV files."""

import csv
import os
from contextlib import contextmanager
from pathlib import Path

# ../shared/data relative to the project root, as laid out for development and CI.
_DEFAULT_SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@contextmanager
def datasets_progress_bars_off():
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


def shared_data_dir() -> Path:
    """The folder of real CXR data (`$LLM2CLIP4CXR_DATA`, else ../shared/data beside the project)."""
    path = Path(os.environ.get("LLM2CLIP4CXR_DATA", _DEFAULT_SHARED_DATA))
    if not path.is_dir():
        raise FileNotFoundError(
            f"No CXR data folder at {path}. Set LLM2CLIP4CXR_DATA to the folder holding openi/reports.csv."
        )
    return path


def read_reports_csv(path, text_columns=("findings", "impression"), id_column: str = "uid") -> list[dict]:
    """Rows of a report CSV as dicts; rows whose text columns are all empty are skipped.

    Raises a ValueError naming the missing columns when the CSV lacks any of them.
    """
    from .errors import InputError
    from .tables import bad_utf8_error

    path = Path(path)
    try:  # utf-8-sig: a BOM written by Excel is not part of the first column's name
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, strict=True)
            wanted = dict.fromkeys((id_column, *text_columns))  # ordered, without repeats
            missing = [column for column in wanted if column not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{path} has no column(s) {missing}; its columns are {reader.fieldnames}.")
            rows = []
            for row in reader:
                if any((row.get(column) or "").strip() for column in text_columns):
                    rows.append({key: (value or "").strip() for key, value in row.items() if key is not None})
    except UnicodeDecodeError:
        raise bad_utf8_error(path) from None
    except csv.Error as error:
        raise InputError(f"{path}, line {reader.line_num}: {error}; fix the CSV quoting.") from None
    return rows


def openi_report_texts(path=None) -> list[str]:
    """Report texts of Open-I (`findings` + `impression` joined), in file order."""
    path = Path(path) if path is not None else shared_data_dir() / "openi" / "reports.csv"
    texts = []
    for row in read_reports_csv(path):
        texts.append(" ".join(part for part in (row["findings"], row["impression"]) if part))
    return texts


# The split of the shipped default text encoder (training/make_default_text_encoder.py).
DEFAULT_VALIDATION_FRACTION = 0.1
DEFAULT_SPLIT_SEED = 0


def split_by_study(rows: list[dict], fraction: float = DEFAULT_VALIDATION_FRACTION, seed: int = DEFAULT_SPLIT_SEED):
    """(train, held_out) rows: whole studies are held out, so no report text crosses the split.

    With the defaults this is the split the shipped default encoder was trained on (its 90%) and
    validated on (the 10%), for the Open-I reports in file order.
    """
    import torch

    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"`fraction` must be in [0, 1), got {fraction}.")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=generator).tolist()
    held_out = set(order[: int(round(fraction * len(rows)))])
    return [row for i, row in enumerate(rows) if i not in held_out], [row for i, row in enumerate(rows) if i in held_out]


def load_prepared(path, split: str = "train", streaming: bool = False, image_root=None):
    """A split of a folder written by `llm2clip4cxr prepare` as a `datasets.Dataset` (or, with
    `streaming=True`, an `IterableDataset` that reads the parquet shards lazily, for large corpora).

    Image paths (`image`, or `images` in per-study datasets) come back absolute: relative to the prepared
    folder for resized images, else to the source folder recorded at prepare time (`image_root` overrides
    it, e.g. after the source folder moved).

    Raises:
        FileNotFoundError: `path` is not a completely prepared folder.
        ValueError: the folder has no rows in `split` (the message lists the splits it has).
    """
    import json

    import datasets

    from .prepare import MANIFEST, SUMMARY

    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"{path}: not a prepared dataset folder (no {MANIFEST}); run `llm2clip4cxr prepare`.")
    if not (path / SUMMARY).is_file():
        raise FileNotFoundError(f"{path}: its prepare run did not finish (no {SUMMARY}); rerun the same "
                                "`llm2clip4cxr prepare` command to resume it.")
    manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    files = sorted(str(file) for file in (path / "data").glob(f"{split}-*.parquet"))
    if not files:
        rows = json.loads((path / SUMMARY).read_text(encoding="utf-8"))["rows"]
        raise ValueError(f"{path} has no rows in split {split!r}; its rows per split: {rows}.")
    dataset = datasets.load_dataset("parquet", data_files={split: files}, split=split, streaming=streaming)
    base = path.resolve() if manifest["image_root"] == "." else Path(manifest["image_root"])
    base = str(Path(image_root).resolve() if image_root is not None else base)
    if "image" in dataset.column_names:
        return dataset.map(lambda batch: {"image": [os.path.join(base, p) for p in batch["image"]]}, batched=True)
    if "images" in dataset.column_names:
        return dataset.map(
            lambda batch: {"images": [[os.path.join(base, p) for p in ps] for ps in batch["images"]]}, batched=True
        )
    return dataset
