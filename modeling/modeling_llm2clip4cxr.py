"""LLM2CLIP4CXR: an LLM2Vec4CXR report encoder and a vision tower aligned CLIP-style on chest X-rays.

Shipped inside every saved checkpoint as Hub remote code: imports only torch, transformers and the
sibling files. The text tower is an [`LLM2Vec4CXRModel`] (bidirectional attention: its mask is NOT
causal), the vision tower any `AutoModel` of `SUPPORTED_VISION_MODEL_TYPES`.
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.utils import ModelOutput, logging

from .configuration_llm2clip4cxr import LLM2CLIP4CXRConfig
from .modeling_eva02 import EVA02VisionModel
from .modeling_llm2vec4cxr import LLM2Vec4CXRModel, from_pretrained_strict

logger = logging.get_logger(__name__)

# transformers' custom-pipeline registration: `pipeline(ZERO_SHOT_TASK, model=checkpoint, trust_remote_code=True)`
# loads this class from the checkpoint's own pipeline_llm2clip4cxr.py, written beside this file on save.
ZERO_SHOT_TASK = "zero-shot-image-classification"
ZERO_SHOT_PIPELINE = {
    "impl": "pipeline_llm2clip4cxr.LLM2CLIP4CXRZeroShotImageClassificationPipeline",
    "pt": ["AutoModelForZeroShotImageClassification"],
    "type": "multimodal",
}
_PIPELINE_FILE = "pipeline_llm2clip4cxr.py"


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row of `logits` (N, N) against its diagonal entry."""
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def clip_loss(similarity: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss on a (N, N) similarity matrix whose row i and column i are a matching pair.

    Same math as `llm2clip4cxr.training.losses.clip_loss` on a single process (tests check they agree); that
    one also gathers the batch across processes.
    """
    return (contrastive_loss(similarity) + contrastive_loss(similarity.T)) / 2


@dataclass
class LLM2CLIP4CXROutput(ModelOutput):
    r"""
    Output of [`LLM2CLIP4CXRModel.forward`].

    Args:
        loss (`torch.Tensor` of shape `()`, *optional*, returned when `return_loss=True`):
            Symmetric contrastive (CLIP) loss; row `i` of the texts describes image `i`.
        logits_per_image (`torch.Tensor` of shape `(image_batch_size, text_batch_size)`):
            Scaled cosine similarities between `image_embeds` and `text_embeds`.
        logits_per_text (`torch.Tensor` of shape `(text_batch_size, image_batch_size)`):
            `logits_per_image.T`.
        text_embeds (`torch.Tensor` of shape `(text_batch_size, projection_dim)`):
            L2-normalised projected text features.
        image_embeds (`torch.Tensor` of shape `(image_batch_size, projection_dim)`):
            L2-normalised projected image features.
        text_model_output (`BaseModelOutputWithPooling`):
            Output of the text tower; its `pooler_output` is the projected (not normalised) text features.
        vision_model_output (`BaseModelOutputWithPooling`):
            Output of the vision tower; its `pooler_output` is the projected (not normalised) image features.
    """

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any]:
        return tuple(value.to_tuple() if isinstance(value, ModelOutput) else value for value in self.values())


class LLM2CLIP4CXRPreTrainedModel(PreTrainedModel):
    config_class = LLM2CLIP4CXRConfig
    config: LLM2CLIP4CXRConfig
    base_model_prefix = "llm2clip4cxr"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # The towers' own `_no_split_modules` are gathered by `post_init()`.
    _no_split_modules = []
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        # The towers are PreTrainedModels and initialise themselves; only the heads are ours.
        super()._init_weights(module)
        if isinstance(module, LLM2CLIP4CXRModel):
            factor = self.config.initializer_factor
            init.normal_(module.text_projection[1].weight, std=module.text_embed_dim**-0.5 * factor)
            init.zeros_(module.text_projection[1].bias)
            init.normal_(module.visual_projection.weight, std=module.vision_embed_dim**-0.5 * factor)
            if module.visual_projection.bias is not None:
                init.zeros_(module.visual_projection.bias)
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)


class LLM2CLIP4CXRModel(LLM2CLIP4CXRPreTrainedModel):
    """An [`LLM2Vec4CXRModel`] text tower (`text_model`) and a vision tower (`vision_model`), each projected
    into a shared `projection_dim` space: text through LayerNorm -> Linear (as the published LLM2CLIP),
    images through a Linear (bias-free as CLIP unless `config.visual_projection_bias`, as EVA-CLIP's head).

    Args:
        config (`LLM2CLIP4CXRConfig`): the configuration; the towers are built from its sub-configs
            unless given.
        text_model (`LLM2Vec4CXRModel`, *optional*): an already loaded text tower.
        vision_model (`PreTrainedModel`, *optional*): an already loaded vision tower.
    """

    def __init__(
        self,
        config: LLM2CLIP4CXRConfig,
        text_model: LLM2Vec4CXRModel | None = None,
        vision_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        if text_model is not None and not isinstance(text_model, LLM2Vec4CXRModel):
            raise TypeError(f"`text_model` must be an LLM2Vec4CXRModel, got {type(text_model).__name__}.")
        self.text_model = text_model if text_model is not None else LLM2Vec4CXRModel._from_config(config.text_config)
        if vision_model is None:
            # EVA02 by model type, not through AutoModel: remote code may load the config and the model from
            # two copies of configuration_eva02.py, whose config classes then differ.
            if config.vision_config.model_type == EVA02VisionModel.config_class.model_type:
                vision_model = EVA02VisionModel(config.vision_config)
            else:
                vision_model = AutoModel.from_config(config.vision_config)
        self.vision_model = vision_model
        # One config object per tower, so that changes through either path stay in sync; a given tower keeps
        # the attention implementation it was built with.
        for tower, sub_config in ((self.text_model, config.text_config), (self.vision_model, config.vision_config)):
            sub_config._attn_implementation = tower.config._attn_implementation
            tower.config = sub_config

        self.text_embed_dim = config.text_config.hidden_size
        self.vision_embed_dim = config.vision_config.hidden_size
        self.text_projection = nn.Sequential(
            nn.LayerNorm(self.text_embed_dim), nn.Linear(self.text_embed_dim, config.projection_dim)
        )
        self.visual_projection = nn.Linear(
            self.vision_embed_dim, config.projection_dim, bias=config.visual_projection_bias
        )
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    def get_text_features(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        embed_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`): token ids from the processor.
            attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`): 1 for real tokens, 0 for
                padding. Attention is bidirectional over the real tokens.
            embed_mask (`torch.Tensor` of shape `(batch_size, seq_len)`, *optional*): 1 for the report
                tokens to pool, 0 for the instruction and padding. Defaults to `attention_mask`.

        Returns:
            The text tower's `BaseModelOutputWithPooling`, with `pooler_output` replaced by the projected
            features `(batch_size, projection_dim)` (not normalised), as `CLIPModel.get_text_features`.
        """
        text_outputs = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, embed_mask=embed_mask, **kwargs
        )
        text_outputs.pooler_output = self.text_projection(text_outputs.pooler_output)
        return text_outputs

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs) -> BaseModelOutputWithPooling:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, image_size, image_size)`):
                images from [`LLM2CLIP4CXRImageProcessor`].

        Returns:
            The vision tower's `BaseModelOutputWithPooling`, with `pooler_output` replaced by the projected
            features `(batch_size, projection_dim)` (not normalised), as `CLIPModel.get_image_features`.
            What is projected is the tower's own pooled output: the normalised CLS token (CLIP, DINOv2),
            the attention-pooling head (SigLIP) or the tanh pooler (ViT).
        """
        vision_outputs = self.vision_model(pixel_values=pixel_values, **kwargs)
        vision_outputs.pooler_output = self.visual_projection(vision_outputs.pooler_output)
        return vision_outputs

    def get_logit_scale(self) -> torch.Tensor:
        """The multiplier of the cosine similarities: `exp(logit_scale)`, at most `config.logit_scale_max`."""
        return self.logit_scale.clamp(max=math.log(self.config.logit_scale_max)).exp()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        embed_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        return_loss: bool | None = None,
        **kwargs,
    ) -> LLM2CLIP4CXROutput:
        r"""
        Args:
            input_ids, attention_mask, embed_mask: see [`~LLM2CLIP4CXRModel.get_text_features`].
            pixel_values: see [`~LLM2CLIP4CXRModel.get_image_features`].
            return_loss (`bool`, *optional*): also return the symmetric CLIP loss; text `i` must
                describe image `i`, so both batches must have the same size.

        Returns:
            [`LLM2CLIP4CXROutput`]: `logits_per_image` `(image_batch_size, text_batch_size)` is
            `get_logit_scale() * image_embeds @ text_embeds.T` on L2-normalised features.
        """
        if input_ids is None or attention_mask is None or pixel_values is None:
            missing = [
                name
                for name, value in (
                    ("input_ids", input_ids), ("attention_mask", attention_mask), ("pixel_values", pixel_values)
                )
                if value is None
            ]
            raise ValueError(
                f"LLM2CLIP4CXRModel.forward needs texts and images; missing {missing}. For one modality "
                "use `get_text_features` or `get_image_features`."
            )
        vision_outputs = self.get_image_features(pixel_values=pixel_values, **kwargs)
        text_outputs = self.get_text_features(
            input_ids=input_ids, attention_mask=attention_mask, embed_mask=embed_mask, **kwargs
        )
        image_embeds = F.normalize(vision_outputs.pooler_output, p=2, dim=-1)  # (B_img, P)
        text_embeds = F.normalize(text_outputs.pooler_output, p=2, dim=-1)  # (B_txt, P)
        logits_per_text = self.get_logit_scale() * text_embeds @ image_embeds.T  # (B_txt, B_img)
        logits_per_image = logits_per_text.T

        loss = None
        if return_loss:
            if logits_per_text.shape[0] != logits_per_text.shape[1]:
                raise ValueError(
                    "`return_loss=True` needs one text per image (text i describes image i), got "
                    f"{logits_per_text.shape[0]} texts and {logits_per_text.shape[1]} images."
                )
            loss = clip_loss(logits_per_text)

        return LLM2CLIP4CXROutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights, config and remote code, with the zero-shot pipeline registered in the config
        (`custom_pipelines`) and its code beside the model code."""
        import shutil

        self.config.custom_pipelines = {ZERO_SHOT_TASK: dict(ZERO_SHOT_PIPELINE)}
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map["AutoModelForZeroShotImageClassification"] = f"{Path(__file__).stem}.{type(self).__name__}"
        self.config.auto_map = auto_map
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            source = Path(__file__).with_name(_PIPELINE_FILE)
            if source.is_file():
                shutil.copyfile(source, Path(save_directory) / _PIPELINE_FILE)
            else:  # loaded as remote code without its pipeline file: keep the checkpoint loadable anyway
                logger.warning(f"{source} is missing: the saved checkpoint has no zero-shot pipeline code.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load a checkpoint; weights that do not match the config raise `CheckpointMismatchError` naming
        the missing, unexpected and size-mismatched keys instead of being initialised at random."""
        if os.path.isfile(pretrained_model_name_or_path):
            raise ValueError(
                f"{pretrained_model_name_or_path} is a file, not a checkpoint folder. A published LLM2CLIP4CXR "
                "state dict must be converted first: `llm2clip4cxr convert llm2clip4cxr STATE_DICT OUTPUT_DIR "
                "--text-model CONVERTED_LLM2VEC4CXR_DIR`."
            )
        want_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = from_pretrained_strict(
            cls,
            pretrained_model_name_or_path,
            *model_args,
            describe=lambda model: (
                f"LLM2CLIP4CXRConfig(text pooling_mode={model.config.text_config.pooling_mode!r}, "
                f"vision {model.config.vision_config.model_type!r}, projection_dim={model.config.projection_dim})"
            ),
            **kwargs,
        )
        return (model, loading_info) if want_loading_info else model

    @classmethod
    def from_text_vision_pretrained(
        cls,
        text_model_name_or_path: str | os.PathLike,
        vision: str | os.PathLike | PreTrainedConfig | dict,
        projection_dim: int = 512,
        text_kwargs: dict | None = None,
        vision_kwargs: dict | None = None,
        **config_kwargs,
    ) -> "LLM2CLIP4CXRModel":
        """Start an LLM2CLIP4CXR model from a trained LLM2Vec4CXR checkpoint and a vision tower.

        The projections and the logit scale are newly initialised: train the model before using it.

        Args:
            text_model_name_or_path: an LLM2Vec4CXR checkpoint (folder or Hub id), loaded with
                `LLM2Vec4CXRModel.from_pretrained` (weights that do not fit its config raise
                `CheckpointMismatchError`).
            vision: a pretrained vision checkpoint (folder or Hub id; for a CLIP or SigLIP checkpoint its
                vision tower is taken), or a vision config (object or dict with `model_type`) for a randomly
                initialised tower.
            projection_dim: size of the shared embedding space.
            text_kwargs, vision_kwargs: extra keyword arguments of each tower's `from_pretrained`.
            config_kwargs: other [`LLM2CLIP4CXRConfig`] arguments (`logit_scale_init_value`, ...).
        """
        text_model = LLM2Vec4CXRModel.from_pretrained(text_model_name_or_path, **(text_kwargs or {}))
        vision_path = vision if isinstance(vision, (str, os.PathLike)) else None
        if vision_path is not None:
            vision = AutoConfig.from_pretrained(vision_path, **(vision_kwargs or {}))
            # A dual encoder's config (CLIP, SigLIP) holds its vision tower's config, whose model class
            # then reads only the vision weights of the checkpoint.
            vision = getattr(vision, "vision_config", vision)
        config = LLM2CLIP4CXRConfig(
            text_config=text_model.config, vision_config=vision, projection_dim=projection_dim, **config_kwargs
        )
        vision_model = None
        if vision_path is not None:
            vision_model = MODEL_MAPPING[type(config.vision_config)].from_pretrained(
                vision_path, config=config.vision_config, **(vision_kwargs or {})
            )
        model = cls(config, text_model=text_model, vision_model=vision_model)
        logger.warning(
            "`text_projection`, `visual_projection` and `logit_scale` are newly initialised: train the "
            "model before using its embeddings."
        )
        return model


LLM2CLIP4CXRConfig.register_for_auto_class()
LLM2CLIP4CXRModel.register_for_auto_class("AutoModel")

__all__ = ["LLM2CLIP4CXROutput", "LLM2CLIP4CXRModel", "LLM2CLIP4CXRPreTrainedModel", "clip_loss", "contrastive_loss"]
