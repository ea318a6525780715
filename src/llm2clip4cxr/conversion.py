"""Converters from the authors' published weights to checkpoints of this package.

- `convert_llm2vec4cxr`: the published LLM2Vec4CXR Hub folder (a plain decoder `config.json`, tokenizer files
  and one safetensors file holding the backbone and `latent_attn.*`) -> an `LLM2Vec4CXRModel` checkpoint with
  latent-attention pooling and the `!@#$%^&*()` instruction separator.
- `convert_llm2clip4cxr`: the published LLM2CLIP4CXR state dict (EVA02-CLIP-L/14 `visual.*`, the text adapter
  `text.projection.*`, `logit_scale` and the text tower's LoRA deltas) plus a converted LLM2Vec4CXR folder ->
  an `LLM2CLIP4CXRModel` checkpoint with an EVA02 vision tower, the LoRA merged into the text tower.

Every key of the source is accounted for: an unknown, missing or mis-shaped key is an error naming it.
docs/compatibility.md lists the key tables.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.initialization import no_init_weights

from .checkpoints import check_model_folder, check_safetensors_file, read_json_object
from .errors import InputError
from .fileio import atomic_write_folder
from .modeling.configuration_eva02 import EVA02VisionConfig
from .modeling.configuration_llm2clip4cxr import LLM2CLIP4CXRConfig
from .modeling.configuration_llm2vec4cxr import SUPPORTED_BACKBONES, LLM2Vec4CXRConfig
from .modeling.modeling_eva02 import eva02_rope_tables
from .modeling.modeling_llm2clip4cxr import LLM2CLIP4CXRModel
from .modeling.modeling_llm2vec4cxr import CheckpointMismatchError, LatentAttentionPooling, LLM2Vec4CXRModel
from .modeling.processing_llm2clip4cxr import LLM2CLIP4CXRImageProcessor, LLM2CLIP4CXRProcessor

# Sizes of the published latent-attention head that its weights do not reveal (LLM2Vec's defaults).
PUBLISHED_LATENT_ATTENTION_HEADS = 8
# The published LLM2CLIP4CXR: LoRA (r=16, alpha=32) on q/k/v/o of the text tower, adapter "llm2clip";
# EVA02-CLIP-L/14 with 64-wide heads whose rotary frequencies were pretrained on a 16x16 grid (224 / 14).
PUBLISHED_LORA_ALPHA = 32.0
PUBLISHED_ADAPTER_NAME = "llm2clip"
PUBLISHED_VISION_HEAD_DIM = 64
PUBLISHED_ROPE_PRETRAIN_GRID = 16
# A decoder saved as a causal LM carries an output head the encoder never uses.
UNUSED_LM_HEAD_KEYS = ("lm_head.weight",)
LATENT_PREFIX = "latent_attn."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.(?P<adapter>[^.]+)\.weight$")
_SHOWN = 20


# ---------------------------------------------------------------------------------------------- loading


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file or of a PyTorch pickle loaded with `torch.load(weights_only=True)`.

    A training checkpoint `{"state_dict": ..., "optimizer": ...}` gives its `state_dict`; a `module.` prefix
    (DistributedDataParallel) is removed. A pickle that needs arbitrary code to load is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No state dict file at {path}.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        check_safetensors_file(path)  # a truncated, empty or pickled file: CorruptFileError naming it
        return load_file(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} is a pickle that needs code to load, which is refused: a file that needs arbitrary code to load "
            f"could execute anything (torch.load(weights_only=True): {str(error).splitlines()[0]}). Only plain tensors can be read: "
            "in an environment you trust, load it and re-save `torch.save(state_dict, 'weights.pt')` with "
            "tensor values only, or save it as safetensors."
        ) from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state dict (a mapping of names to tensors).")
    not_tensors = sorted(key for key, value in loaded.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise ValueError(f"{path}: these entries are not tensors, so it is not a state dict: {_shown(not_tensors)}.")
    state_dict = dict(loaded)
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module.") :]: value for key, value in state_dict.items()}
    return state_dict


def _load_folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a Hub folder: `model.safetensors`, its shards, or `pytorch_model.bin`."""
    from safetensors.torch import load_file

    single = folder / "model.safetensors"
    if single.is_file():
        check_safetensors_file(single)
        return load_file(single)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json_object(index).get("weight_map", {}).values()))
        weights = {}
        for shard in shards:
            check_safetensors_file(folder / shard)
            weights.update(load_file(folder / shard))
        return weights
    if (folder / "pytorch_model.bin").is_file():
        return load_state_dict_file(folder / "pytorch_model.bin")
    raise FileNotFoundError(
        f"{folder} has no weights: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin."
    )


def _shown(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:_SHOWN]) + (f" ... ({len(keys)} in all)" if len(keys) > _SHOWN else "")


def _check_keys(what: str, given: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size]) -> None:
    """Raise `CheckpointMismatchError` naming the missing, unexpected and mis-shaped keys of `given`."""
    problems = []
    missing = set(expected) - set(given)
    unexpected = set(given) - set(expected)
    mismatched = [
        f"{key} (checkpoint {tuple(given[key].shape)} vs expected {tuple(expected[key])})"
        for key in sorted(set(given) & set(expected))
        if tuple(given[key].shape) != tuple(expected[key])
    ]
    if missing:
        problems.append(f"missing keys: {_shown(missing)}")
    if unexpected:
        problems.append(f"unknown keys: {_shown(unexpected)}")
    if mismatched:
        problems.append(f"size-mismatched keys: {', '.join(mismatched[:_SHOWN])}")
    if problems:
        raise CheckpointMismatchError(f"{what}: " + "; ".join(problems) + ".")


def _expected_shapes(build: Callable[[], torch.nn.Module]) -> dict[str, torch.Size]:
    """Parameter and persistent-buffer shapes of a module built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        module = build()
    return {key: value.shape for key, value in module.state_dict().items()}


def _refuse_output_over_input(destination: Path, *inputs) -> None:
    """Writing the destination replaces the whole folder: it must not be, or hold, one of the inputs."""
    target = destination.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if target == source or target in source.parents:
            raise InputError(
                f"the destination {destination} is (or contains) the input {given}, which converting would "
                "delete; choose another output folder."
            )


def _save_atomically(destination: Path, overwrite: bool, write: Callable[[Path], None]) -> None:
    """`write(folder)` into a temporary sibling of `destination`, then rename it into place."""
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination} already exists: choose another output folder or pass --overwrite.")
    atomic_write_folder(destination, write)


# ---------------------------------------------------------------------------------------------- LLM2Vec4CXR


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
    config_file = source / "config.json"
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such directory (give the published LLM2Vec4CXR folder).")
    if not config_file.is_file():
        raise FileNotFoundError(f"{source} has no config.json: give the published LLM2Vec4CXR folder.")
    _refuse_output_over_input(destination, source)
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
    for attribute in ("auto_map",):
        if hasattr(backbone_config, attribute):
            delattr(backbone_config, attribute)
    weights = _load_folder_weights(source)

    latent = {key[len(LATENT_PREFIX) :]: value for key, value in weights.items() if key.startswith(LATENT_PREFIX)}
    dropped = sorted(key for key in weights if key in UNUSED_LM_HEAD_KEYS)
    backbone = {key: value for key, value in weights.items() if not key.startswith(LATENT_PREFIX) and key not in dropped}
    # Saved from the bare decoder (`LlamaBiModel`) the keys have no prefix; from a causal LM they start with "model.".
    if backbone and all(key.startswith("model.") for key in backbone):
        backbone = {key[len("model.") :]: value for key, value in backbone.items()}
    _check_keys(
        f"{source}: the backbone weights do not fit its {model_type} config.json",
        backbone,
        _expected_shapes(lambda: AutoModel.from_config(backbone_config)),
    )

    if latent:
        if pooling_mode not in (None, "latent_attention"):
            raise ValueError(
                f"{source} holds trained latent-attention weights (latent_attn.*): converting with pooling_mode "
                f"{pooling_mode!r} would discard them. Leave the pooling mode unset (latent_attention)."
            )
        pooling_mode = "latent_attention"
        for key in ("latents", "mlp.0.weight"):
            if key not in latent:
                raise CheckpointMismatchError(f"{source}: the latent-attention weights lack {LATENT_PREFIX}{key}.")
        num_latents, hidden_size = latent["latents"].shape
        latent_mlp_dim = latent["mlp.0.weight"].shape[0]
        _check_keys(
            f"{source}: the latent-attention weights",
            latent,
            _expected_shapes(
                lambda: LatentAttentionPooling(hidden_size, num_latents, latent_attention_heads, latent_mlp_dim)
            ),
        )
    else:
        if pooling_mode is None:
            raise ValueError(
                f"{source} has no latent_attn.* weights and does not store its pooling mode: pass the one it was "
                "trained with (--pooling-mode mean, eos or weighted_mean)."
            )
        if pooling_mode == "latent_attention":
            raise ValueError(f"pooling_mode 'latent_attention' needs latent_attn.* weights, which {source} lacks.")
        num_latents, latent_mlp_dim = 512, None

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
    state_dict = {f"model.{key}": value for key, value in backbone.items()}
    state_dict.update({f"{LATENT_PREFIX}{key}": value for key, value in latent.items()})
    model.load_state_dict(state_dict, strict=True)
    model.eval()

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)  # a Llama/Mistral/Qwen tokenizer
    if tokenizer.eos_token is None:
        raise ValueError(f"The tokenizer of {source} has no eos token, which the published model pads with.")
    # As the original loader: pad with eos. It pads on the left, which this package's pooling does not need
    # (it follows the masks on either side).
    tokenizer.pad_token = tokenizer.eos_token
    model.set_tokenizer(tokenizer)

    _save_atomically(destination, overwrite, model.save_pretrained)
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


# ---------------------------------------------------------------------------------------------- LLM2CLIP4CXR

_ROPE_KEY = re.compile(r"^visual\.(?:blocks\.\d+\.attn\.)?rope\.freqs_(?P<which>cos|sin)$")
_TEXT_PREFIXES = ("text.core.", "text.model.")
# Inside the text tower: a PEFT-wrapped decoder (LoRA on) or the plain one (LoRA off).
_TEXT_BACKBONE_PREFIXES = ("model.base_model.model.", "model.")


def _vision_key(key: str) -> str:
    """Name of a published `visual.*` weight in `LLM2CLIP4CXRModel`."""
    rest = key[len("visual.") :]
    if rest.startswith("head."):
        return "visual_projection." + rest[len("head.") :]
    # Original EVA-CLIP names the query/value biases q_bias/v_bias; the LLM2CLIP4CXR code q_proj/v_proj.bias.
    rest = re.sub(r"\.attn\.(q|v)_bias$", r".attn.\1_proj.bias", rest)
    return "vision_model." + rest


def _eva02_config_from_weights(visual: Mapping[str, torch.Tensor], rope: Mapping[str, torch.Tensor], rope_pretrain_grid: int, head_dim: int) -> EVA02VisionConfig:
    """Sizes of the EVA02 tower read off its weights (and the head size off the stored rotary tables)."""
    for key in ("visual.cls_token", "visual.pos_embed", "visual.patch_embed.proj.weight", "visual.blocks.0.mlp.w1.weight"):
        if key not in visual:
            raise CheckpointMismatchError(
                f"The state dict has no {key}: it is not the published EVA02 LLM2CLIP4CXR (missing vision keys)."
            )
    hidden_size = visual["visual.cls_token"].shape[-1]
    _, num_channels, patch_size, _ = visual["visual.patch_embed.proj.weight"].shape
    num_positions = visual["visual.pos_embed"].shape[1] - 1
    grid = math.isqrt(num_positions)
    if grid * grid != num_positions:
        raise CheckpointMismatchError(f"visual.pos_embed has {num_positions} patch positions, not a square grid.")
    layers = 1 + max(int(match.group(1)) for key in visual if (match := re.match(r"visual\.blocks\.(\d+)\.", key)))
    if rope:
        head_dim = next(iter(rope.values())).shape[-1]
    return EVA02VisionConfig(
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // head_dim,
        intermediate_size=visual["visual.blocks.0.mlp.w1.weight"].shape[0],
        image_size=grid * patch_size,
        patch_size=patch_size,
        num_channels=num_channels,
        rope_pretrain_grid=rope_pretrain_grid,
        qkv_bias=any(key in visual for key in ("visual.blocks.0.attn.q_proj.bias", "visual.blocks.0.attn.q_bias")),
    )


def convert_llm2clip4cxr(
    state_dict_path: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    text_model: str | os.PathLike,
    adapter_name: str = PUBLISHED_ADAPTER_NAME,
    lora_alpha: float = PUBLISHED_LORA_ALPHA,
    vision_head_dim: int = PUBLISHED_VISION_HEAD_DIM,
    rope_pretrain_grid: int = PUBLISHED_ROPE_PRETRAIN_GRID,
    overwrite: bool = False,
) -> dict:
    """Convert the published LLM2CLIP4CXR state dict into an `LLM2CLIP4CXRModel` checkpoint.

    The state dict is loaded with `torch.load(weights_only=True)` (pickles needing code are refused). Its
    `visual.*` weights become an EVA02 vision tower (`visual.head` its bias-carrying projection),
    `text.projection.*` the text adapter and `logit_scale` the temperature. The text tower comes from
    `text_model` (a converted LLM2Vec4CXR folder, as the original loads it from the Hub): the text weights the
    state dict also carries must equal it, and its LoRA deltas of adapter `adapter_name` are merged in
    (`W + lora_alpha / r * B @ A`).

    Args:
        state_dict_path: the published `.bin`/`.pt` (or a `.safetensors`) state dict.
        destination: the output folder (must not exist unless `overwrite`).
        text_model: the converted LLM2Vec4CXR folder (`llm2clip4cxr convert llm2vec4cxr`).
        adapter_name: the LoRA adapter to merge; when absent and the state dict has exactly one, that one.
        lora_alpha: LoRA alpha of training (32 when published; r is read off the weights).
        vision_head_dim: head size of the vision tower, used when the state dict has no rotary tables.
        rope_pretrain_grid: patch grid the rotary frequencies were pretrained at (16 for EVA02-CLIP-L/14).
        overwrite: replace an existing `destination`.

    Returns:
        A summary: vision sizes, the merged adapter, key counts.
    """
    state_dict_path, destination = Path(state_dict_path), Path(destination)
    _refuse_output_over_input(destination, state_dict_path, text_model)
    weights = load_state_dict_file(state_dict_path)
    text = LLM2Vec4CXRModel.from_pretrained(check_model_folder(text_model, "--text-model"), trust_remote_code=False)
    if text.tokenizer is None:
        raise ValueError(f"{text_model} has no tokenizer files, which the converted checkpoint needs.")

    visual, rope, heads, text_weights, lora, unknown = {}, {}, {}, {}, {}, []
    for key, value in weights.items():
        if _ROPE_KEY.match(key):
            rope[key] = value
        elif key.startswith("visual."):
            visual[key] = value
        elif key.startswith("text.projection."):
            heads["text_projection." + key[len("text.projection.") :]] = value
        elif key == "logit_scale":
            heads[key] = value
        elif key.startswith(_TEXT_PREFIXES):
            rest = key.split(".", 2)[2]
            match = _LORA_KEY.match(rest)
            if match:
                # `text.model` is an alias of `text.core` in the original module: both copies must agree.
                pair = lora.setdefault((match["module"], match["adapter"]), {})
                seen = pair.setdefault(match["which"], value)
                if seen is not value and not torch.equal(seen, value):
                    raise CheckpointMismatchError(
                        f"{state_dict_path}: the text.core and text.model copies of {rest} differ."
                    )
            else:
                text_weights[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointMismatchError(
            f"{state_dict_path} has keys the published LLM2CLIP4CXR does not: {_shown(unknown)}. Expected only "
            "visual.*, text.projection.*, logit_scale and text.core.* / text.model.* (see docs/compatibility.md)."
        )

    vision_config = _eva02_config_from_weights(visual, rope, rope_pretrain_grid, vision_head_dim)
    if rope:
        cos, sin = eva02_rope_tables(vision_config)
        for key, value in rope.items():
            reference = cos if key.endswith("cos") else sin
            if value.shape != reference.shape or not torch.allclose(value.float(), reference, atol=1e-4):
                raise CheckpointMismatchError(
                    f"{key} differs from the rotary table of an EVA02 tower with image_size "
                    f"{vision_config.image_size}, patch_size {vision_config.patch_size}, head size "
                    f"{vision_config.hidden_size // vision_config.num_attention_heads} pretrained on a "
                    f"{rope_pretrain_grid}x{rope_pretrain_grid} grid: check --rope-pretrain-grid."
                )

    merged_adapter = _merge_text_tower(text, text_weights, lora, adapter_name, lora_alpha, state_dict_path)

    if "visual.head.weight" not in visual:
        raise CheckpointMismatchError(f"{state_dict_path} has no visual.head.weight (the image projection).")
    logit_scale = float(heads.get("logit_scale", torch.tensor(math.log(1 / 0.07))))
    config = LLM2CLIP4CXRConfig(
        text_config=text.config,
        vision_config=vision_config,
        projection_dim=visual["visual.head.weight"].shape[0],
        visual_projection_bias="visual.head.bias" in visual,
        logit_scale_init_value=min(logit_scale, math.log(100.0)),
    )
    with no_init_weights():
        model = LLM2CLIP4CXRModel(config, text_model=text)
    mapped = {_vision_key(key): value for key, value in visual.items()}
    mapped.update(heads)
    expected = {key: value.shape for key, value in model.state_dict().items() if not key.startswith("text_model.")}
    _check_keys(f"{state_dict_path}: the vision tower, projections and logit_scale", mapped, expected)
    model.load_state_dict(mapped, strict=False)
    model.eval()

    image_processor = LLM2CLIP4CXRImageProcessor(size={"height": vision_config.image_size, "width": vision_config.image_size})
    processor = LLM2CLIP4CXRProcessor(
        image_processor=image_processor,
        tokenizer=text.tokenizer,
        instruction_separator=text.config.instruction_separator,
        max_seq_length=text.config.max_seq_length,
        embed_mask_rule=text.config.embed_mask_rule,
        default_instruction=text.config.default_instruction,
    )

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    _save_atomically(destination, overwrite, write)
    return {
        "source": str(state_dict_path),
        "destination": str(destination),
        "text_model": str(text_model),
        "vision": {
            "model_type": vision_config.model_type,
            "image_size": vision_config.image_size,
            "patch_size": vision_config.patch_size,
            "hidden_size": vision_config.hidden_size,
            "num_hidden_layers": vision_config.num_hidden_layers,
            "num_attention_heads": vision_config.num_attention_heads,
        },
        "projection_dim": config.projection_dim,
        "logit_scale": logit_scale,
        "merged_lora_adapter": merged_adapter,
        "merged_lora_modules": sum(1 for module, adapter in lora if adapter == merged_adapter),
        "checked_text_keys": len(text_weights),
        "vision_keys": len(visual),
        "rope_tables_checked": len(rope),
    }


def _text_target(rest: str) -> str:
    """Name in `LLM2Vec4CXRModel` of a published text-tower weight (after `text.core.`/`text.model.`)."""
    if rest.startswith(LATENT_PREFIX):
        return rest
    for prefix in _TEXT_BACKBONE_PREFIXES:
        if rest.startswith(prefix):
            return "model." + rest[len(prefix) :].replace(".base_layer.", ".")
    return rest


def _merge_text_tower(text, text_weights, lora, adapter_name, lora_alpha, source) -> str | None:
    """Check the state dict's text weights against `text` and merge the chosen LoRA adapter into it."""
    text_state = text.state_dict()
    unknown, differing = [], []
    for key, value in text_weights.items():
        target = _text_target(key.split(".", 2)[2])
        if target not in text_state:
            unknown.append(key)
            continue
        reference = text_state[target]
        # Compare at the lower of the two precisions: a bf16 tower saved in fp32 is still the same tower.
        dtype = value.dtype if value.element_size() < reference.element_size() else reference.dtype
        if value.shape != reference.shape or not torch.equal(value.to(dtype), reference.to(dtype)):
            differing.append(key)
    if unknown:
        raise CheckpointMismatchError(f"{source}: text-tower keys that LLM2Vec4CXR does not have: {_shown(unknown)}.")
    if differing:
        raise CheckpointMismatchError(
            f"{source}: its text-tower weights differ from --text-model ({_shown(differing)}): give the LLM2Vec4CXR "
            "checkpoint this model was trained from, converted with `llm2clip4cxr convert llm2vec4cxr`."
        )
    if not lora:
        return None
    adapters = sorted({adapter for _, adapter in lora})
    if adapter_name not in adapters:
        if len(adapters) != 1:
            raise ValueError(f"{source} has LoRA adapters {adapters} but not {adapter_name!r}: choose one with --adapter-name.")
        adapter_name = adapters[0]
    parameters = dict(text.named_parameters())
    for (module, adapter), pair in sorted(lora.items()):
        if adapter != adapter_name:
            continue
        if set(pair) != {"A", "B"}:
            raise CheckpointMismatchError(f"{source}: LoRA of {module} (adapter {adapter}) lacks lora_{'B' if 'A' in pair else 'A'}.")
        target = _text_target(module) + ".weight"
        if target not in parameters:
            raise CheckpointMismatchError(f"{source}: LoRA on {module}, which the text tower does not have ({target}).")
        weight = parameters[target]
        down, up = pair["A"].float(), pair["B"].float()  # (r, in), (out, r)
        if down.shape[1] != weight.shape[1] or up.shape[0] != weight.shape[0] or up.shape[1] != down.shape[0]:
            raise CheckpointMismatchError(
                f"{source}: LoRA of {module} has shapes A {tuple(down.shape)}, B {tuple(up.shape)}, which do not "
                f"fit its weight {tuple(weight.shape)}."
            )
        # Merged by hand (peft is an optional dependency): PEFT's LoRA adds lora_alpha / r * B @ A.
        with torch.no_grad():
            weight.copy_((weight.float() + (lora_alpha / down.shape[0]) * up @ down).to(weight.dtype))
    return adapter_name


__all__ = ["convert_llm2clip4cxr", "convert_llm2vec4cxr", "load_state_dict_file"]
