"""Retrieval evaluation: metrics with explicit ground truth and explicit duplicate-text rules."""

from pathlib import Path

from .metrics import (
    DUPLICATE_RULES,
    DuplicateResolution,
    first_relevant_ranks,
    metrics_from_ranks,
    normalize_report_text,
    ranking_metrics,
    relevant_with_duplicates,
    retrieval_metrics,
)
from .st_evaluator import findings_to_impression_evaluator


def report_retrieval_metric_path() -> Path:
    """Folder of the `evaluate` module with the retrieval metrics: `evaluate.load(str(path))` works offline."""
    return Path(__file__).resolve().parent / "report_retrieval"


__all__ = [
    "report_retrieval_metric_path",
    "DUPLICATE_RULES",
    "DuplicateResolution",
    "findings_to_impression_evaluator",
    "first_relevant_ranks",
    "metrics_from_ranks",
    "normalize_report_text",
    "ranking_metrics",
    "relevant_with_duplicates",
    "retrieval_metrics",
]
