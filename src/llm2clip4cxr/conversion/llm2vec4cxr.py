"""The published LLM2Vec4CXR Hub folder (a plain decoder `config.json`, tokenizer files and one safetensors file
holding the backbone and `latent_attn.*`) -> an `LLM2Vec4CXRModel` checkpoint with latent-attention pooling and
the `!@#$%^&*()` instruction separator: load -> rename (`KEY_MAPPING`) -> check -> save.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.initialization import no_init_weights

from ..checkpoints import read_json_object
from ..modeling.configuration_llm2vec4cxr import SUPPORTED_BACKBONES, LLM2Vec4CXRConfig
from ..modeling.modeling_llm2vec4cxr import CheckpointMismatchError, LatentAttentionPooling, LLM2Vec4CXRModel
from .weights import (
    check_keys,
    expected_shapes,
    load_folder_weights,
    refuse_output_over_input,
    rename_keys,
    save_atomically,
)

__all__ = ["KEY_MAPPING", "convert_llm2vec4cxr"]

# Sizes of the published latent-attention head that its weights do not reveal (LLM2Vec's defaults).
PUBLISHED_LATENT_ATTENTION_HEADS = 8
BACKBONE, LATENT = "model.", "latent_attn."

# Published key -> LLM2Vec4CXRModel key; the first pattern matching the whole key wins, None drops the key.
KEY_MAPPING = (
    (r"lm_head\.weight", None),  # a decoder saved as a causal LM carries an output head the encoder never uses
    (r"latent_attn\.(.+)", r"latent_attn.\1"),  # the latent-attention pooling head
    (r"model\.(.+)", r"model.\1"),  # the decoder saved from a causal LM (LlamaForCausalLM, ...)
    (r"(.+)", r"model.\1"),  # the decoder saved bare (LLM2Vec's LlamaBiModel)
)


def convert_llm2vec4cxr(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    pooling_mode: str | None = None,
    latent_attention_heads: int = PUBLISHED_LATENT_ATTENTION_HEADS,
    max_seq_length: int = 512,
    overwrite: bool = False,
) -> dict:
    """Convert a published LLM2Vec4CXR folder into an `LLM2Vec4CXRModel` checkpoint.

    The published folder does not store its pooling mode (the original loader falls back to mean pooling
    when not told): a folder with `latent_attn.*` weights converts to latent-attention pooling, and any other
    `pooling_mode` is refused; a folder without them needs `pooling_mode` given. The tokenizer pads with eos,
    as the original loader sets it; texts are `instruction + " !@#$%^&*()" + report` as before.

    Args:
        source: the published folder (`config.json` of a plain decoder, tokenizer files, weights).
        destination: the output folder (must not exist unless `overwrite`).
        pooling_mode: see above.
        latent_attention_heads: heads of the latent attention (not stored in the weights; 8 when published).
        max_seq_length: longest tokenized input (512 when published).
        overwrite: replace an existing `destination`.

    Returns:
        A summary: pooling mode, sizes, key counts and the keys dropped (an unused `lm_head.weight`).
    """
    source, destination = Path(source), Path(destination)
    backbone_config = _published_backbone_config(source)
    refuse_output_over_input(destination, source)
    weights = load_folder_weights(source)
    renamed, _ = rename_keys(weights, KEY_MAPPING)  # the last pattern matches every key
    dropped = sorted(key for key, target in renamed.items() if target is None)
    backbone = _part(weights, renamed, BACKBONE)
    latent = _part(weights, renamed, LATENT)
    check_keys(
        f"{source}: the backbone weights do not fit its {backbone_config.model_type} config.json",
        backbone,
        expected_shapes(lambda: AutoModel.from_config(backbone_config)),
    )
    pooling_mode, num_latents, latent_mlp_dim = _pooling(source, latent, pooling_mode, latent_attention_heads)
    config = LLM2Vec4CXRConfig(
        backbone_config=backbone_config,
        pooling_mode=pooling_mode,
        num_latents=num_latents,
        latent_attention_heads=latent_attention_heads,
        latent_mlp_dim=latent_mlp_dim,
        max_seq_length=max_seq_length,
        bidirectional=True,
        # The published model pools the last k tokens, k = the report's token count when tokenized alone;
        # keeping that rule reproduces its embeddings exactly (see EMBED_MASK_RULES).
        embed_mask_rule="report_token_count",
    )
    dtype = next(iter(backbone.values())).dtype
    with no_init_weights():
        model = LLM2Vec4CXRModel(config)
    model.to(dtype)
    model.load_state_dict({target: weights[key] for key, target in renamed.items() if target is not None}, strict=True)
    model.eval()
    model.set_tokenizer(_published_tokenizer(source))
    save_atomically(destination, overwrite, model.save_pretrained)
    return {
        "source": str(source),
        "destination": str(destination),
        "pooling_mode": pooling_mode,
        "num_latents": num_latents if latent else None,
        "latent_attention_heads": latent_attention_heads if latent else None,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": backbone_config.num_hidden_layers,
        "instruction_separator": config.instruction_separator,
        "embed_mask_rule": config.embed_mask_rule,
        "dtype": str(dtype).replace("torch.", ""),
        "backbone_keys": len(backbone),
        "latent_attention_keys": len(latent),
        "dropped_keys": dropped,
    }


def _published_backbone_config(source: Path):
    """The plain decoder config of a published folder, without the LLM2Vec classes it may name."""
    config_file = source / "config.json"
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such directory (give the published LLM2Vec4CXR folder).")
    if not config_file.is_file():
        raise FileNotFoundError(f"{source} has no config.json: give the published LLM2Vec4CXR folder.")
    model_type = read_json_object(config_file).get("model_type")
    if model_type == LLM2Vec4CXRConfig.model_type:
        raise ValueError(f"{source} is already an LLM2Vec4CXR checkpoint of this package: load it as it is.")
    if model_type not in SUPPORTED_BACKBONES:
        raise ValueError(
            f"{source}/config.json has model_type {model_type!r}; the published LLM2Vec4CXR has a plain decoder "
            f"config, one of {SUPPORTED_BACKBONES}."
        )
    # Plain Llama/Mistral/Qwen configs: transformers' own classes; no code from the folder runs.
    backbone_config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    # The published config may name LLM2Vec's classes, which this package does not use.
    backbone_config.architectures = None
    if hasattr(backbone_config, "auto_map"):
        delattr(backbone_config, "auto_map")
    return backbone_config


def _part(weights: dict, renamed: dict, prefix: str) -> dict:
    """The weights renamed into one submodule, keyed by their name inside it (as the error messages show them)."""
    return {
        target[len(prefix) :]: weights[key] for key, target in renamed.items() if target and target.startswith(prefix)
    }


def _pooling(source: Path, latent: dict, pooling_mode: str | None, heads: int) -> tuple[str, int, int | None]:
    """(pooling mode, num_latents, latent MLP width): latent attention when the folder has its trained weights
    (which are then checked), else the mode the caller names."""
    if latent:
        if pooling_mode not in (None, "latent_attention"):
            raise ValueError(
                f"{source} holds trained latent-attention weights (latent_attn.*): converting with pooling_mode "
                f"{pooling_mode!r} would discard them. Leave the pooling mode unset (latent_attention)."
            )
        for key in ("latents", "mlp.0.weight"):
            if key not in latent:
                raise CheckpointMismatchError(f"{source}: the latent-attention weights lack {LATENT}{key}.")
        num_latents, hidden_size = latent["latents"].shape
        latent_mlp_dim = latent["mlp.0.weight"].shape[0]
        check_keys(
            f"{source}: the latent-attention weights",
            latent,
            expected_shapes(lambda: LatentAttentionPooling(hidden_size, num_latents, heads, latent_mlp_dim)),
        )
        return "latent_attention", num_latents, latent_mlp_dim
    if pooling_mode is None:
        raise ValueError(
            f"{source} has no latent_attn.* weights and does not store its pooling mode: pass the one it was "
            "trained with (--pooling-mode mean, eos or weighted_mean)."
        )
    if pooling_mode == "latent_attention":
        raise ValueError(f"pooling_mode 'latent_attention' needs latent_attn.* weights, which {source} lacks.")
    return pooling_mode, 512, None


def _published_tokenizer(source: Path):
    """The folder's Llama/Mistral/Qwen tokenizer, padding with eos as the original loader sets it."""
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    if tokenizer.eos_token is None:
        raise ValueError(f"The tokenizer of {source} has no eos token, which the published model pads with.")
    # It pads on the left, which this package's pooling does not need (it follows the masks on either side).
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
