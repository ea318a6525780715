"""Retrieval evaluation: metrics with explicit ground truth and explicit duplicate-text rules."""

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

__all__ = [
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
