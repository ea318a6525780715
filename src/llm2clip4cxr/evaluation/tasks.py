"""Report-level evaluation tasks (Ko et al. 2025) and the text models they compare.

A *model* is either
    an Encoder: a callable `texts -> (n, d) float32 array` of L2-normalised embeddings (LLM2Vec4CXR
        models through `retrieval.encoders.llm2vec_encoder`, and the `baselines`: sentence-transformers
        models, TF-IDF, the text towers of CLIP-style models), scored by cosine similarity; or
    a Scorer: an object with `score(queries, corpus) -> (len(queries), len(corpus)) array`, for
        baselines that are not embedding models (BM25 scores a query against an indexed corpus).
Every task scores through `score_matrix`, so both kinds are evaluated by the same code.

Tasks:
    findings_to_impression_retrieval: each study's findings retrieves its own impression among the
        impressions (R@K, MRR, ranks). Many impressions are word-for-word identical ("No acute
        cardiopulmonary disease."): by default (`duplicate_rule="collapse"`, the strict headline) they are
        collapsed into one corpus entry, so each query has exactly one relevant target among unique
        impressions; "count_as_relevant" (the LLM2Vec4CXR authors' script) keeps every copy in the corpus
        and counts each as a hit, which flatters a model that ranks common normal impressions first.
    paraphrase_retrieval: a clinically-equivalent variant of each report, made by the HELD-OUT variant
        families (`heldout_variants`, never used for training), retrieves its original among all originals
        (R@K, MRR; identical originals count as relevant).
    error_discrimination: for (anchor, clinically-equivalent positive, clinically-wrong negative)
        triplets, by default made by the held-out families, the fraction where the anchor is closer to the
        positive (chance: 0.5; ties count as failures).
    clinical_ordering: the same test on the hand-written clinical ordering suite
        (`resources/clinical_ordering.jsonl`, see `load_clinical_ordering_suite`), per category.
    embedding_spread: how collapsed an embedding space is: mean pairwise cosine of (up to) 1,000 random
        reports, and for findings->impression queries the mean top-1 score, median score and their gap.
    zero_shot_label_auroc: report-level zero-shot classification. Per label, AUROC of
        cosine(report, label prompt) against the report's labels, and F1 of the fixed rule
        "cosine(report, label prompt) > cosine(report, normal prompt)" (no threshold is tuned on the
        evaluated data). Macro means over the labels that have both positive and negative reports.

Input formats (bring your own data in these):
    Report CSV (UTF-8, header row; the Open-I `openi/reports.csv` is one): `uid` (unique study id),
        `findings`, `impression` (either may be empty; rows with both empty are skipped) and, for
        zero-shot labels, `Problems`: labels separated by ";" (Open-I MeSH-style "Problems"; the
        value "normal" means no abnormality). Other columns are ignored. Read with
        `data.read_reports_csv`; the report text of a row is findings + " " + impression.
    Triplet JSONL (optional, replaces the generated error-discrimination triplets): one object per
        line with "anchor", "positive", "negative" strings; read with
        `augment.triplets.load_triplets_jsonl`.
    Label prompts JSON (optional): an object {label: prompt}, labels spelt as in `Problems`;
        default `DEFAULT_LABEL_PROMPTS`. The normal prompt is `DEFAULT_NORMAL_PROMPT`.
"""

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from ..retrieval.encoders import Encoder
from .metrics import (
    first_relevant_ranks,
    metrics_from_ranks,
    normalize_report_text,
    relevant_with_duplicates,
    retrieval_metrics,
)


@runtime_checkable
class Scorer(Protocol):
    """A model that scores queries against a corpus directly, with no embeddings (e.g. BM25)."""

    def score(self, queries: Sequence[str], corpus: Sequence[str]) -> np.ndarray:
        """`(len(queries), len(corpus))` similarities, higher is better."""


Model = Encoder | Scorer


def score_matrix(model: Model, queries: Sequence[str], corpus: Sequence[str]) -> np.ndarray:
    """`(len(queries), len(corpus))` float32 similarities: `model.score` for a Scorer, cosine for an Encoder."""
    queries, corpus = list(queries), list(corpus)
    if isinstance(model, Scorer):
        scores = np.asarray(model.score(queries, corpus), dtype=np.float32)
    elif callable(model):
        scores = model(queries) @ model(corpus).T
    else:
        raise TypeError(
            f"A model must be an Encoder (callable) or a Scorer (with .score), got {type(model).__name__}."
        )
    if scores.shape != (len(queries), len(corpus)):
        raise ValueError(f"The model returned scores of shape {scores.shape}, expected {(len(queries), len(corpus))}.")
    return scores


def studies_with_findings_and_impression(studies: Sequence[dict]) -> tuple[list[dict], list[str]]:
    """(studies having both sections, their `uid`s as strings); raises ValueError if none or uids repeat."""
    studies = [study for study in studies if study.get("findings") and study.get("impression")]
    if not studies:
        raise ValueError("No study has both findings and impression.")
    ids = [str(study["uid"]) for study in studies]
    if len(set(ids)) != len(ids):
        raise ValueError("Study `uid`s must be unique.")
    return studies, ids


def findings_to_impression_retrieval(
    encoder: Model, studies: Sequence[dict], duplicate_rule: str = "collapse", ks=(1, 5, 10), also_rules=()
) -> dict[str, float]:
    """Retrieve each study's impression from its findings. `studies`: dicts with `uid`, `findings`,
    `impression` (studies missing either are skipped). `duplicate_rule`: see the module docstring; the
    result names it and the number of corpus entries. Each rule of `also_rules` adds its recall@K and MRR
    under its own key, scored from the same similarity matrix (the model encodes the texts once)."""
    studies, ids = studies_with_findings_and_impression(studies)
    queries = {uid: study["findings"] for uid, study in zip(ids, studies)}
    corpus = {uid: study["impression"] for uid, study in zip(ids, studies)}
    scores = score_matrix(encoder, list(queries.values()), list(corpus.values()))

    def ranks_under(rule):
        resolution = relevant_with_duplicates(queries, corpus, {uid: {uid} for uid in ids}, rule)
        ranks = first_relevant_ranks(resolution.select(scores), ids, resolution.corpus_ids, resolution.relevant)
        return ranks, len(resolution.corpus_ids)

    ranks, num_corpus = ranks_under(duplicate_rule)
    metrics = metrics_from_ranks(ranks, ks)
    metrics["num_queries"] = len(ids)
    metrics["num_corpus"] = num_corpus
    metrics["duplicate_rule"] = duplicate_rule
    # The queries whose impression no other study shares: mostly abnormal studies, where the impression
    # restates specific findings. A model that only learned to put common normal impressions first scores
    # well overall and poorly here.
    counts = Counter(normalize_report_text(study["impression"]) for study in studies)
    unique = np.array([counts[normalize_report_text(study["impression"])] == 1 for study in studies])
    if unique.any():
        metrics["unique_impressions"] = {**metrics_from_ranks(ranks[unique], ks), "num_queries": int(unique.sum())}
    for rule in also_rules:
        other = metrics_from_ranks(ranks_under(rule)[0], ks)
        metrics[rule] = {key: other[key] for key in (*(f"recall@{k}" for k in ks), "mrr")}
    return metrics


def _prefers_positive(encoder: Model, triplets: Sequence[dict]) -> np.ndarray:
    """Per triplet, whether the anchor scores strictly higher with the positive than with the negative."""
    if not triplets:
        raise ValueError("No triplets to score.")
    anchors = [triplet["anchor"] for triplet in triplets]
    positives = [triplet["positive"] for triplet in triplets]
    negatives = [triplet["negative"] for triplet in triplets]
    if isinstance(encoder, Scorer):
        # One corpus of all positives and negatives, so both sides share the scorer's corpus statistics.
        scores = score_matrix(encoder, anchors, positives + negatives)
        rows = np.arange(len(anchors))
        positive, negative = scores[rows, rows], scores[rows, rows + len(anchors)]
    else:
        embedded = encoder(anchors)
        positive = np.sum(embedded * encoder(positives), axis=1)
        negative = np.sum(embedded * encoder(negatives), axis=1)
    return positive > negative


def error_discrimination(encoder: Model, triplets: Sequence[dict]) -> dict[str, float]:
    """Accuracy of preferring the clinically-equivalent positive over the clinically-wrong negative."""
    return {"accuracy": float(np.mean(_prefers_positive(encoder, triplets))), "chance": 0.5,
            "num_triplets": len(triplets)}


def paraphrase_retrieval(
    encoder: Model, reports: Mapping[str, str] | Sequence[str], seed: int = 0, ks=(1, 5, 10), families="heldout"
) -> dict[str, float]:
    """A clinically-equivalent variant of each report retrieves its original among all originals.

    Args:
        encoder: an Encoder or a Scorer.
        reports: id -> report text (a list is keyed by position). Every report is in the corpus;
            reports that no positive generator changes get no query.
        seed: variants are drawn with `random.Random(f"{seed}:{id}")` per report, so a report's query
            does not depend on the others.
        families: "heldout" (default): the evaluation-only families of `heldout_variants`; "training": the
            rule families models are trained on (`augment.variants.make_positive`), which measures rule
            learning rather than generalisation and is kept only for comparison.

    Returns:
        `retrieval_metrics` keys plus `num_queries`, `num_corpus` and `families` (the generator families
        used). Identical originals (after `normalize_report_text`) all count as relevant.
    """
    if families == "heldout":
        from .heldout_variants import make_heldout_positive as make_positive
    elif families == "training":
        from ..augment.variants import make_positive
    else:
        raise ValueError(f"`families` must be 'heldout' or 'training', got {families!r}.")

    corpus = _id_texts(reports)
    queries, used = {}, set()
    for report_id, text in corpus.items():
        variant = make_positive(text, random.Random(f"{seed}:{report_id}"))
        if variant is not None:
            queries[report_id] = variant[0]
            used.add(variant[1])
    if not queries:
        raise ValueError("No report could be paraphrased (make_positive changed none of them); nothing to retrieve.")
    resolution = relevant_with_duplicates(queries, corpus, {uid: {uid} for uid in queries}, "count_as_relevant")
    scores = score_matrix(encoder, list(queries.values()), list(corpus.values()))
    metrics = retrieval_metrics(
        resolution.select(scores), list(queries), resolution.corpus_ids, resolution.relevant, ks=ks
    )
    metrics["num_queries"], metrics["num_corpus"] = len(queries), len(corpus)
    metrics["families"] = sorted(used)
    return metrics


CLINICAL_ORDERING_RESOURCE = "resources/clinical_ordering.jsonl"
_ORDERING_KEYS = ("category", "query", "equivalent", "different")


def load_clinical_ordering_suite(path=None) -> list[dict]:
    """The clinical ordering suite: hand-written (query, clinically equivalent, clinically different) triplets.

    Format (JSONL, UTF-8, one object per line; add your own file in the same format): `category` (any
    name; the shipped suite uses normal_paraphrase, negation, laterality, severity_size, change_over_time,
    devices_lines), `query`, `equivalent` (the same clinical findings written differently), `different`
    (one clinically meaningful change), and an optional free-text `note`. Blank lines are skipped.
    `path=None` reads the suite shipped in the package. Raises ValueError naming the file and line of a
    malformed row.
    """
    if path is None:
        import importlib.resources

        text = importlib.resources.files("llm2clip4cxr").joinpath(CLINICAL_ORDERING_RESOURCE).read_text("utf-8")
        source = f"llm2clip4cxr/{CLINICAL_ORDERING_RESOURCE}"
    else:
        from pathlib import Path

        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{source}: not UTF-8 text ({error.reason} at byte {error.start}).") from None
    from ..data.tables import json_lines

    rows = []
    for line_number, row in json_lines(text.splitlines(), source, _ORDERING_KEYS):
        where = f"{source}, line {line_number}"
        for key in _ORDERING_KEYS:
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"{where}: '{key}' must be a non-empty string; each row needs {_ORDERING_KEYS}.")
        rows.append({key: row[key] for key in (*_ORDERING_KEYS, "note") if key in row})
    if not rows:
        raise ValueError(f"{source}: no triplets.")
    return rows


def clinical_ordering(encoder: Model, suite: Sequence[dict]) -> dict:
    """Accuracy of ranking `equivalent` above `different` for each `query` of a clinical ordering suite,
    overall and per category (chance 0.5; a tie counts as a failure)."""
    triplets = [{"anchor": row["query"], "positive": row["equivalent"], "negative": row["different"]} for row in suite]
    correct = _prefers_positive(encoder, triplets)
    per_category: dict[str, list[bool]] = {}
    for row, ok in zip(suite, correct):
        per_category.setdefault(row["category"], []).append(bool(ok))
    return {
        "accuracy": float(np.mean(correct)),
        "chance": 0.5,
        "num_triplets": len(suite),
        "per_category": {
            name: {"accuracy": float(np.mean(values)), "num_triplets": len(values)}
            for name, values in sorted(per_category.items())
        },
    }


def embedding_spread(encoder: Model, reports: Sequence[str], studies: Sequence[dict], seed: int = 0,
                     sample_size: int = 1000) -> dict:
    """Collapse/anisotropy figures of an Encoder: mean pairwise cosine of up to `sample_size` random reports
    (near 1: everything looks alike), and, over the findings->impression queries, the mean top-1 cosine, the
    mean median cosine and the mean gap between them (small: the ranking hangs on tiny differences).
    A Scorer (no embedding space) gets only the score gap."""
    rng = np.random.default_rng(seed)
    reports = list(reports)
    chosen = [reports[i] for i in sorted(rng.choice(len(reports), min(sample_size, len(reports)), replace=False))]
    result = {}
    if not isinstance(encoder, Scorer):
        embedded = np.asarray(encoder(chosen), dtype=np.float64)
        gram = embedded @ embedded.T
        n = len(chosen)
        result["mean_pairwise_cosine"] = float((gram.sum() - np.trace(gram)) / max(n * (n - 1), 1))
        result["num_reports"] = n
    studies, _ = studies_with_findings_and_impression(studies)
    scores = score_matrix(encoder, [s["findings"] for s in studies], [s["impression"] for s in studies])
    top1, median = scores.max(axis=1), np.median(scores, axis=1)
    result.update({"mean_top1_score": float(top1.mean()), "mean_median_score": float(median.mean()),
                   "mean_top1_minus_median": float((top1 - median).mean())})
    return result


# Open-I `Problems` labels with at least ~80 reports, each with a short positive statement.
DEFAULT_LABEL_PROMPTS = {
    "Cardiomegaly": "The heart is enlarged.",
    "Pulmonary Atelectasis": "There is atelectasis.",
    "Opacity": "There is a lung opacity.",
    "Calcified Granuloma": "There is a calcified granuloma.",
    "Pleural Effusion": "There is a pleural effusion.",
    "Atherosclerosis": "The aorta is atherosclerotic.",
    "Airspace Disease": "There is airspace disease.",
    "Nodule": "There is a pulmonary nodule.",
    "Scoliosis": "There is scoliosis of the spine.",
    "Catheters, Indwelling": "A catheter is in place.",
}
DEFAULT_NORMAL_PROMPT = "No acute cardiopulmonary abnormality."


def parse_problems(value: str) -> set[str]:
    """Labels of an Open-I `Problems` cell ("Cardiomegaly;Opacity"); "normal" and empty give no label."""
    labels = {label.strip() for label in (value or "").split(";")}
    return {label for label in labels if label and label.casefold() != "normal"}


def zero_shot_label_auroc(
    encoder: Model,
    reports: Mapping[str, str],
    labels: Mapping[str, set[str]],
    label_prompts: Mapping[str, str] | None = None,
    normal_prompt: str = DEFAULT_NORMAL_PROMPT,
) -> dict:
    """Zero-shot report classification: is each label's prompt closer to the report than the normal prompt?

    Args:
        encoder: an Encoder or a Scorer (scores reports against the prompts as a corpus).
        reports: id -> report text.
        labels: id -> set of labels of that report (ids missing here have no label).
        label_prompts: label -> prompt (default `DEFAULT_LABEL_PROMPTS`).
        normal_prompt: the reference prompt of the fixed decision rule.

    Returns:
        `{"macro_auroc", "macro_f1", "num_reports", "num_labels", "per_label": {label: {"auroc", "f1",
        "num_positive"}}, "skipped_labels": [...]}`. AUROC ranks reports by cosine(report, prompt);
        F1 predicts the label when cosine(report, prompt) > cosine(report, normal prompt), a rule fixed
        in advance rather than a threshold tuned on these reports (which would inflate F1). Labels
        with no positive or no negative report have no AUROC and are listed in `skipped_labels`.
    """
    try:
        from sklearn.metrics import f1_score, roc_auc_score
    except ImportError as error:
        raise ImportError('Zero-shot AUROC needs `pip install "llm2clip4cxr[eval]"` (scikit-learn).') from error
    label_prompts = dict(DEFAULT_LABEL_PROMPTS if label_prompts is None else label_prompts)
    if not label_prompts:
        raise ValueError("`label_prompts` is empty; give at least one {label: prompt}.")
    reports = _id_texts(reports)
    names = list(label_prompts)
    scores = score_matrix(encoder, list(reports.values()), [label_prompts[name] for name in names] + [normal_prompt])
    per_label, skipped = {}, []
    for j, name in enumerate(names):
        truth = np.array([name in labels.get(report_id, ()) for report_id in reports])
        if truth.all() or not truth.any():
            skipped.append(name)
            continue
        per_label[name] = {
            "auroc": float(roc_auc_score(truth, scores[:, j])),
            "f1": float(f1_score(truth, scores[:, j] > scores[:, -1], zero_division=0.0)),
            "num_positive": int(truth.sum()),
        }
    if not per_label:
        raise ValueError(f"No label of {names} has both positive and negative reports among the {len(reports)} given.")
    return {
        "macro_auroc": float(np.mean([result["auroc"] for result in per_label.values()])),
        "macro_f1": float(np.mean([result["f1"] for result in per_label.values()])),
        "num_reports": len(reports),
        "num_labels": len(per_label),
        "per_label": per_label,
        "skipped_labels": skipped,
    }


def _id_texts(reports: Mapping[str, str] | Sequence[str]) -> dict[str, str]:
    if isinstance(reports, Mapping):
        texts = {str(report_id): text for report_id, text in reports.items()}
    elif isinstance(reports, Sequence) and not isinstance(reports, str):
        texts = {str(i): text for i, text in enumerate(reports)}
    else:
        raise TypeError(f"`reports` must be a mapping id -> text or a list of texts, got {type(reports).__name__}.")
    empty = next(
        (report_id for report_id, text in texts.items() if not isinstance(text, str) or not text.strip()), None
    )
    if empty is not None:
        raise ValueError(f"Report {empty!r} is empty or not a string; drop it before evaluating.")
    if not texts:
        raise ValueError("`reports` is empty.")
    return texts
