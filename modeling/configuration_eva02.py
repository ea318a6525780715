"""Configuration of the EVA02 vision transformer, the vision tower of the published LLM2CLIP4CXR.

Shipped inside every saved checkpoint as Hub remote code: imports only transformers. Importing it registers
the config with `AutoConfig`, so that an LLM2CLIP4CXR config naming it as its `vision_config` loads.
"""

from transformers import AutoConfig, PreTrainedConfig


class EVA02VisionConfig(PreTrainedConfig):
    r"""
    Configuration of an [`EVA02VisionModel`]: a ViT with a 2D rotary position embedding on the patch tokens,
    SwiGLU MLPs and sub-LayerNorms (EVA-02). The defaults are EVA02-CLIP-L/14 at 448 px, the vision tower
    of the published LLM2CLIP4CXR.

    Args:
        hidden_size (`int`, *optional*, defaults to 1024): width of the tokens.
        num_hidden_layers (`int`, *optional*, defaults to 24): number of blocks.
        num_attention_heads (`int`, *optional*, defaults to 16): heads per attention layer.
        intermediate_size (`int`, *optional*, defaults to 2730): inner width of the SwiGLU MLP
            (`int(hidden_size * 2.6667)` in EVA02-CLIP-L).
        image_size (`int`, *optional*, defaults to 448): side of the square input image.
        patch_size (`int`, *optional*, defaults to 14): side of a patch.
        num_channels (`int`, *optional*, defaults to 3): image channels.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6): epsilon of every LayerNorm.
        rope_pretrain_grid (`int`, *optional*, defaults to 16): side of the patch grid the rotary
            frequencies were pretrained at (224 / 14); positions of a larger grid are scaled onto it.
        rope_theta (`float`, *optional*, defaults to 10000.0): base of the rotary frequencies.
        qkv_bias (`bool`, *optional*, defaults to `True`): whether the query and value projections have a
            bias (the key projection never has one).
        initializer_range (`float`, *optional*, defaults to 0.02): std of the truncated-normal initialisation.
    """

    model_type = "eva02_vision_model"

    def __init__(
        self,
        hidden_size: int = 1024,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        intermediate_size: int = 2730,
        image_size: int = 448,
        patch_size: int = 14,
        num_channels: int = 3,
        layer_norm_eps: float = 1e-6,
        rope_pretrain_grid: int = 16,
        rope_theta: float = 10000.0,
        qkv_bias: bool = True,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        if num_attention_heads < 1 or hidden_size % num_attention_heads:
            raise ValueError(
                f"`num_attention_heads` ({num_attention_heads}) must divide `hidden_size` ({hidden_size})."
            )
        head_dim = hidden_size // num_attention_heads
        if head_dim % 4:
            raise ValueError(
                f"The head size {head_dim} must be a multiple of 4: the 2D rotary embedding splits it into a "
                "row half and a column half of rotated pairs."
            )
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(f"`patch_size` ({patch_size}) must divide `image_size` ({image_size}).")
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.layer_norm_eps = layer_norm_eps
        self.rope_pretrain_grid = rope_pretrain_grid
        self.rope_theta = rope_theta
        self.qkv_bias = qkv_bias
        self.initializer_range = initializer_range
        super().__init__(**kwargs)

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size


# exist_ok: the package and a checkpoint's remote-code copy may both register it in one process.
AutoConfig.register(EVA02VisionConfig.model_type, EVA02VisionConfig, exist_ok=True)

__all__ = ["EVA02VisionConfig"]
