"""open_clip checkpoints with a timm ViT vision tower and a Hugging Face BERT text tower (BiomedCLIP) ->
`transformers` `ViTModel` / `BertModel` modules, without open_clip or timm: read the config and weights, build
the modules, map every parameter to its checkpoint entry (`KEY_MAPPING`), check, load.
`evaluation.baselines.BiomedCLIPDualEncoder` runs the result.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer, BertConfig, BertModel, BertTokenizerFast, ViTConfig, ViTModel

from ..checkpoints import remote_code_guard
from .weights import load_state_dict_file, rename_keys

__all__ = [
    "KEY_MAPPING",
    "OPEN_CLIP_CONFIG",
    "OPEN_CLIP_WEIGHTS",
    "OpenClipTowers",
    "load_open_clip",
    "read_open_clip_state_dict",
]

OPEN_CLIP_CONFIG = "open_clip_config.json"
# Preferred first: safetensors cannot run code when read.
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# Checkpoint entries that hold no weight of either tower: the contrastive temperature/bias, and the
# position-id buffer older transformers versions saved with BERT.
_IGNORED_KEYS = frozenset({"logit_scale", "logit_bias", "text.transformer.embeddings.position_ids"})
# timm's ViT sizes: name -> (embed_dim, depth, num_heads); mlp_ratio 4, LayerNorm eps 1e-6, class token.
_TIMM_VIT_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
_TIMM_VIT_NAME = re.compile(r"vit_(tiny|small|base|large|huge)_patch(\d+)_(\d+)(?:[._].*)?")
_TIMM_VIT_KWARGS = ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "mlp_ratio")

# Parameter of the converted modules (`vision`, `vision_head`, `text`, `text_projection`, then the module's own
# key) -> its open_clip checkpoint entry; the first pattern matching the whole name wins. A `#q`/`#k`/`#v`
# suffix takes that third of the entry: timm stores q, k and v stacked in one qkv tensor (3 * width rows).
KEY_MAPPING = (
    (r"vision\.embeddings\.cls_token", r"visual.trunk.cls_token"),
    (r"vision\.embeddings\.position_embeddings", r"visual.trunk.pos_embed"),
    (r"vision\.embeddings\.patch_embeddings\.projection\.(weight|bias)", r"visual.trunk.patch_embed.proj.\1"),
    (r"vision\.layernorm\.(weight|bias)", r"visual.trunk.norm.\1"),
    (r"vision\.layers\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)", r"visual.trunk.blocks.\1.attn.qkv.\3#\2"),
    (r"vision\.layers\.(\d+)\.attention\.o_proj\.(weight|bias)", r"visual.trunk.blocks.\1.attn.proj.\2"),
    (r"vision\.layers\.(\d+)\.layernorm_before\.(weight|bias)", r"visual.trunk.blocks.\1.norm1.\2"),
    (r"vision\.layers\.(\d+)\.layernorm_after\.(weight|bias)", r"visual.trunk.blocks.\1.norm2.\2"),
    (r"vision\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"visual.trunk.blocks.\1.mlp.\2.\3"),
    (r"vision_head\.(.+)", r"visual.head.proj.\1"),
    (r"text\.(.+)", r"text.transformer.\1"),
    (r"text_projection\.(.+)", r"text.proj.\1"),
)
_QKV_PARTS = "qkv"


@dataclass
class OpenClipTowers:
    """The converted modules of an open_clip checkpoint, with its tokenizer and configuration sections."""

    vision: ViTModel
    vision_head: nn.Module
    text: BertModel
    text_projection: nn.Module
    tokenizer: object
    text_cfg: dict
    preprocess_cfg: dict


def load_open_clip(folder: str | os.PathLike) -> OpenClipTowers:
    """Read an open_clip checkpoint folder: `open_clip_config.json`, `open_clip_model.safetensors` (or
    `open_clip_pytorch_model.bin`), the text tokenizer's files (`vocab.txt` + `tokenizer_config.json`, or
    `tokenizer.json`) and optionally the text model's `config.json`.

    Raises:
        FileNotFoundError: a file above is missing.
        ValueError: an unsupported architecture, or weights that do not fit it (every missing, unknown or
            mis-shaped checkpoint key is named).
    """
    folder = Path(folder)
    config_path = folder / OPEN_CLIP_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no {OPEN_CLIP_CONFIG}: not an open_clip checkpoint folder.")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    model_cfg, preprocess_cfg = config.get("model_cfg", config), config.get("preprocess_cfg", {})
    vision_cfg, text_cfg = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}
    if "embed_dim" not in model_cfg:
        raise ValueError(f"{config_path} has no model_cfg.embed_dim.")
    embed_dim = model_cfg["embed_dim"]
    state_dict = read_open_clip_state_dict(folder)
    tokenizer = _load_tokenizer(folder, text_cfg)

    vision = ViTModel(_vision_config(vision_cfg), add_pooling_layer=False)
    vision_head = nn.Linear(vision.config.hidden_size, embed_dim, bias=bool(vision_cfg.get("timm_proj_bias")))
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer in {folder} has no pad token; open_clip pads texts with it.")
    text = BertModel(_text_config(folder, text_cfg, state_dict, tokenizer.pad_token_id), add_pooling_layer=False)
    projection = _text_projection(
        text_cfg.get("hf_proj_type", text_cfg.get("proj")), text.config.hidden_size, embed_dim
    )
    modules = {"vision": vision, "vision_head": vision_head, "text": text, "text_projection": projection}
    architecture = f"vision {vision_cfg.get('timm_model_name')!r}, text {text_cfg.get('hf_model_name')!r}"
    _load_weights(folder, modules, state_dict, architecture)
    return OpenClipTowers(vision, vision_head, text, projection, tokenizer, text_cfg, preprocess_cfg)


def _load_weights(folder: Path, modules: dict[str, nn.Module], state_dict: dict, architecture: str) -> None:
    """Load every parameter of `modules` from its checkpoint entry (`KEY_MAPPING`), after checking that the
    checkpoint holds exactly those entries, in the right shapes."""
    targets = {f"{name}.{key}": (name, key) for name, module in modules.items() for key in module.state_dict()}
    sources, unmapped = rename_keys(targets, KEY_MAPPING)
    if unmapped:
        raise RuntimeError(f"no open_clip counterpart known for {sorted(unmapped)} (transformers renamed it?).")
    expected = {source.split("#")[0] for source in sources.values()}
    missing = sorted(expected - set(state_dict))
    unknown = sorted(set(state_dict) - expected - _IGNORED_KEYS)
    if missing or unknown:
        raise ValueError(
            f"{folder}: the weights do not fit the architecture of {OPEN_CLIP_CONFIG} ({architecture}). "
            f"Missing keys: {missing or 'none'}. Unknown keys: {unknown or 'none'}."
        )
    converted, mismatched = {name: {} for name in modules}, []
    shapes = {name: module.state_dict() for name, module in modules.items()}
    for target, source in sources.items():
        name, key = targets[target]
        entry, _, part = source.partition("#")
        tensor = state_dict[entry] if not part else state_dict[entry].chunk(3, dim=0)[_QKV_PARTS.index(part)]
        if tensor.shape != shapes[name][key].shape:
            where = f" (q/k/v part {_QKV_PARTS.index(part)})" if part else ""
            mismatched.append(f"{entry}{where}: {tuple(tensor.shape)}, expected {tuple(shapes[name][key].shape)}")
        converted[name][key] = tensor
    if mismatched:
        raise ValueError(f"{folder}: checkpoint tensors of the wrong shape for {OPEN_CLIP_CONFIG}: {mismatched}.")
    for name, module in modules.items():
        module.load_state_dict(converted[name], strict=True)


def read_open_clip_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of an open_clip checkpoint folder: `open_clip_model.safetensors` if present, else
    `open_clip_pytorch_model.bin` read with `torch.load(weights_only=True)` (a pickle that needs code to
    load is refused)."""
    folder = Path(folder)
    for name in OPEN_CLIP_WEIGHTS:
        if (folder / name).is_file():
            return load_state_dict_file(folder / name)
    raise FileNotFoundError(f"{folder} has none of {OPEN_CLIP_WEIGHTS}: not an open_clip checkpoint folder.")


def _vision_config(vision_cfg: Mapping) -> ViTConfig:
    """A ViTConfig equal to the timm ViT that `vision_cfg` names (timm_model_name + timm_model_kwargs)."""
    name = vision_cfg.get("timm_model_name")
    match = _TIMM_VIT_NAME.fullmatch(name or "")
    if match is None:
        raise ValueError(
            f"vision_cfg.timm_model_name {name!r} is not supported: only timm's plain ViTs "
            "(vit_{tiny,small,base,large,huge}_patch<P>_<size>) load without timm."
        )
    if vision_cfg.get("timm_pool") not in (None, "", "token"):
        raise ValueError(f"vision_cfg.timm_pool {vision_cfg['timm_pool']!r} is not supported (only the class token).")
    if vision_cfg.get("timm_proj", "linear") != "linear":
        raise ValueError(f"vision_cfg.timm_proj {vision_cfg['timm_proj']!r} is not supported (only 'linear').")
    width, depth, heads = _TIMM_VIT_SIZES[match.group(1)]
    arch = {"embed_dim": width, "depth": depth, "num_heads": heads, "patch_size": int(match.group(2)),
            "img_size": vision_cfg.get("image_size", int(match.group(3))), "mlp_ratio": 4.0}
    kwargs = dict(vision_cfg.get("timm_model_kwargs") or {})
    unknown = sorted(set(kwargs) - set(_TIMM_VIT_KWARGS))
    if unknown:
        raise ValueError(f"vision_cfg.timm_model_kwargs {unknown} are not supported (known: {_TIMM_VIT_KWARGS}).")
    arch.update(kwargs)
    image_size = arch["img_size"]
    if not isinstance(image_size, int):  # open_clip allows [height, width]
        if len(set(image_size)) != 1:
            raise ValueError(f"vision_cfg image size {image_size} is not square; only square inputs are supported.")
        image_size = image_size[0]
    return ViTConfig(
        hidden_size=arch["embed_dim"], num_hidden_layers=arch["depth"], num_attention_heads=arch["num_heads"],
        intermediate_size=int(arch["embed_dim"] * arch["mlp_ratio"]), hidden_act="gelu", layer_norm_eps=1e-6,
        image_size=image_size, patch_size=arch["patch_size"], num_channels=3, qkv_bias=True,
    )


def _text_config(
    folder: Path, text_cfg: Mapping, state_dict: Mapping[str, torch.Tensor], pad_token_id: int
) -> BertConfig:
    """The BERT config: the folder's `config.json` if present, else read off the weight shapes."""
    if (folder / "config.json").is_file():
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)  # a BERT config needs no code
        if config.model_type != "bert":
            raise ValueError(f"{folder / 'config.json'} is a {config.model_type!r} config; the text tower is a BERT.")
        if config.pad_token_id != pad_token_id:  # open_clip pads with the tokenizer's id but masks the config's
            raise ValueError(
                f"the tokenizer pads with id {pad_token_id} but {folder / 'config.json'} has pad_token_id "
                f"{config.pad_token_id}: the tokenizer and config.json must come from the same text model."
            )
        return config
    prefix = "text.transformer."
    shape_keys = ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                  "embeddings.token_type_embeddings.weight", "encoder.layer.0.intermediate.dense.weight")
    absent = [prefix + key for key in shape_keys if prefix + key not in state_dict]
    if absent:
        raise ValueError(
            f"{folder}: no {absent}, so the text tower ({text_cfg.get('hf_model_name')!r}) is not a BERT whose config "
            "can be read off the weights; only BERT text towers are supported (a config.json in the folder helps "
            "only if the weights are BERT's)."
        )
    word = state_dict[prefix + "embeddings.word_embeddings.weight"]
    hidden = word.shape[1]
    if hidden % 64:
        raise ValueError(
            f"cannot tell the text tower's attention heads from its width {hidden}: put the config.json of "
            f"{text_cfg.get('hf_model_name', 'the text model')} into {folder}."
        )
    layers = {
        int(m.group(1)) for key in state_dict if (m := re.match(re.escape(prefix) + r"encoder\.layer\.(\d+)\.", key))
    }
    return BertConfig(
        vocab_size=word.shape[0], hidden_size=hidden, num_hidden_layers=len(layers),
        num_attention_heads=hidden // 64,  # every BERT size has 64-wide heads
        intermediate_size=state_dict[prefix + "encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=state_dict[prefix + "embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=state_dict[prefix + "embeddings.token_type_embeddings.weight"].shape[0],
        pad_token_id=pad_token_id,
    )


def _load_tokenizer(folder: Path, text_cfg: Mapping):
    """The text tower's tokenizer, from files in the folder (nothing can be downloaded)."""
    tokenizer_name = text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name") or "the text model"
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        with remote_code_guard(folder, False) as remote:  # a BERT tokenizer needs no code from the folder
            return AutoTokenizer.from_pretrained(folder, **remote)
    if (folder / "vocab.txt").is_file():
        lowered = tokenizer_name.lower()
        if "uncased" not in lowered and "cased" not in lowered:
            raise ValueError(
                f"{folder} has a vocab.txt but no tokenizer_config.json, and {tokenizer_name!r} does not say whether "
                "it lower-cases: put that tokenizer's tokenizer_config.json next to vocab.txt."
            )
        return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case="uncased" in lowered)
    raise FileNotFoundError(
        f"{folder} has no tokenizer: put the vocab.txt and tokenizer_config.json (or tokenizer.json) of "
        f"{tokenizer_name!r} into it (open_clip downloads them; nothing is downloaded here)."
    )


def _text_projection(kind: str | None, width: int, embed_dim: int) -> nn.Module:
    """open_clip's HFTextEncoder projection: 'linear', 'mlp' (width -> (width+embed_dim)//2 -> embed_dim, GELU)
    or none when the widths already match."""
    if kind == "linear":
        return nn.Linear(width, embed_dim, bias=False)
    if kind == "mlp":
        hidden = (width + embed_dim) // 2
        return nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, embed_dim, bias=False))
    if kind is None and width == embed_dim:
        return nn.Identity()
    raise ValueError(
        f"text_cfg projection {kind!r} is not supported for width {width} -> {embed_dim} (use 'linear' or 'mlp')."
    )
