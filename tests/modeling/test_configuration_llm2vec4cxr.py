import pytest
from transformers import AutoConfig, GPT2Config, LlamaConfig

from llm2clip4cxr import LLM2Vec4CXRConfig
from llm2clip4cxr.training.factory import backbone_config_dict

from ..conftest import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_keeps_backbone_and_bidirectionality(tmp_path, family):
    config = LLM2Vec4CXRConfig(
        backbone_config=backbone_config_dict(family), pooling_mode="latent_attention", num_latents=32,
        instructions={"findings": "Retrieve reports with the same findings"},
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LLM2Vec4CXRConfig)
    assert loaded.backbone_config.model_type == family
    assert loaded.backbone_config.is_causal is False
    assert loaded.to_diff_dict() == config.to_diff_dict()
    assert loaded.instructions == config.instructions


def test_causal_variant_is_persisted(tmp_path):
    LLM2Vec4CXRConfig(backbone_config=backbone_config_dict(), bidirectional=False).save_pretrained(tmp_path)
    assert LLM2Vec4CXRConfig.from_pretrained(tmp_path).backbone_config.is_causal is True


def test_accepts_config_object_and_alias():
    config = LLM2Vec4CXRConfig(
        backbone_config=LlamaConfig(hidden_size=32, num_attention_heads=4), pooling_mode="last_token"
    )
    assert config.pooling_mode == "eos"
    assert config.hidden_size == 32


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"pooling_mode": "max"}, ValueError, r"`pooling_mode` must be one of .* got 'max'"),
        ({"backbone_config": GPT2Config()}, ValueError, r"Unsupported backbone `model_type` 'gpt2'"),
        ({"backbone_config": {"model_type": "bert"}}, ValueError, r"Unsupported backbone `model_type` 'bert'"),
        ({"backbone_config": {"hidden_size": 64}}, ValueError, r"must name its `model_type`"),
        ({"backbone_config": "llama"}, TypeError, r"`backbone_config` must be"),
        (
            {"pooling_mode": "latent_attention", "latent_attention_heads": 5},
            ValueError,
            r"must divide the backbone hidden size",
        ),
        ({"instruction_separator": "  "}, ValueError, r"`instruction_separator` must be a non-blank string"),
        ({"max_seq_length": 1}, ValueError, r"`max_seq_length` must be at least 2"),
    ],
)
def test_invalid_values_are_named(kwargs, error, match):
    kwargs.setdefault("backbone_config", backbone_config_dict())
    with pytest.raises(error, match=match):
        LLM2Vec4CXRConfig(**kwargs)
