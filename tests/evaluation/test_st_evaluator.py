import pytest
from sentence_transformers import SentenceTransformer

from llm2clip4cxr.data import read_reports_csv
from llm2clip4cxr.evaluation.baselines import sentence_transformer_encoder
from llm2clip4cxr.evaluation.st_evaluator import findings_to_impression_evaluator
from llm2clip4cxr.evaluation.tasks import findings_to_impression_retrieval

from ..shared_data import OPENI_REPORTS, needs_openi


@needs_openi
@pytest.mark.parametrize("duplicate_rule", ["count_as_relevant", "collapse"])
def test_evaluator_agrees_with_the_harness(make_encoder, tmp_path, duplicate_rule):
    make_encoder().save_pretrained(tmp_path / "model")
    studies = read_reports_csv(OPENI_REPORTS)[:60]
    model = SentenceTransformer(str(tmp_path / "model"), trust_remote_code=True)
    evaluator = findings_to_impression_evaluator(studies, duplicate_rule=duplicate_rule, name="f2i")
    scores = evaluator(model)
    expected = findings_to_impression_retrieval(
        sentence_transformer_encoder(tmp_path / "model", trust_remote_code=True), studies, duplicate_rule
    )
    assert expected["num_queries"] == len(evaluator.queries) > 40
    for k in (1, 5, 10):
        assert scores[f"f2i_cosine_accuracy@{k}"] == pytest.approx(expected[f"recall@{k}"], abs=1e-9), k
    if duplicate_rule == "collapse":
        assert len(evaluator.corpus) < len(evaluator.queries)  # Open-I repeats impressions verbatim


def test_evaluator_rejects_unusable_studies():
    with pytest.raises(ValueError, match="both findings and impression"):
        findings_to_impression_evaluator([{"uid": "1", "findings": "x", "impression": ""}])
    with pytest.raises(ValueError, match="unique"):
        findings_to_impression_evaluator([{"uid": "1", "findings": "a", "impression": "b"}] * 2)
