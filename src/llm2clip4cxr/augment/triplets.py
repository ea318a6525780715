"""Training rows from report variants: (anchor, positive, hard negative) triplets and findings -> impression
pairs, built from reports with the generators of `variants`, or read from a JSON-lines file (LLM-made).

A report is a plain string or a row with `findings`/`impression` keys; every report draws from its own
seeded `Random`, so adding reports leaves the rows of earlier ones unchanged.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from ..data.tables import json_lines
from ..errors import InputError
from .variants import NEGATIVE_GENERATORS, POSITIVE_GENERATORS, _normalized, _select, make_hard_negative, make_positive

__all__ = [
    "build_equivalent_study_pairs",
    "build_section_pairs",
    "build_triplets",
    "load_triplets_jsonl",
    "report_sections",
    "report_triplet",
    "seeded_reports",
    "triplet_row",
]


def report_sections(item, index: int) -> tuple[str, str | None, str | None]:
    """(full text, findings, impression) of a plain string or a row with findings/impression keys."""
    if isinstance(item, str):
        return item.strip(), None, None
    if isinstance(item, Mapping):
        if "findings" not in item and "impression" not in item:
            raise ValueError(
                f"reports[{index}] has neither a 'findings' nor an 'impression' key; its keys are {sorted(item)}."
            )
        findings = (item.get("findings") or "").strip()
        impression = (item.get("impression") or "").strip()
        return " ".join(part for part in (findings, impression) if part), findings, impression
    raise TypeError(
        f"reports[{index}] must be a str or a mapping with 'findings'/'impression' keys, got {type(item).__name__}."
    )


def triplet_row(anchor: str, positive: str, negative: str, positive_kind: str, negative_kind: str) -> dict | None:
    texts = {_normalized(anchor), _normalized(positive), _normalized(negative)}
    if len(texts) < 3:
        return None
    return {
        "anchor": anchor,
        "positive": positive,
        "negative": negative,
        "positive_kind": positive_kind,
        "negative_kind": negative_kind,
    }


def seeded_reports(reports: Iterable, seed: int) -> Iterator[tuple[str, str | None, str | None, random.Random]]:
    """(full text, findings, impression, rng) of each non-empty report, its `Random` seeded by (seed, index), so
    that a report's rows do not depend on the reports before it."""
    for index, item in enumerate(reports):
        text, findings, impression = report_sections(item, index)
        if text:
            yield text, findings, impression, random.Random(f"{seed}:{index}")


def report_triplet(text: str, rng: random.Random, positive, negative, positive_kinds, negative_kinds) -> dict | None:
    """The triplet of one report from a positive and a negative generator (`make_positive`-like: report, rng,
    kinds -> (variant, kind) or None), the negative drawn first; None when either cannot be made or two of the
    three texts are the same."""
    hard_negative = negative(text, rng, negative_kinds)
    same = positive(text, rng, positive_kinds)
    if hard_negative is None or same is None:
        return None
    return triplet_row(text, same[0], hard_negative[0], same[1], hard_negative[1])


def build_triplets(
    reports: Iterable[str | Mapping[str, str]],
    seed: int = 0,
    *,
    section_pairs: bool = True,
    positive_kinds=None,
    negative_kinds=None,
) -> list[dict]:
    """Triplets {"anchor", "positive", "negative", "positive_kind", "negative_kind"} for contrastive training.

    Each report gives up to two triplets, both with a hard negative made from their anchor:
    the report with a generated positive, and (`section_pairs`, rows with both sections) the
    findings as anchor with the impression as positive ("findings_impression"). A report whose
    hard negative cannot be made gives none. Every report draws from its own `Random` seeded by
    (seed, index), so adding reports leaves earlier triplets unchanged.

    The *_kind columns are for analysis; drop them before handing the triplets to a
    sentence-transformers trainer, which treats every column as an input.
    """
    _select(POSITIVE_GENERATORS, positive_kinds, "positive_kinds")
    _select(NEGATIVE_GENERATORS, negative_kinds, "negative_kinds")
    triplets = []
    for text, findings, impression, rng in seeded_reports(reports, seed):
        triplet = report_triplet(text, rng, make_positive, make_hard_negative, positive_kinds, negative_kinds)
        if triplet is not None:
            triplets.append(triplet)
        if section_pairs and findings and impression:
            section_negative = make_hard_negative(findings, rng, negative_kinds)
            if section_negative is not None:
                negative, negative_kind = section_negative
                triplet = triplet_row(findings, impression, negative, "findings_impression", negative_kind)
                if triplet is not None:
                    triplets.append(triplet)
    return triplets


def build_section_pairs(reports: Iterable[Mapping[str, str]]) -> list[dict]:
    """{"anchor": findings, "positive": impression} for every row that has both sections.

    Real positives, written by the radiologist rather than by a rule: the impression restates the
    findings in other words. Identical pairs (template reports) are kept once.
    """
    pairs, seen = [], set()
    for index, item in enumerate(reports):
        _, findings, impression = report_sections(item, index)
        if findings and impression and _normalized(findings) != _normalized(impression):
            key = (_normalized(findings), _normalized(impression))
            if key not in seen:
                seen.add(key)
                pairs.append({"anchor": findings, "positive": impression})
    return pairs


def _label_set(value: str) -> frozenset[str]:
    """The labels of an Open-I MeSH/Problems cell ("Cardiomegaly/mild;Opacity"), case-folded; an unindexed
    study ("No Indexing", empty) has none and pairs with nothing."""
    labels = frozenset(label.strip().casefold() for label in (value or "").split(";") if label.strip())
    return frozenset() if labels == {"no indexing"} else labels


def build_equivalent_study_pairs(
    reports: Iterable[Mapping[str, str]], label_column: str = "MeSH", seed: int = 0
) -> list[dict]:
    """Pairs of *different* studies whose label sets are identical, per section: {"anchor": findings of A,
    "positive": findings of B, "label": group} and the same for impressions.

    Real clinically equivalent reports written in other words (one radiologist's "No acute cardiopulmonary
    abnormality." and another's "No active disease."), which no rule-based paraphrase generator produces.
    `label` numbers the label set: in-batch candidates of the anchor's own group are no negatives for it
    (see `llm2clip4cxr.training.text.contrastive_loss(equivalence_groups=True)`). Each study pairs once per
    section with the next study of its group (seeded order) whose text differs; groups of one are skipped.
    """
    groups: dict[frozenset[str], list[Mapping[str, str]]] = {}
    for index, row in enumerate(reports):
        if label_column not in row:
            raise InputError(
                f"reports[{index}] has no {label_column!r} column to group equivalent studies by; "
                f"its keys are {sorted(row)}."
            )
        labels = _label_set(row[label_column])
        if labels:
            groups.setdefault(labels, []).append(row)
    rng = random.Random(seed)
    pairs, seen = [], set()
    for group, key in enumerate(sorted(groups, key=sorted)):
        members = groups[key][:]
        rng.shuffle(members)
        for section in ("findings", "impression"):
            texts = [(row.get(section) or "").strip() for row in members]
            for position, text in enumerate(texts):
                following = texts[position + 1:] + texts[:position]
                partner = next((other for other in following if other and _normalized(other) != _normalized(text)),
                               None)
                if not text or partner is None:
                    continue
                pair_key = frozenset((_normalized(text), _normalized(partner)))
                if pair_key not in seen:
                    seen.add(pair_key)
                    pairs.append({"anchor": text, "positive": partner, "label": group})
    return pairs


_TRIPLET_KEYS = ("anchor", "positive", "negative")


def load_triplets_jsonl(path) -> list[dict]:
    """Triplets from a JSONL file of LLM-made paraphrases and errors, one JSON object per line.

    Each line needs non-empty string values for "anchor", "positive" and "negative"; optional
    "positive_kind"/"negative_kind" default to "llm_paraphrase"/"llm_error". Raises a ValueError
    naming the line for invalid JSON or a missing or empty key. Lines whose positive or negative
    equals the anchor are dropped with a warning, like any variant that does not change the text.
    """
    path = Path(path)
    triplets, unchanged = [], []
    with path.open(encoding="utf-8") as handle:
        for line_number, record in json_lines(handle, path, _TRIPLET_KEYS):
            where = f"{path}, line {line_number}"
            missing = [key for key in _TRIPLET_KEYS if key not in record]
            if missing:
                raise ValueError(f"{where}: missing key(s) {missing}; each line needs {_TRIPLET_KEYS}.")
            for key in (*_TRIPLET_KEYS, "positive_kind", "negative_kind"):
                value = record.get(key, "default")
                if not isinstance(value, str) or not value.strip():
                    raise ValueError(f"{where}: '{key}' must be a non-empty string, got {value!r}.")
            anchor = _normalized(record["anchor"])
            if anchor in (_normalized(record["positive"]), _normalized(record["negative"])):
                unchanged.append(line_number)
                continue
            triplets.append(
                {
                    "anchor": record["anchor"],
                    "positive": record["positive"],
                    "negative": record["negative"],
                    "positive_kind": record.get("positive_kind", "llm_paraphrase"),
                    "negative_kind": record.get("negative_kind", "llm_error"),
                }
            )
    if unchanged:
        warnings.warn(
            f"{path}: dropped {len(unchanged)} line(s) whose positive or negative equals the anchor "
            f"(lines {unchanged[:10]}{' ...' if len(unchanged) > 10 else ''}).",
            stacklevel=2,
        )
    return triplets
