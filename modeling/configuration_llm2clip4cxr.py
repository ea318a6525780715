"""Configuration of LLM2CLIP4CXR: an LLM2Vec4CXR report encoder and a vision tower trained CLIP-style on chest X-rays.

This file is shipped inside every saved checkpoint as Hub remote code: it imports only torch,
transformers and its sibling files.
"""

import math

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_eva02 import EVA02VisionConfig
from .configuration_llm2vec4cxr import LLM2Vec4CXRConfig, build_sub_config

# Vision towers whose `AutoModel` returns a `pooler_output` of `hidden_size`, the only interface the image
# side relies on. EVA02 (the published LLM2CLIP4CXR's tower) is ours, registered by its configuration file.
SUPPORTED_VISION_MODEL_TYPES = (
    "clip_vision_model",
    "siglip_vision_model",
    "dinov2",
    "vit",
    EVA02VisionConfig.model_type,
)


class LLM2CLIP4CXRConfig(PreTrainedConfig):
    r"""
    Configuration of an [`LLM2CLIP4CXRModel`]: an [`LLM2Vec4CXRModel`] text tower, a vision tower, a
    projection of each into a shared space and a learnable temperature.

    Args:
        text_config (`LLM2Vec4CXRConfig` or `dict`, *optional*):
            Configuration of the text tower. Defaults to `LLM2Vec4CXRConfig()`.
        vision_config (`PreTrainedConfig` or `dict`, *optional*):
            Configuration of the vision tower, one of `SUPPORTED_VISION_MODEL_TYPES`. A dict must carry
            `model_type`. Defaults to a `CLIPVisionConfig()`.
        projection_dim (`int`, *optional*, defaults to 512):
            Size of the shared embedding space.
        logit_scale_init_value (`float`, *optional*, defaults to 2.6592):
            Initial value of the learnable `logit_scale` (the log of the inverse temperature): log(1 / 0.07),
            as in CLIP.
        logit_scale_max (`float`, *optional*, defaults to 100.0):
            Largest multiplier of the cosine similarities: `logit_scale` is clamped to `log(logit_scale_max)`
            when used, as CLIP does during training.
        initializer_factor (`float`, *optional*, defaults to 1.0):
            Multiplier of the standard deviation used to initialise the projections.
        visual_projection_bias (`bool`, *optional*, defaults to `False`):
            Whether the image projection has a bias: CLIP's has none, the EVA-CLIP head of the published
            LLM2CLIP4CXR has one.
    """

    model_type = "llm2clip4cxr"
    sub_configs_defaults = {
        "text_config": LLM2Vec4CXRConfig,
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
    }

    def __init__(
        self,
        text_config=None,
        vision_config=None,
        projection_dim: int = 512,
        logit_scale_init_value: float = math.log(1 / 0.07),
        logit_scale_max: float = 100.0,
        initializer_factor: float = 1.0,
        visual_projection_bias: bool = False,
        **kwargs,
    ):
        self.text_config = self._build_text_config(text_config)
        self.vision_config = self._build_vision_config(vision_config)
        if isinstance(projection_dim, bool) or not isinstance(projection_dim, int) or projection_dim < 1:
            raise ValueError(f"`projection_dim` must be a positive int, got {projection_dim!r}.")
        self.projection_dim = projection_dim
        if not logit_scale_max > 0 or not math.isfinite(logit_scale_max):
            raise ValueError(f"`logit_scale_max` must be a finite positive number, got {logit_scale_max!r}.")
        if not logit_scale_init_value <= math.log(logit_scale_max):
            raise ValueError(
                f"`logit_scale_init_value` must be at most log(logit_scale_max) = {math.log(logit_scale_max):.4f} "
                f"(it would be clamped at once), got {logit_scale_init_value!r}."
            )
        self.logit_scale_init_value = float(logit_scale_init_value)
        self.logit_scale_max = float(logit_scale_max)
        self.initializer_factor = initializer_factor
        self.visual_projection_bias = bool(visual_projection_bias)
        # Without it, PreTrainedConfig.__init__ sets every sub-config's attention implementation to None; a
        # sub-config shared with an already built tower (`text_config=encoder.config`) would then make that
        # tower skip its attention mask. An empty per-sub-config dict leaves each as it is.
        kwargs.setdefault("attn_implementation", {})
        super().__init__(**kwargs)

    @staticmethod
    def _build_text_config(text_config) -> LLM2Vec4CXRConfig:
        if text_config is None:
            return LLM2Vec4CXRConfig()
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            model_type = text_config.pop("model_type", LLM2Vec4CXRConfig.model_type)
            if model_type != LLM2Vec4CXRConfig.model_type:
                raise ValueError(
                    f"`text_config` must describe an LLM2Vec4CXR encoder (model_type "
                    f"{LLM2Vec4CXRConfig.model_type!r}), got model_type {model_type!r}."
                )
            return LLM2Vec4CXRConfig(**text_config)
        if not isinstance(text_config, LLM2Vec4CXRConfig):
            raise TypeError(
                f"`text_config` must be an LLM2Vec4CXRConfig or a dict, got {type(text_config).__name__}."
            )
        return text_config

    @staticmethod
    def _build_vision_config(vision_config) -> PreTrainedConfig:
        vision_config = build_sub_config(
            vision_config, "vision_config", "vision", SUPPORTED_VISION_MODEL_TYPES,
            default_model_type="clip_vision_model", owner="LLM2CLIP4CXR",
            hint=lambda config: (
                f" Pass its `.vision_config` instead of the whole {config.model_type!r} config."
                if hasattr(config, "vision_config") else ""
            ),
        )
        if not getattr(vision_config, "vision_use_head", True):
            raise ValueError(
                "`vision_config.vision_use_head` must be True: LLM2CLIP4CXR projects the vision tower's pooled "
                "output, which a SigLIP tower without its head does not have."
            )
        return vision_config


__all__ = ["LLM2CLIP4CXRConfig", "SUPPORTED_VISION_MODEL_TYPES"]
