"""One instruction story: the instruction a checkpoint was trained with is its default everywhere."""

import json
import warnings

import pytest
import torch
from sentence_transformers import SentenceTransformer

from llm2clip4cxr import LLM2Vec4CXRConfig, LLM2Vec4CXRModel

TRAINED_WITH = "Retrieve reports with the same clinical findings"


@pytest.fixture()
def instructed(make_encoder, tmp_path):
    model = make_encoder(instructions={"retrieval": TRAINED_WITH}, default_instruction_name="retrieval")
    model.save_pretrained(tmp_path)
    return model, tmp_path


def test_config_refuses_a_default_name_that_is_not_an_instruction():
    with pytest.raises(ValueError, match="default_instruction_name.*not a key of `instructions`"):
        LLM2Vec4CXRConfig(instructions={"retrieval": TRAINED_WITH}, default_instruction_name="findings")
    assert LLM2Vec4CXRConfig().default_instruction is None


def test_encode_without_instruction_uses_the_trained_one_and_empty_means_none(instructed, report_texts):
    model, _ = instructed
    texts = report_texts[:6]
    default = model.encode(texts)
    torch.testing.assert_close(default, model.encode(texts, instruction=TRAINED_WITH))
    none = model.encode(texts, instruction="")
    assert not torch.allclose(default, none)
    model.config.default_instruction_name = None
    torch.testing.assert_close(none, model.encode(texts))


def test_a_text_carrying_its_own_instruction_keeps_it(instructed, report_texts):
    model, _ = instructed
    separator = model.config.instruction_separator
    own = model.encode([f"Find reports with a pleural effusion{separator}{report_texts[0]}"])
    torch.testing.assert_close(
        own, model.encode([report_texts[0]], instruction="Find reports with a pleural effusion")
    )


def test_saved_config_and_sentence_transformers_default_prompt(instructed, report_texts):
    model, folder = instructed
    config = json.loads((folder / "config.json").read_text())
    assert config["default_instruction_name"] == "retrieval" and config["instructions"]["retrieval"] == TRAINED_WITH
    st_config = json.loads((folder / "config_sentence_transformers.json").read_text())
    assert st_config["default_prompt_name"] == "retrieval"

    # sentence-transformers without a prompt == model.encode without an instruction; prompt="" means none.
    st = SentenceTransformer(str(folder), trust_remote_code=True)
    texts = report_texts[:5]
    torch.testing.assert_close(st.encode(texts, convert_to_tensor=True), model.encode(texts), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        st.encode(texts, prompt="", convert_to_tensor=True), model.encode(texts, instruction=""), atol=1e-5, rtol=1e-4
    )
    reloaded = LLM2Vec4CXRModel.from_pretrained(folder)
    assert reloaded.config.default_instruction == TRAINED_WITH


def test_encode_streams_batches_and_keeps_input_order(make_encoder, report_texts):
    model = make_encoder()
    texts = report_texts[:37]
    reference = torch.stack([model.encode([text])[0] for text in texts])
    for batch_size in (1, 4, 64):
        torch.testing.assert_close(model.encode(texts, batch_size=batch_size), reference, atol=1e-5, rtol=1e-4)


def test_bad_input_is_refused_before_any_batch_runs(make_encoder, report_texts, monkeypatch):
    model = make_encoder()
    calls = []
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match="Text 40 has an empty report"):
        model.encode(report_texts[:40] + ["   "], batch_size=4)
    assert not calls


def test_a_huge_report_is_cut_before_tokenizing_to_the_same_tokens(make_encoder, report_texts):
    model = make_encoder(max_seq_length=64)
    huge = " ".join(report_texts[:2000])  # several hundred thousand characters
    assert len(huge) > 200_000
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cut = model.tokenize([huge], return_truncated_count=True)
    reference = model.tokenizer(huge, add_special_tokens=True)["input_ids"][:64]
    assert cut[1] == 1 and cut[0]["input_ids"][0].tolist() == reference
    assert not caught
