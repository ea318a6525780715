"""What a saved folder is: the kind of checkpoint it holds (an LLM2Vec4CXR text encoder, an LLM2CLIP4CXR model,
or a peft LoRA adapter of either) and, for an adapter, its base model."""

import json
from pathlib import Path

from huggingface_hub.utils import validate_repo_id

__all__ = ["ADAPTER_CONFIG", "KINDS", "adapter_base_id", "adapter_base_source", "checkpoint_kind"]

ADAPTER_CONFIG = "adapter_config.json"
KINDS = {"llm2vec4cxr": "text", "llm2clip4cxr": "clip"}
_BASE_CLASSES = {"LLM2Vec4CXRModel": "text", "LLM2CLIP4CXRModel": "clip"}


def checkpoint_kind(model_dir) -> str:
    """"text", "clip", "text-adapter" or "clip-adapter" for a saved folder; raises `ValueError` otherwise."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such directory (give a folder written by save_pretrained).")
    if (model_dir / ADAPTER_CONFIG).is_file():
        adapter = json.loads((model_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        base_class = (adapter.get("auto_mapping") or {}).get("base_model_class")
        if base_class in _BASE_CLASSES:
            return f"{_BASE_CLASSES[base_class]}-adapter"
        base_path = adapter.get("base_model_name_or_path")
        if base_path and (Path(base_path) / "config.json").is_file():
            return f"{checkpoint_kind(base_path)}-adapter"
        raise ValueError(
            f"{model_dir / ADAPTER_CONFIG}: the adapter's base model ({base_class or base_path!r}) is not an "
            "LLM2Vec4CXR or LLM2CLIP4CXR model."
        )
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json or {ADAPTER_CONFIG}: not a saved checkpoint.")
    model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    if model_type not in KINDS:
        raise ValueError(f"{config_path}: model_type must be one of {sorted(KINDS)}, got {model_type!r}.")
    return KINDS[model_type]


def _saved_base(model_dir: Path) -> str | None:
    return json.loads((model_dir / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")


def adapter_base_source(model_dir: Path, base_model: str | None) -> str:
    """Where to load an adapter's base model from: the local folder it was trained on if it is still there,
    else the Hub id (resolved through the Hub cache)."""
    saved = _saved_base(model_dir)
    source = saved if saved and Path(saved).is_dir() else (base_model or saved)
    if not source:
        raise ValueError(f"{model_dir / ADAPTER_CONFIG} names no base model; pass `base_model=` (a Hub id).")
    return source


def adapter_base_id(model_dir: Path, base_model: str | None) -> str:
    """The Hub id the card names as an adapter's base model."""
    saved = _saved_base(model_dir)
    hub_id = base_model or (saved if saved and not Path(saved).exists() else None)
    if not hub_id:
        raise ValueError(
            f"The adapter in {model_dir} was trained on the local folder {saved!r}; name the Hub id its base model "
            "is published as (`base_model=` / `--base-model ORG/NAME`), so the card can point to it."
        )
    validate_repo_id(hub_id)
    return hub_id
