"""Retrieval metrics on hand-sized matrices; every expected number is worked out in the comments."""

import numpy as np
import pytest

from llm2clip4cxr.evaluation import (
    first_relevant_ranks,
    metrics_from_ranks,
    normalize_report_text,
    ranking_metrics,
    relevant_with_duplicates,
    retrieval_metrics,
)

CORPUS = ["c0", "c1", "c2", "c3"]


def test_non_diagonal_ground_truth():
    scores = np.array(
        [
            [0.1, 0.9, 0.3, 0.2],  # q0 -> c2 (0.3); c1 beats it -> rank 2
            [0.8, 0.1, 0.2, 0.5],  # q1 -> c0 (0.8), the top score -> rank 1
            [0.4, 0.6, 0.5, 0.7],  # q2 -> c0 (0.4), all three others beat it -> rank 4
        ]
    )
    relevant = {"q0": {"c2"}, "q1": {"c0"}, "q2": {"c0"}, "unused": {"c1"}}
    metrics = retrieval_metrics(scores, ["q0", "q1", "q2"], CORPUS, relevant, ks=(1, 2, 5))
    assert metrics == pytest.approx(
        {
            "recall@1": 1 / 3,
            "recall@2": 2 / 3,
            "recall@5": 1.0,
            "mrr": (1 / 2 + 1 + 1 / 4) / 3,
            "mean_rank": 7 / 3,
            "median_rank": 2.0,
        }
    )
    # Reading the diagonal instead would give q0 -> c0 (rank 4), q1 -> c1 (rank 4), q2 -> c2 (rank 3).
    diagonal = {"q0": {"c0"}, "q1": {"c1"}, "q2": {"c2"}}
    assert first_relevant_ranks(scores, ["q0", "q1", "q2"], CORPUS, diagonal).tolist() == [4, 4, 3]


@pytest.mark.parametrize(
    "row, relevant, expected_rank",
    [
        ([0.5, 0.5, 0.5, 0.5], {"c1"}, 4),  # constant scores: the worst rank, not the best
        ([0.3, 0.3, 0.3, 0.3], {"c0", "c3"}, 3),  # worst possible with 2 relevant: N - 2 + 1
        ([0.9, 0.5, 0.5, 0.1], {"c2"}, 3),  # tied with c1, which is placed first
        ([0.7, 0.7, 0.2, 0.1], {"c0", "c1"}, 1),  # two relevant items tied at the top: still a hit
        ([0.2, 0.8, 0.6, 0.9], {"c0", "c2"}, 3),  # best relevant is c2 (0.6); c1 and c3 beat it
        ([0.6, 0.8, 0.6, 0.6], {"c2", "c3"}, 3),  # c0 (non-relevant) and c1 rank before the tied c2/c3
    ],
)
def test_pessimistic_ties_and_multiple_relevant(row, relevant, expected_rank):
    ranks = first_relevant_ranks(np.array([row]), ["q"], CORPUS, {"q": relevant})
    assert ranks.tolist() == [expected_rank]


def test_float32_and_tensor_scores_are_accepted():
    torch = pytest.importorskip("torch")
    scores = torch.tensor([[0.25, 0.75], [0.5, 0.5]], dtype=torch.float32)
    ranks = first_relevant_ranks(scores, ["a", "b"], ["x", "y"], {"a": {"y"}, "b": {"y"}})
    assert ranks.tolist() == [1, 2]


@pytest.mark.parametrize("relevant", [{"q0": {"c0"}}, {"q0": {"c0"}, "q1": set()}])
def test_query_without_relevant_items_is_named(relevant):
    with pytest.raises(ValueError, match="'q1'"):
        retrieval_metrics(np.zeros((2, 4)), ["q0", "q1"], CORPUS, relevant)


def test_input_errors():
    with pytest.raises(ValueError, match=r"'c9'"):
        retrieval_metrics(np.zeros((1, 4)), ["q0"], CORPUS, {"q0": {"c9"}})
    with pytest.raises(ValueError, match=r"shape \(2, 4\)"):
        retrieval_metrics(np.zeros((2, 4)), ["q0"], CORPUS, {"q0": {"c0"}})
    with pytest.raises(ValueError, match="'c1' appears more than once"):
        retrieval_metrics(np.zeros((1, 3)), ["q0"], ["c0", "c1", "c1"], {"q0": {"c0"}})
    with pytest.raises(ValueError, match="NaN for query 'q1'"):
        retrieval_metrics(np.array([[0.1, 0.2], [np.nan, 0.0]]), ["q0", "q1"], ["a", "b"], {"q0": {"a"}, "q1": {"a"}})
    with pytest.raises(ValueError, match="positive ints"):
        retrieval_metrics(np.zeros((1, 4)), ["q0"], CORPUS, {"q0": {"c0"}}, ks=(0, 5))


def test_ranking_metrics_from_truncated_lists():
    rankings = {
        "q0": ["c1", "c2", "c0"],  # c2 at position 2
        "q1": ["c3", "c0"],  # c0 at position 2
        "q2": ["c1", "c3"],  # c0 absent: rank inf
    }
    relevant = {"q0": {"c2"}, "q1": {"c0"}, "q2": {"c0"}}
    metrics = ranking_metrics(rankings, relevant, ks=(1, 2))
    assert metrics == pytest.approx(
        {"recall@1": 0.0, "recall@2": 2 / 3, "mrr": (1 / 2 + 1 / 2 + 0) / 3, "mean_rank": np.inf, "median_rank": 2.0}
    )
    with pytest.raises(ValueError, match="'q0' repeats"):
        ranking_metrics({"q0": ["c1", "c1"]}, relevant)
    with pytest.raises(ValueError, match="'q2'"):
        ranking_metrics({"q2": ["c1"]}, {"q2": set()})


def test_ranking_metrics_agree_with_score_matrix_without_ties():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((20, 30))  # continuous scores: no ties
    query_ids = [f"q{i}" for i in range(20)]
    corpus_ids = [f"c{j}" for j in range(30)]
    relevant = {
        q: {corpus_ids[j] for j in rng.choice(30, size=1 + i % 3, replace=False)} for i, q in enumerate(query_ids)
    }
    rankings = {q: [corpus_ids[j] for j in np.argsort(-scores[i])] for i, q in enumerate(query_ids)}
    assert ranking_metrics(rankings, relevant) == pytest.approx(
        retrieval_metrics(scores, query_ids, corpus_ids, relevant)
    )


def test_metrics_from_ranks():
    assert metrics_from_ranks([1, 3, 10, 2], ks=(1, 3)) == pytest.approx(
        {
            "recall@1": 0.25,
            "recall@3": 0.75,
            "mrr": (1 + 1 / 3 + 1 / 10 + 1 / 2) / 4,
            "mean_rank": 4.0,
            "median_rank": 2.5,
        }
    )
    with pytest.raises(ValueError, match="1-based"):
        metrics_from_ranks([0, 1])


# Image-to-report retrieval where c2 is the same report as c0 up to whitespace and case.
CORPUS_TEXTS = {
    "c0": "No acute findings.",
    "c1": "Right pleural effusion.",
    "c2": "  no   acute\nFINDINGS. ",
    "c3": "Cardiomegaly.",
}
IMAGE_RELEVANT = {"i0": {"c0"}, "i1": {"c1"}, "i2": {"c2"}, "i3": {"c3"}}
IMAGE_SCORES = np.array(
    [
        [0.5, 0.6, 0.9, 0.2],
        [0.3, 0.8, 0.4, 0.1],
        [0.9, 0.2, 0.6, 0.3],
        [0.1, 0.7, 0.2, 0.6],
    ]
)
IMAGES = ["i0", "i1", "i2", "i3"]


def test_normalize_report_text():
    assert normalize_report_text("  Straße\n\tIST  frei ") == "strasse ist frei"
    assert normalize_report_text(CORPUS_TEXTS["c0"]) == normalize_report_text(CORPUS_TEXTS["c2"])


def test_duplicate_rule_none():
    resolution = relevant_with_duplicates(None, CORPUS_TEXTS, IMAGE_RELEVANT, "none")
    assert resolution.corpus_ids == CORPUS and resolution.relevant == IMAGE_RELEVANT
    # i0 -> c0 (0.5): c1, c2 beat it -> 3; i1 -> 1; i2 -> c2 (0.6): c0 beats it -> 2; i3 -> c3 (0.6): c1 -> 2
    metrics = retrieval_metrics(
        resolution.select(IMAGE_SCORES), IMAGES, resolution.corpus_ids, resolution.relevant, ks=(1,)
    )
    assert metrics == pytest.approx(
        {"recall@1": 0.25, "mrr": (1 / 3 + 1 + 1 / 2 + 1 / 2) / 4, "mean_rank": 2.0, "median_rank": 2.0}
    )


def test_duplicate_rule_count_as_relevant():
    resolution = relevant_with_duplicates(None, CORPUS_TEXTS, IMAGE_RELEVANT, "count_as_relevant")
    assert resolution.corpus_ids == CORPUS
    assert resolution.relevant == {"i0": {"c0", "c2"}, "i1": {"c1"}, "i2": {"c0", "c2"}, "i3": {"c3"}}
    # i0 and i2 now hit with their 0.9 duplicate -> ranks [1, 1, 1, 2]
    metrics = retrieval_metrics(
        resolution.select(IMAGE_SCORES), IMAGES, resolution.corpus_ids, resolution.relevant, ks=(1,)
    )
    assert metrics == pytest.approx(
        {"recall@1": 0.75, "mrr": (1 + 1 + 1 + 1 / 2) / 4, "mean_rank": 1.25, "median_rank": 1.0}
    )


def test_duplicate_rule_collapse():
    resolution = relevant_with_duplicates(None, CORPUS_TEXTS, IMAGE_RELEVANT, "collapse")
    assert resolution.corpus_ids == ["c0", "c1", "c3"]
    assert resolution.corpus_columns.tolist() == [0, 1, 3]
    assert resolution.representative == {"c0": "c0", "c1": "c1", "c2": "c0", "c3": "c3"}
    assert resolution.relevant == {"i0": {"c0"}, "i1": {"c1"}, "i2": {"c0"}, "i3": {"c3"}}
    # Columns c0, c1, c3 only. i0: [0.5, 0.6, 0.2] -> 2; i1 -> 1; i2: [0.9, 0.2, 0.3] -> 1; i3: [0.1, 0.7, 0.6] -> 2
    metrics = retrieval_metrics(
        resolution.select(IMAGE_SCORES), IMAGES, resolution.corpus_ids, resolution.relevant, ks=(1,)
    )
    assert metrics == pytest.approx(
        {"recall@1": 0.5, "mrr": (1 / 2 + 1 + 1 + 1 / 2) / 4, "mean_rank": 1.5, "median_rank": 1.5}
    )


def test_duplicate_query_texts_share_relevance():
    # Report-to-image: t0 and t1 are the same report, paired with different images g0 and g1.
    query_texts = {"t0": "Right pleural effusion", "t1": "right pleural  effusion", "t2": "Cardiomegaly"}
    image_reports = {"g0": "report a", "g1": "report b", "g2": "report c"}
    relevant = {"t0": {"g0"}, "t1": {"g1"}, "t2": {"g2"}}
    for rule in ("count_as_relevant", "collapse"):
        resolution = relevant_with_duplicates(query_texts, image_reports, relevant, rule)
        assert resolution.relevant == {"t0": {"g0", "g1"}, "t1": {"g0", "g1"}, "t2": {"g2"}}, rule
    assert relevant_with_duplicates(query_texts, image_reports, relevant, "none").relevant == relevant


def test_duplicate_rule_errors():
    with pytest.raises(ValueError, match=r"one of \('collapse', 'count_as_relevant', 'none'\), got 'dedupe'"):
        relevant_with_duplicates(None, CORPUS_TEXTS, IMAGE_RELEVANT, "dedupe")
    with pytest.raises(ValueError, match=r"relevant\['i0'\].*'c9'"):
        relevant_with_duplicates(None, CORPUS_TEXTS, {"i0": {"c9"}}, "collapse")
    with pytest.raises(ValueError, match=r"\['t9'\]"):
        relevant_with_duplicates({"t0": "x"}, CORPUS_TEXTS, {"t0": {"c0"}, "t9": {"c1"}}, "count_as_relevant")
    resolution = relevant_with_duplicates(None, CORPUS_TEXTS, IMAGE_RELEVANT, "collapse")
    with pytest.raises(ValueError, match=r"\(num_queries, 4\)"):
        resolution.select(IMAGE_SCORES[:, :3])
