"""Configuration of LLM2Vec4CXR, a decoder LLM turned into a bidirectional chest X-ray report encoder.

This file is shipped inside every saved checkpoint as Hub remote code: it imports only torch,
transformers and its sibling files.
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

POOLING_MODES = ("mean", "eos", "weighted_mean", "latent_attention")
# "last_token" is the name sentence-transformers and LLM2Vec also use for "eos" pooling.
POOLING_MODE_ALIASES = {"last_token": "eos", "lasttoken": "eos"}
# Decoder families whose transformers implementation reads `config.is_causal` when building the
# attention mask, so that setting it to False really gives bidirectional attention (checked per
# family in tests/test_modeling_llm2vec4cxr.py).
SUPPORTED_BACKBONES = ("llama", "mistral", "qwen2", "qwen3")
# The separator of the published LLM2Vec4CXR: "instruction!@#$%^&*()report". The model never sees it.
DEFAULT_INSTRUCTION_SEPARATOR = "!@#$%^&*()"
# How `embed_mask` finds the report tokens after the instruction:
# - "offsets": by character offsets, exactly the report's tokens (needs a fast tokenizer).
# - "report_token_count": the last k tokens, k = the report's token count when tokenized alone. This is
#   the published LLM2Vec4CXR's rule; it is off by a token or more when the report's first word splits
#   differently after the instruction's space, and converted published checkpoints keep it so that they
#   reproduce the original embeddings exactly.
EMBED_MASK_RULES = ("offsets", "report_token_count")


class LLM2Vec4CXRConfig(PreTrainedConfig):
    r"""
    Configuration of an [`LLM2Vec4CXRModel`]: a decoder backbone run with bidirectional attention,
    followed by a pooling head that turns the report's token states into one vector.

    Args:
        backbone_config (`PreTrainedConfig` or `dict`, *optional*):
            Configuration of the decoder backbone (one of `SUPPORTED_BACKBONES`). A dict must carry
            `model_type`. Defaults to a Llama configuration. Its `is_causal` is set from `bidirectional`.
        pooling_mode (`str`, *optional*, defaults to `"mean"`):
            One of `"mean"`, `"eos"` (alias `"last_token"`), `"weighted_mean"`, `"latent_attention"`.
        num_latents (`int`, *optional*, defaults to 512):
            Size of the learned latent array of latent-attention pooling.
        latent_attention_heads (`int`, *optional*, defaults to 8):
            Heads of the latent-attention layer; must divide the backbone hidden size.
        latent_mlp_dim (`int`, *optional*):
            Inner size of the Linear-GELU-Linear after latent attention. Defaults to the hidden size.
        instruction_separator (`str`, *optional*, defaults to `"!@#$%^&*()"`):
            Marks where an instruction ends in `"instruction" + separator + "report"` inputs.
        max_seq_length (`int`, *optional*, defaults to 512):
            Longest tokenized input (instruction included); longer reports are cut at their end.
        normalize_embeddings (`bool`, *optional*, defaults to `False`):
            Whether `pooler_output` is L2-normalised.
        bidirectional (`bool`, *optional*, defaults to `True`):
            Whether the backbone attends in both directions. Persisted as `backbone_config.is_causal`.
        instructions (`dict[str, str]`, *optional*):
            Named instructions, saved as sentence-transformers prompts.
        default_instruction_name (`str`, *optional*):
            The key of `instructions` that the checkpoint was trained with. `encode()`/`tokenize()` without
            `instruction=` use it (`instruction=""` means none), and it is saved as sentence-transformers'
            `default_prompt_name`, so `SentenceTransformer.encode` without a prompt uses it too.
        embed_mask_rule (`str`, *optional*, defaults to `"offsets"`):
            How the report's tokens are found after the instruction: `"offsets"` (exactly, by character
            offsets) or `"report_token_count"` (the published LLM2Vec4CXR's rule, kept by converted
            checkpoints; see `EMBED_MASK_RULES`).
    """

    model_type = "llm2vec4cxr"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    def __init__(
        self,
        backbone_config=None,
        pooling_mode: str = "mean",
        num_latents: int = 512,
        latent_attention_heads: int = 8,
        latent_mlp_dim: int | None = None,
        instruction_separator: str = DEFAULT_INSTRUCTION_SEPARATOR,
        max_seq_length: int = 512,
        normalize_embeddings: bool = False,
        bidirectional: bool = True,
        instructions: dict | None = None,
        embed_mask_rule: str = "offsets",
        default_instruction_name: str | None = None,
        **kwargs,
    ):
        self.backbone_config = build_sub_config(
            backbone_config, "backbone_config", "backbone", SUPPORTED_BACKBONES, default_model_type="llama", owner="LLM2Vec4CXR"
        )
        pooling_mode = POOLING_MODE_ALIASES.get(pooling_mode, pooling_mode)
        if pooling_mode not in POOLING_MODES:
            raise ValueError(f"`pooling_mode` must be one of {POOLING_MODES}, got {pooling_mode!r}.")
        self.pooling_mode = pooling_mode
        hidden_size = self.backbone_config.hidden_size
        if pooling_mode == "latent_attention":
            if num_latents < 1:
                raise ValueError(f"`num_latents` must be positive, got {num_latents}.")
            if latent_attention_heads < 1 or hidden_size % latent_attention_heads != 0:
                raise ValueError(
                    f"`latent_attention_heads` must divide the backbone hidden size {hidden_size}, "
                    f"got {latent_attention_heads}."
                )
        self.num_latents = num_latents
        self.latent_attention_heads = latent_attention_heads
        self.latent_mlp_dim = latent_mlp_dim if latent_mlp_dim is not None else hidden_size
        if not isinstance(instruction_separator, str) or not instruction_separator.strip():
            raise ValueError(
                f"`instruction_separator` must be a non-blank string, got {instruction_separator!r}."
            )
        self.instruction_separator = instruction_separator
        if max_seq_length < 2:
            raise ValueError(f"`max_seq_length` must be at least 2, got {max_seq_length}.")
        self.max_seq_length = max_seq_length
        self.normalize_embeddings = normalize_embeddings
        self.bidirectional = bidirectional
        # transformers' mask builders read `is_causal` from the backbone config: persisting it here is
        # what makes a reloaded checkpoint bidirectional (from_pretrained(is_causal=False) is dropped).
        self.backbone_config.is_causal = not bidirectional
        self.instructions = dict(instructions) if instructions else {}
        if default_instruction_name is not None and default_instruction_name not in self.instructions:
            raise ValueError(
                f"`default_instruction_name` {default_instruction_name!r} is not a key of `instructions` "
                f"{sorted(self.instructions)}; add it there or leave the default unset."
            )
        self.default_instruction_name = default_instruction_name
        if embed_mask_rule not in EMBED_MASK_RULES:
            raise ValueError(f"`embed_mask_rule` must be one of {EMBED_MASK_RULES}, got {embed_mask_rule!r}.")
        self.embed_mask_rule = embed_mask_rule
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @property
    def default_instruction(self) -> str | None:
        """The instruction the checkpoint was trained with (`instructions[default_instruction_name]`), or None."""
        if self.default_instruction_name is None:
            return None
        return self.instructions.get(self.default_instruction_name)

    @property
    def hidden_size(self) -> int:
        """Size of the token states and of the pooled embedding."""
        return self.backbone_config.hidden_size


def build_sub_config(value, field: str, kind: str, supported, default_model_type: str, owner: str, hint=None):
    """A sub-config from a config, a dict carrying `model_type`, or None (the default type), checked
    against the `supported` model types; `hint(config)` may add advice to the unsupported-type error."""
    if value is None:
        value = {"model_type": default_model_type}
    if isinstance(value, dict):
        value = dict(value)
        model_type = value.pop("model_type", None)
        if model_type is None:
            raise ValueError(
                f"`{field}` given as a dict must name its `model_type` (one of {supported}), got keys {sorted(value)}."
            )
        if model_type not in supported:
            raise ValueError(f"Unsupported {kind} `model_type` {model_type!r}: {owner} supports {supported}.")
        value = AutoConfig.for_model(model_type, **value)
    if not isinstance(value, PreTrainedConfig):
        raise TypeError(f"`{field}` must be a transformers PreTrainedConfig or a dict, got {type(value).__name__}.")
    if value.model_type not in supported:
        extra = hint(value) if hint is not None else ""
        raise ValueError(f"Unsupported {kind} `model_type` {value.model_type!r}: {owner} supports {supported}.{extra}")
    return value


__all__ = [
    "LLM2Vec4CXRConfig", "build_sub_config", "POOLING_MODES", "SUPPORTED_BACKBONES", "DEFAULT_INSTRUCTION_SEPARATOR",
    "EMBED_MASK_RULES",
]
