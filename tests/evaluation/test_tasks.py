import numpy as np
import pytest

from llm2clip4cxr.evaluation.baselines import tfidf_encoder
from llm2clip4cxr.evaluation.tasks import error_discrimination, findings_to_impression_retrieval


def lookup_encoder(vectors: dict):
    """A mock encoder with fixed, hand-chosen embeddings, so expected metrics are exact."""
    return lambda texts: np.array([vectors[text] for text in texts], dtype=np.float32)


STUDIES = [
    {"uid": "1", "findings": "f1", "impression": "Normal."},
    {"uid": "2", "findings": "f2", "impression": "Effusion."},
    {"uid": "3", "findings": "f3", "impression": "normal."},  # the same text as study 1 once normalised
    {"uid": "4", "findings": "", "impression": "Skipped: no findings."},
]
VECTORS = {
    "f1": [1.0, 0.0], "f2": [0.0, 1.0], "f3": [0.0, 1.0],
    "Normal.": [1.0, 0.0], "Effusion.": [0.0, 1.0], "normal.": [0.6, 0.8],
}


def test_findings_to_impression_with_duplicate_rules():
    encoder = lookup_encoder(VECTORS)
    # Scores: f1 -> (1, 0, .6); f2 -> (0, 1, .8); f3 -> (0, 1, .8).
    strict = findings_to_impression_retrieval(encoder, STUDIES, duplicate_rule="none")
    assert strict["num_queries"] == 3
    # ranks: study 1 -> 1; study 2 -> 1; study 3: its own impression (.8) is beaten by Effusion (1) -> 2.
    assert strict["recall@1"] == pytest.approx(2 / 3)
    assert strict["mrr"] == pytest.approx((1 + 1 + 0.5) / 3)
    # Identical impressions count as relevant: studies 1 and 3 both accept "Normal." and "normal.";
    # study 3's best relevant item is still "normal." at rank 2 ("Normal." scores 0 for f3).
    twins = findings_to_impression_retrieval(encoder, STUDIES)
    assert twins["recall@1"] == pytest.approx(2 / 3)
    assert twins["mean_rank"] == pytest.approx((1 + 1 + 2) / 3)


def test_error_discrimination_counts_ties_as_failures():
    encoder = lookup_encoder({"a": [1.0, 0.0], "p": [1.0, 0.0], "n": [0.0, 1.0], "t": [0.0, 1.0]})
    triplets = [{"anchor": "a", "positive": "p", "negative": "n"}, {"anchor": "a", "positive": "n", "negative": "t"}]
    result = error_discrimination(encoder, triplets)
    assert result == {"accuracy": 0.5, "chance": 0.5, "num_triplets": 2}
    with pytest.raises(ValueError, match="No triplets"):
        error_discrimination(encoder, [])


def test_tfidf_encoder_is_normalised_and_lexical():
    encode = tfidf_encoder(["small left pleural effusion", "no pneumothorax", "large right effusion"])
    embeddings = encode(["small left pleural effusion", "pleural effusion", "unrelated words"])
    np.testing.assert_allclose(np.linalg.norm(embeddings[:2], axis=1), 1.0, rtol=1e-6)
    assert embeddings[0] @ embeddings[1] > 0.3
    assert np.allclose(embeddings[2], 0.0)  # no known word: the zero vector, scored 0 against everything
