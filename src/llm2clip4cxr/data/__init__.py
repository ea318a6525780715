"""Reading data: report tables and CSV/JSON-lines files (`reports`, `tables`), downloaded corpora and their
report sections (`corpora`, `sections`), `prepare` (a corpus folder -> split, checked parquet shards) and
chest X-ray images (`imaging`).

The functions most scripts need are importable from here; `imaging` (which imports torch) is not, so that
reading a CSV stays light.
"""

from .prepare import load_prepared
from .reports import (
    DEFAULT_SPLIT_SEED,
    DEFAULT_VALIDATION_FRACTION,
    openi_report_texts,
    read_reports_csv,
    split_by_study,
)
from .tables import load_text_dataset

__all__ = [
    "DEFAULT_SPLIT_SEED",
    "DEFAULT_VALIDATION_FRACTION",
    "load_prepared",
    "load_text_dataset",
    "openi_report_texts",
    "read_reports_csv",
    "split_by_study",
]
