"""Model cards: rendered from hub_cards/, model-index from the harness's results, checked by huggingface_hub's
parser."""

import json

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from llm2clip4cxr import LLM2CLIP4CXRConfig, LLM2Vec4CXRConfig, default_model_path
from llm2clip4cxr.data import read_reports_csv
from llm2clip4cxr.evaluation import baselines, harness
from llm2clip4cxr.hub.cards import model_card, select_model_results, where_it_loses, write_text_model_card

from ..shared_data import HAVE_OPENI, OPENI_REPORTS, needs_openi


def parse_strictly(card: ModelCard) -> ModelCard:
    """What the Hub reads: the YAML header parsed by huggingface_hub with metadata errors raised, not ignored."""
    reparsed = ModelCard(str(card), ignore_metadata_errors=False)
    if "model-index" in reparsed.data.to_dict():
        model_index_to_eval_results(reparsed.data.to_dict()["model-index"])
    return reparsed


def published(card: ModelCard) -> dict:
    return {(r.dataset_config, r.metric_type): r.metric_value for r in card.data.eval_results or []}


@pytest.fixture(scope="module")
def harness_results():
    if not HAVE_OPENI:
        pytest.skip(needs_openi.kwargs["reason"])
    rows = read_reports_csv(OPENI_REPORTS)[:60]
    texts = [harness.report_text(row) for row in rows]
    return harness.run_evaluation({"tfidf": baselines.tfidf_encoder(texts), "bm25": baselines.bm25_scorer()}, rows)


def test_shipped_card_is_reproduced_from_its_results(tmp_path):
    default = default_model_path("text")
    for name in ("config.json", "results.json"):
        (tmp_path / name).write_bytes((default / name).read_bytes())
    write_text_model_card(tmp_path, json.loads((default / "results.json").read_text()))
    assert (tmp_path / "README.md").read_text() == (default / "README.md").read_text()


def test_harness_results_become_the_model_index(harness_results):
    config = LLM2Vec4CXRConfig(backbone_config={"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                                                "num_attention_heads": 4, "vocab_size": 100})
    card = parse_strictly(model_card(config, "org/enc", results=harness_results, results_model="tfidf"))
    assert card.data.pipeline_tag == "sentence-similarity" and card.data.library_name == "transformers"
    assert card.data.model_name == "enc"
    tfidf = harness_results["models"]["tfidf"]
    expected = {(task, metric): round(tfidf[task][metric], 4) for task, metrics in (
        ("findings_to_impression", ("recall@1", "recall@5", "recall@10", "mrr")),
        ("paraphrase", ("recall@1", "recall@5", "recall@10", "mrr")),
        ("error_discrimination", ("macro_accuracy",)),
        ("clinical_ordering", ("accuracy",)),
        ("zero_shot_labels", ("macro_auroc", "macro_f1")),
    ) for metric in metrics}
    assert published(card) == expected  # headline metrics only: no counts, ranks, spreads or chance levels
    assert {r.task_type for r in card.data.eval_results} == {"sentence-similarity"}
    # The table lists every model measured in the same run.
    assert "| tfidf |" in card.text and "| bm25 |" in card.text and "60 studies" in card.text
    assert "Not a medical device" in card.text


def test_card_states_every_metric_another_model_of_the_run_wins(harness_results):
    tfidf, bm25 = harness_results["models"]["tfidf"], harness_results["models"]["bm25"]
    losses = where_it_loses(harness_results, "bm25")
    expected = {
        (task, metric) for task, metrics in (
            ("findings_to_impression", ("recall@1", "recall@5", "recall@10", "mrr")),
            ("paraphrase", ("recall@1", "recall@5", "recall@10", "mrr")),
            ("clinical_ordering", ("accuracy",)), ("zero_shot_labels", ("macro_auroc", "macro_f1")),
        ) for metric in metrics if tfidf[task][metric] > bm25[task][metric]
    }
    if tfidf["findings_to_impression"]["unique_impressions"]["recall@1"] > bm25["findings_to_impression"][
            "unique_impressions"]["recall@1"]:
        expected.add(("findings_to_impression", "recall@1 (unique impressions)"))
    assert expected, "the fixture no longer has a metric where TF-IDF beats BM25"
    assert len(losses) == len(expected) + (tfidf["error_discrimination"]["macro_accuracy"]
                                           > bm25["error_discrimination"]["macro_accuracy"])
    assert all(", below tfidf " in line for line in losses)
    assert where_it_loses(harness_results, "tfidf") == [] or all("below bm25" in line for line in
                                                              where_it_loses(harness_results, "tfidf"))
    config = LLM2Vec4CXRConfig(backbone_config={"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                                                "num_attention_heads": 4, "vocab_size": 100})
    card = model_card(config, "org/enc", results=harness_results, results_model="bm25")
    assert "Where this model loses in this run:" in card.text
    assert all(f"- {line}" in card.text for line in losses)


def test_unknown_tasks_publish_their_headline_metrics_only():
    results = {"models": {"m": {"image_to_report": {"recall@1": 0.5, "ndcg@10": 0.25, "num_queries": 7,
                                                    "mean_rank": 3.0, "macro_auroc": 0.75}}}}
    config = LLM2CLIP4CXRConfig(text_config=LLM2Vec4CXRConfig().to_dict())
    card = parse_strictly(model_card(config, "org/clip", results=results))
    assert published(card) == {("image_to_report", "recall@1"): 0.5, ("image_to_report", "ndcg@10"): 0.25,
                               ("image_to_report", "macro_auroc"): 0.75}
    assert {r.task_type for r in card.data.eval_results} == {"zero-shot-image-classification"}


def test_clip_card_without_results_has_no_model_index():
    config = LLM2CLIP4CXRConfig(text_config=LLM2Vec4CXRConfig().to_dict(), projection_dim=32)
    card = parse_strictly(model_card(config, "org/llm2clip4cxr-small"))
    metadata = card.data.to_dict()
    assert metadata["pipeline_tag"] == "zero-shot-image-classification"
    assert "model-index" not in metadata and "model_name" not in metadata
    assert metadata["license"] == "cc-by-nc-nd-4.0" and metadata["datasets"] == ["openi"]
    assert 'AutoModel.from_pretrained("org/llm2clip4cxr-small")' in card.text
    assert "Shared embedding size 32" in card.text and "Not a medical device" in card.text
    assert "No evaluation results were published" in card.text


def test_adapter_card_names_its_base_model():
    config = LLM2Vec4CXRConfig()
    card = parse_strictly(model_card(config, "org/adapter", base_model="org/base", adapter=True))
    assert card.data.base_model == "org/base" and card.data.library_name == "peft"
    assert {"peft", "lora"} <= set(card.data.tags)
    assert 'PeftModel.from_pretrained(base, "org/adapter")' in card.text
    with pytest.raises(ValueError, match="needs `base_model`"):
        model_card(config, "org/adapter", adapter=True)


def test_results_errors_name_what_to_give(harness_results):
    with pytest.raises(ValueError, match=r"several models \['bm25', 'tfidf'\].*--results-model"):
        select_model_results(harness_results, ["mine"])
    assert select_model_results(harness_results, [None, "bm25"]) == "bm25"
    with pytest.raises(ValueError, match="Unrecognised results file"):
        select_model_results({"seed": 0}, [])
    with pytest.raises(ValueError, match="config.model_type` must be one of"):
        model_card(type("Config", (), {"model_type": "bert"})(), "org/x")
