"""Build LLM2Vec4CXR encoders from scratch (small CXR-only backbones, test and benchmark models)."""

from ..modeling.configuration_llm2vec4cxr import LLM2Vec4CXRConfig
from ..modeling.modeling_llm2vec4cxr import LLM2Vec4CXRModel


def backbone_config_dict(
    family: str = "llama",
    vocab_size: int = 32000,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    **extra,
) -> dict:
    """A decoder backbone config (as a dict) of the given family and size."""
    config = {
        "model_type": family,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "intermediate_size": intermediate_size or 4 * hidden_size,
        "max_position_embeddings": max_position_embeddings,
    }
    config.update(extra)
    return config


def build_text_encoder(
    tokenizer, family: str = "llama", pooling_mode: str = "mean", backbone_kwargs=None, **config_kwargs
):
    """A randomly initialised LLM2Vec4CXRModel sized to `tokenizer`, with the tokenizer attached.

    The backbone's special token ids are taken from the tokenizer so that saved checkpoints agree.
    """
    backbone = backbone_config_dict(family, vocab_size=len(tokenizer), **(backbone_kwargs or {}))
    backbone.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    config = LLM2Vec4CXRConfig(backbone_config=backbone, pooling_mode=pooling_mode, **config_kwargs)
    model = LLM2Vec4CXRModel(config)
    model.set_tokenizer(tokenizer)
    return model


def encoder_from_decoder(path, pooling_mode: str = "mean", tokenizer=None, trust_remote_code: bool = False,
                         **config_kwargs) -> LLM2Vec4CXRModel:
    """Turn a saved decoder LLM (a Llama/Mistral/Qwen2/Qwen3 folder or Hub id) into an LLM2Vec4CXRModel:
    its weights in a bidirectional backbone, a freshly initialised pooling head, and its tokenizer.

    These families are transformers' own classes: no Python file of `path` runs unless
    `trust_remote_code=True` (a folder that needs it raises `UntrustedCodeError`).
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from ..checkpoints import remote_code_guard

    with remote_code_guard(path, trust_remote_code) as remote:
        backbone_config = AutoConfig.from_pretrained(path, **remote)
        config = LLM2Vec4CXRConfig(backbone_config=backbone_config, pooling_mode=pooling_mode, **config_kwargs)
        encoder = LLM2Vec4CXRModel(config)
        backbone, info = AutoModel.from_pretrained(path, config=config.backbone_config, output_loading_info=True,
                                                   **remote)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path, **remote)
    missing = [key for key in info.get("missing_keys", []) if "rotary" not in key]
    if missing:
        raise ValueError(
            f"{path} is missing backbone weights {missing[:10]}: is it a decoder checkpoint of this family?"
        )
    encoder.model = backbone
    encoder.set_tokenizer(tokenizer)
    return encoder
