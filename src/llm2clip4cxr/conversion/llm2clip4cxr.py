"""The published LLM2CLIP4CXR state dict (EVA02-CLIP-L/14 `visual.*`, the text adapter `text.projection.*`,
`logit_scale` and the text tower's LoRA deltas) plus a converted LLM2Vec4CXR folder -> an `LLM2CLIP4CXRModel`
checkpoint with an EVA02 vision tower, the LoRA merged into the text tower: load -> rename (`KEY_MAPPING`) ->
check -> save. Every key of the source is accounted for: an unknown, missing or mis-shaped key is an error
naming it (docs/compatibility.md lists the keys).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.initialization import no_init_weights

from ..checkpoints import check_model_folder
from ..modeling.configuration_eva02 import EVA02VisionConfig
from ..modeling.configuration_llm2clip4cxr import LLM2CLIP4CXRConfig
from ..modeling.modeling_eva02 import eva02_rope_tables
from ..modeling.modeling_llm2clip4cxr import LLM2CLIP4CXRModel
from ..modeling.modeling_llm2vec4cxr import CheckpointMismatchError, LLM2Vec4CXRModel
from ..modeling.processing_llm2clip4cxr import LLM2CLIP4CXRImageProcessor, LLM2CLIP4CXRProcessor
from .weights import check_keys, load_state_dict_file, refuse_output_over_input, rename_keys, save_atomically, shown

__all__ = ["KEY_MAPPING", "convert_llm2clip4cxr"]

# The published LLM2CLIP4CXR: LoRA (r=16, alpha=32) on q/k/v/o of the text tower, adapter "llm2clip";
# EVA02-CLIP-L/14 with 64-wide heads whose rotary frequencies were pretrained on a 16x16 grid (224 / 14).
PUBLISHED_LORA_ALPHA = 32.0
PUBLISHED_ADAPTER_NAME = "llm2clip"
PUBLISHED_VISION_HEAD_DIM = 64
PUBLISHED_ROPE_PRETRAIN_GRID = 16

# The text tower inside the published model: `text.core` (`text.model` is an alias of it, saved twice), a
# PEFT-wrapped decoder (LoRA on) or the plain one (LoRA off).
_TEXT = r"text\.(?:core|model)\."
_DECODER = r"(?:model\.base_model\.model\.|model\.)"

# Published key -> LLM2CLIP4CXRModel key; the first pattern matching the whole key wins. Two kinds of target
# are not loaded as they are: `rope.cos`/`rope.sin` (EVA02's stored rotary tables, checked against the ones
# the config gives) and `lora:<adapter>:<A|B>:<text-tower module>` (LoRA factors, merged into the tower).
# `text_model.*` weights must equal the --text-model they were trained from.
KEY_MAPPING = (
    (r"visual\.(?:blocks\.\d+\.attn\.)?rope\.freqs_(cos|sin)", r"rope.\1"),
    (r"visual\.head\.(.+)", r"visual_projection.\1"),
    # Original EVA-CLIP names the query/value biases q_bias/v_bias; the LLM2CLIP4CXR code q_proj/v_proj.bias.
    (r"visual\.(.+)\.attn\.([qv])_bias", r"vision_model.\1.attn.\2_proj.bias"),
    (r"visual\.(.+)", r"vision_model.\1"),
    (r"text\.projection\.(.+)", r"text_projection.\1"),
    (r"logit_scale", r"logit_scale"),
    (_TEXT + _DECODER + r"(.+)\.lora_([AB])\.([^.]+)\.weight", r"lora:\3:\2:model.\1"),
    (_TEXT + r"(.+)\.lora_([AB])\.([^.]+)\.weight", r"lora:\3:\2:\1"),
    (_TEXT + _DECODER + r"(.+?)(?:\.base_layer)?\.(weight|bias)", r"text_model.model.\1.\2"),
    (_TEXT + _DECODER + r"(.+)", r"text_model.model.\1"),
    (_TEXT + r"(.+)", r"text_model.\1"),
)


@dataclass
class _Published:
    """The published state dict sorted by what conversion does with each part."""

    visual: dict = field(default_factory=dict)  # original `visual.*` keys (the tower's sizes are read off them)
    loaded: dict = field(default_factory=dict)  # LLM2CLIP4CXRModel key -> tensor: vision, projections, logit scale
    rope: dict = field(default_factory=dict)  # original key -> stored rotary table
    text: dict = field(default_factory=dict)  # original key -> (LLM2Vec4CXRModel key, tensor)
    lora: dict = field(default_factory=dict)  # (text-tower module, adapter) -> {"A": tensor, "B": tensor}


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
    refuse_output_over_input(destination, state_dict_path, text_model)
    published = _sort(load_state_dict_file(state_dict_path), state_dict_path)
    text = LLM2Vec4CXRModel.from_pretrained(check_model_folder(text_model, "--text-model"), trust_remote_code=False)
    if text.tokenizer is None:
        raise ValueError(f"{text_model} has no tokenizer files, which the converted checkpoint needs.")

    vision_config = _eva02_config_from_weights(published.visual, published.rope, rope_pretrain_grid, vision_head_dim)
    _check_rope_tables(published.rope, vision_config, rope_pretrain_grid)
    _check_text_tower(text, published.text, state_dict_path)
    merged_adapter = _merge_lora(text, published.lora, adapter_name, lora_alpha, state_dict_path)
    model, logit_scale = _vision_language_model(text, vision_config, published, state_dict_path)
    processor = LLM2CLIP4CXRProcessor(
        image_processor=LLM2CLIP4CXRImageProcessor(
            size={"height": vision_config.image_size, "width": vision_config.image_size}
        ),
        tokenizer=text.tokenizer,
        instruction_separator=text.config.instruction_separator,
        max_seq_length=text.config.max_seq_length,
        embed_mask_rule=text.config.embed_mask_rule,
        default_instruction=text.config.default_instruction,
    )

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    save_atomically(destination, overwrite, write)
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
        "projection_dim": model.config.projection_dim,
        "logit_scale": logit_scale,
        "merged_lora_adapter": merged_adapter,
        "merged_lora_modules": sum(1 for _, adapter in published.lora if adapter == merged_adapter),
        "checked_text_keys": len(published.text),
        "vision_keys": len(published.visual),
        "rope_tables_checked": len(published.rope),
    }


def _sort(weights: dict[str, torch.Tensor], source: Path) -> _Published:
    """Rename every published key by `KEY_MAPPING` and sort it by what conversion does with it."""
    renamed, unknown = rename_keys(weights, KEY_MAPPING)
    if unknown:
        raise CheckpointMismatchError(
            f"{source} has keys the published LLM2CLIP4CXR does not: {shown(unknown)}. Expected only "
            "visual.*, text.projection.*, logit_scale and text.core.* / text.model.* (see docs/compatibility.md)."
        )
    published = _Published()
    for key, target in renamed.items():
        value = weights[key]
        if key.startswith("visual.") and not target.startswith("rope."):
            published.visual[key] = value
        if target.startswith("rope."):
            published.rope[key] = value
        elif target.startswith("lora:"):
            _, adapter, which, module = target.split(":", 3)
            # `text.model` is an alias of `text.core` in the original module: both copies must agree.
            seen = published.lora.setdefault((module, adapter), {}).setdefault(which, value)
            if seen is not value and not torch.equal(seen, value):
                raise CheckpointMismatchError(
                    f"{source}: the text.core and text.model copies of {key.split('.', 2)[2]} differ."
                )
        elif target.startswith("text_model."):
            published.text[key] = (target[len("text_model.") :], value)
        else:
            published.loaded[target] = value
    return published


def _eva02_config_from_weights(
    visual: dict[str, torch.Tensor], rope: dict[str, torch.Tensor], rope_pretrain_grid: int, head_dim: int
) -> EVA02VisionConfig:
    """Sizes of the EVA02 tower read off its weights (and the head size off the stored rotary tables)."""
    for key in (
        "visual.cls_token",
        "visual.pos_embed",
        "visual.patch_embed.proj.weight",
        "visual.blocks.0.mlp.w1.weight",
    ):
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


def _check_rope_tables(rope: dict[str, torch.Tensor], config: EVA02VisionConfig, rope_pretrain_grid: int) -> None:
    """The stored rotary tables must be the ones the converted tower computes from its config."""
    if not rope:
        return
    cos, sin = eva02_rope_tables(config)
    for key, value in rope.items():
        reference = cos if key.endswith("cos") else sin
        if value.shape != reference.shape or not torch.allclose(value.float(), reference, atol=1e-4):
            raise CheckpointMismatchError(
                f"{key} differs from the rotary table of an EVA02 tower with image_size {config.image_size}, "
                f"patch_size {config.patch_size}, head size {config.hidden_size // config.num_attention_heads} "
                f"pretrained on a {rope_pretrain_grid}x{rope_pretrain_grid} grid: check --rope-pretrain-grid."
            )


def _check_text_tower(text: LLM2Vec4CXRModel, text_weights: dict, source: Path) -> None:
    """The text weights the state dict carries must be those of `text` (the tower it was trained from)."""
    text_state = text.state_dict()
    unknown, differing = [], []
    for key, (target, value) in text_weights.items():
        if target not in text_state:
            unknown.append(key)
            continue
        reference = text_state[target]
        # Compare at the lower of the two precisions: a bf16 tower saved in fp32 is still the same tower.
        dtype = value.dtype if value.element_size() < reference.element_size() else reference.dtype
        if value.shape != reference.shape or not torch.equal(value.to(dtype), reference.to(dtype)):
            differing.append(key)
    if unknown:
        raise CheckpointMismatchError(f"{source}: text-tower keys that LLM2Vec4CXR does not have: {shown(unknown)}.")
    if differing:
        raise CheckpointMismatchError(
            f"{source}: its text-tower weights differ from --text-model ({shown(differing)}): give the LLM2Vec4CXR "
            "checkpoint this model was trained from, converted with `llm2clip4cxr convert llm2vec4cxr`."
        )


def _merge_lora(text: LLM2Vec4CXRModel, lora: dict, adapter_name: str, lora_alpha: float, source: Path) -> str | None:
    """Merge the chosen LoRA adapter into `text` in place (`W + lora_alpha / r * B @ A`); returns its name."""
    if not lora:
        return None
    adapters = sorted({adapter for _, adapter in lora})
    if adapter_name not in adapters:
        if len(adapters) != 1:
            raise ValueError(
                f"{source} has LoRA adapters {adapters} but not {adapter_name!r}: choose one with --adapter-name."
            )
        adapter_name = adapters[0]
    parameters = dict(text.named_parameters())
    for (module, adapter), pair in sorted(lora.items()):
        if adapter != adapter_name:
            continue
        if set(pair) != {"A", "B"}:
            raise CheckpointMismatchError(
                f"{source}: LoRA of {module} (adapter {adapter}) lacks lora_{'B' if 'A' in pair else 'A'}."
            )
        if module + ".weight" not in parameters:
            raise CheckpointMismatchError(f"{source}: LoRA on {module}, which the text tower does not have.")
        weight = parameters[module + ".weight"]
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


def _vision_language_model(
    text: LLM2Vec4CXRModel, vision_config: EVA02VisionConfig, published: _Published, source: Path
) -> tuple[LLM2CLIP4CXRModel, float]:
    """The LLM2CLIP4CXRModel around `text`, its vision tower, projections and logit scale loaded (and checked)."""
    if "visual.head.weight" not in published.visual:
        raise CheckpointMismatchError(f"{source} has no visual.head.weight (the image projection).")
    logit_scale = float(published.loaded.get("logit_scale", torch.tensor(math.log(1 / 0.07))))
    config = LLM2CLIP4CXRConfig(
        text_config=text.config,
        vision_config=vision_config,
        projection_dim=published.visual["visual.head.weight"].shape[0],
        visual_projection_bias="visual.head.bias" in published.visual,
        logit_scale_init_value=min(logit_scale, math.log(100.0)),
    )
    with no_init_weights():
        model = LLM2CLIP4CXRModel(config, text_model=text)
    expected = {key: value.shape for key, value in model.state_dict().items() if not key.startswith("text_model.")}
    check_keys(f"{source}: the vision tower, projections and logit_scale", published.loaded, expected)
    model.load_state_dict(published.loaded, strict=False)
    return model.eval(), logit_scale
