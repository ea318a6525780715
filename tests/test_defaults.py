"""The default text encoder shipped in the package, and its model card."""

import json
import os
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from sentence_transformers import SentenceTransformer
from transformers import AutoModel

import llm2clip4cxr
from llm2clip4cxr.defaults import default_model_path, load_default_text_encoder

from .modeling.test_remote_code import FRESH_PROCESS, MODELING_DIR
from .shared_data import OPENI_REPORTS, needs_openi

REPORTS = ["No acute cardiopulmonary process.", "Small left pleural effusion.", "Large left pleural effusion."]


@pytest.fixture(scope="module")
def default_dir():
    return default_model_path("text")


def test_default_encoder_loads_everywhere_with_the_same_vectors(default_dir):
    model = load_default_text_encoder()
    instruction = model.config.default_instruction
    assert instruction  # the shipped model records the instruction it was trained with
    expected = model.encode(REPORTS)  # no instruction given: the trained one applies
    torch.testing.assert_close(expected, model.encode(REPORTS, instruction=instruction))
    assert type(AutoModel.from_pretrained(default_dir)) is llm2clip4cxr.LLM2Vec4CXRModel
    st = SentenceTransformer(str(default_dir), trust_remote_code=True)
    # sentence-transformers without a prompt uses it too (default_prompt_name), as a new user would call it.
    torch.testing.assert_close(st.encode(REPORTS, convert_to_tensor=True), expected, atol=1e-5, rtol=1e-4)


def test_default_encoder_loads_without_the_package(default_dir, tmp_path):
    (tmp_path / "texts.json").write_text(json.dumps(REPORTS))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    instruction = load_default_text_encoder().config.default_instruction
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(default_dir), str(tmp_path / "texts.json"),
                    str(tmp_path / "out.pt"), instruction], check=True, env=env, cwd=tmp_path)
    result = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(result["encode"], load_default_text_encoder().encode(REPORTS, instruction=instruction))


@needs_openi
def test_shipped_results_are_the_harness_on_the_held_out_studies(default_dir):
    """The numbers the card and README quote (results.json) are what the evaluation harness gives the shipped
    model on the held-out Open-I studies now (same seed, same tasks)."""
    from llm2clip4cxr.data import read_reports_csv, split_by_study
    from llm2clip4cxr.evaluation import harness
    from llm2clip4cxr.retrieval.encoders import llm2vec_encoder

    shipped = json.loads((default_dir / "results.json").read_text())
    name = next(name for name in shipped["models"] if name.startswith("LLM2Vec4CXR-tiny"))
    rows = split_by_study(read_reports_csv(OPENI_REPORTS))[1]
    tasks = ["findings_to_impression", "paraphrase", "clinical_ordering"]
    now = harness.run_evaluation(
        {name: llm2vec_encoder(load_default_text_encoder())}, rows, tasks=tasks, seed=shipped["seed"]
    )["models"][name]
    for task in tasks:
        for metric in ("recall@1", "mrr", "accuracy"):
            if metric in shipped["models"][name][task]:
                assert now[task][metric] == pytest.approx(shipped["models"][name][task][metric], abs=1e-6)


RELEASE_GATE = 0.90


@pytest.fixture(scope="module")
def ordering_as_a_user_scores_it(default_dir):
    """The clinical ordering suite scored through sentence-transformers without a prompt, as a new user would."""
    from llm2clip4cxr.evaluation.tasks import clinical_ordering, load_clinical_ordering_suite

    st = SentenceTransformer(str(default_dir), trust_remote_code=True)
    return clinical_ordering(lambda texts: st.encode(list(texts), normalize_embeddings=True),
                             load_clinical_ordering_suite())


def test_ordering_through_sentence_transformers_is_the_recorded_one(default_dir, ordering_as_a_user_scores_it):
    shipped = json.loads((default_dir / "results.json").read_text())
    recorded = next(model["clinical_ordering"]["accuracy"] for name, model in shipped["models"].items()
                    if name.startswith("LLM2Vec4CXR-tiny"))
    result = ordering_as_a_user_scores_it
    assert result["accuracy"] == pytest.approx(recorded, abs=1.5 / result["num_triplets"])  # a near-tie may flip


@pytest.mark.xfail(
    strict=True,
    reason="release gate of the default-quality issue not met: the shipped default orders fewer than 90% of the "
    "clinical ordering suite correctly (its results.json and docs/evaluation.md give the number). Strict: when a "
    "default passes, this test XPASSes, which fails the suite until the marker is removed.",
)
def test_release_gate_the_shipped_default_orders_the_clinical_suite(ordering_as_a_user_scores_it):
    assert ordering_as_a_user_scores_it["accuracy"] >= RELEASE_GATE


def test_default_checkpoint_code_is_the_package_code(default_dir):
    for name in ("configuration_llm2vec4cxr.py", "modeling_llm2vec4cxr.py"):
        assert (default_dir / name).read_bytes() == (MODELING_DIR / name).read_bytes(), (
            f"{default_dir / name} is stale: refresh it with "
            "LLM2Vec4CXRModel.from_pretrained(p).save_pretrained(p) for p = default_model_path('text')"
        )


def test_default_checkpoint_is_small_and_carries_a_valid_card(default_dir):
    assert (default_dir / "model.safetensors").stat().st_size < 25 * 2**20
    card = ModelCard.load(default_dir / "README.md")
    assert card.data.pipeline_tag == "sentence-similarity"
    metrics = {(result.task_name, result.metric_type) for result in card.data.eval_results}
    assert ("Findings to impression retrieval", "recall@1") in metrics
    assert ("Clinical error discrimination", "macro_accuracy") in metrics
    assert ("Clinical ordering suite", "accuracy") in metrics
    assert "Not a medical device" in card.text
    assert "Variant families it was trained on" in card.text and "held-out variant families" in card.text


def test_clip_default_is_refused_with_the_reason():
    with pytest.raises(FileNotFoundError, match="no chest X-ray images paired with reports"):
        default_model_path("clip")
    with pytest.raises(ValueError, match="`kind` must be one of"):
        default_model_path("vision")
