"""Report CSV files: the rows of a report table (the Open-I `reports.csv` or your own) and the study-level split
the shipped default encoder was trained on."""

import csv
from pathlib import Path

from ..defaults import shared_data_dir
from ..errors import InputError
from .tables import bad_utf8_error


def read_reports_csv(path, text_columns=("findings", "impression"), id_column: str = "uid") -> list[dict]:
    """Rows of a report CSV as dicts; rows whose text columns are all empty are skipped.

    Raises a ValueError naming the missing columns when the CSV lacks any of them.
    """
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
    return [row for i, row in enumerate(rows) if i not in held_out], [
        row for i, row in enumerate(rows) if i in held_out
    ]
