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

REPORTS = ["No acute cardiopulmonary process.", "Small left pleural effusion.", "Large left pleural effusion."]


@pytest.fixture(scope="module")
def default_dir():
    return default_model_path("text")


def test_default_encoder_loads_everywhere_with_the_same_vectors(default_dir):
    model = load_default_text_encoder()
    instruction = model.config.instructions["findings"]
    expected = model.encode(REPORTS, instruction=instruction)
    assert type(AutoModel.from_pretrained(default_dir)) is llm2clip4cxr.LLM2Vec4CXRModel
    st = SentenceTransformer(str(default_dir), trust_remote_code=True)
    torch.testing.assert_close(st.encode(REPORTS, prompt_name="findings", convert_to_tensor=True), expected)


def test_default_encoder_loads_without_the_package(default_dir, tmp_path):
    (tmp_path / "texts.json").write_text(json.dumps(REPORTS))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    instruction = load_default_text_encoder().config.instructions["findings"]
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(default_dir), str(tmp_path / "texts.json"),
                    str(tmp_path / "out.pt"), instruction], check=True, env=env, cwd=tmp_path)
    result = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(result["encode"], load_default_text_encoder().encode(REPORTS, instruction=instruction))


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
    assert ("Clinical error discrimination", "accuracy") in metrics
    assert "Not a medical device" in card.text


def test_clip_default_is_refused_with_the_reason():
    with pytest.raises(FileNotFoundError, match="no chest X-ray images paired with reports"):
        default_model_path("clip")
    with pytest.raises(ValueError, match="`kind` must be one of"):
        default_model_path("vision")
