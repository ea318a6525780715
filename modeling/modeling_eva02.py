"""EVA02 vision transformer, the vision tower of the published LLM2CLIP4CXR (EVA02-CLIP-L/14 at 448 px).

Shipped inside every saved checkpoint as Hub remote code: imports only torch, transformers and the sibling
configuration file. Parameter names follow the EVA-CLIP code (`patch_embed.proj`, `blocks.N.attn.q_proj`,
`blocks.N.mlp.w1`...), so a published state dict maps onto it by a prefix change
(`llm2clip4cxr.conversion`). Importing it registers the model with `AutoModel`.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_eva02 import EVA02VisionConfig


def eva02_rope_tables(config: EVA02VisionConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the 2D rotary embedding, each `(grid_size ** 2, head_dim)`, patches in row-major order.

    The first half of a head rotates with the patch row, the second half with its column; each half holds
    interleaved pairs `(x[2i], x[2i+1])` sharing one frequency. A grid larger than the pretraining grid
    is scaled onto it (EVA's `intp_freq`), so the frequencies span the same range at any resolution.
    """
    half = config.hidden_size // config.num_attention_heads // 2
    inverse_frequencies = 1.0 / (
        config.rope_theta ** (torch.arange(0, half, 2, device=device)[: half // 2].float() / half)
    )
    grid = config.grid_size
    positions = torch.arange(grid, device=device, dtype=torch.float32) / grid * config.rope_pretrain_grid
    angles = torch.outer(positions, inverse_frequencies).repeat_interleave(2, dim=-1)  # (grid, half)
    rows = angles[:, None, :].expand(grid, grid, half)
    columns = angles[None, :, :].expand(grid, grid, half)
    table = torch.cat((rows, columns), dim=-1).reshape(grid * grid, 2 * half)
    return table.cos(), table.sin()


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class EVA02Attention(nn.Module):
    """Multi-head self-attention with rotary patch positions (the CLS token is not rotated) and a
    LayerNorm on the attended values before the output projection (sub-LN)."""

    def __init__(self, config: EVA02VisionConfig):
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(width, width, bias=config.qkv_bias)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=config.qkv_bias)
        self.inner_attn_ln = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.proj = nn.Linear(width, width)

    def forward(self, hidden_states: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> torch.Tensor:
        batch_size, num_tokens, width = hidden_states.shape

        def heads(x):
            return x.view(batch_size, num_tokens, self.num_heads, -1).transpose(1, 2)  # (B, h, T, dh)

        query, key, value = (
            heads(self.q_proj(hidden_states)),
            heads(self.k_proj(hidden_states)),
            heads(self.v_proj(hidden_states)),
        )
        cos, sin = rope_cos.to(query.dtype), rope_sin.to(query.dtype)

        def rotate(x):
            patches = x[:, :, 1:]
            return torch.cat((x[:, :, :1], patches * cos + _rotate_pairs(patches) * sin), dim=2)

        attended = F.scaled_dot_product_attention(rotate(query), rotate(key), value)  # scale 1/sqrt(dh), as EVA
        attended = attended.transpose(1, 2).reshape(batch_size, num_tokens, width)
        return self.proj(self.inner_attn_ln(attended))


class EVA02SwiGLU(nn.Module):
    """`w3(ffn_ln(silu(w1 x) * w2 x))`: SwiGLU with a LayerNorm on the gated hidden units (sub-LN)."""

    def __init__(self, config: EVA02VisionConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.w2 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_ln = nn.LayerNorm(config.intermediate_size, eps=config.layer_norm_eps)
        self.w3 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(hidden_states)) * self.w2(hidden_states)))


class EVA02Block(nn.Module):
    """Pre-norm transformer block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`."""

    def __init__(self, config: EVA02VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = EVA02Attention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = EVA02SwiGLU(config)

    def forward(self, hidden_states, rope_cos, rope_sin):
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states), rope_cos, rope_sin)
        return hidden_states + self.mlp(self.norm2(hidden_states))


class EVA02PatchEmbedding(nn.Module):
    def __init__(self, config: EVA02VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values).flatten(2).transpose(1, 2)  # (B, grid*grid, width), row-major


class EVA02PreTrainedModel(PreTrainedModel):
    config_class = EVA02VisionConfig
    config: EVA02VisionConfig
    base_model_prefix = "eva02"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False
    _no_split_modules = ["EVA02Block"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, EVA02VisionModel):
            init.trunc_normal_(module.cls_token, std=std)
            init.trunc_normal_(module.pos_embed, std=std)


class EVA02VisionModel(EVA02PreTrainedModel):
    """EVA02 vision transformer. `pooler_output` is the CLS token after the final LayerNorm (EVA-CLIP's
    `global_average_pool=False`); the CLIP head projecting it lives in the dual encoder."""

    def __init__(self, config: EVA02VisionConfig):
        super().__init__(config)
        self.patch_embed = EVA02PatchEmbedding(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid_size**2 + 1, config.hidden_size))
        self.blocks = nn.ModuleList(EVA02Block(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embed

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, image_size, image_size)`).
            output_hidden_states (`bool`, *optional*): also return the tokens entering each block and the last
                block's output.

        Returns:
            `BaseModelOutputWithPooling`: `last_hidden_state` `(batch_size, 1 + grid_size**2, hidden_size)` after
            the final LayerNorm, `pooler_output` its CLS token `(batch_size, hidden_size)`.
        """
        expected = (self.config.num_channels, self.config.image_size, self.config.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"EVA02VisionModel expects pixel_values of shape (batch, {', '.join(map(str, expected))}), got "
                f"{tuple(pixel_values.shape)}: resize images with the checkpoint's image processor."
            )
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        dtype = self.patch_embed.proj.weight.dtype
        patches = self.patch_embed(pixel_values.to(dtype))
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        hidden_states = torch.cat((cls, patches), dim=1) + self.pos_embed
        # Recomputed per call (a few kB): a buffer would have to survive meta-device loading.
        rope_cos, rope_sin = eva02_rope_tables(self.config, device=hidden_states.device)
        all_hidden_states = ()
        for block in self.blocks:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = block(hidden_states, rope_cos, rope_sin)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden_states,
            pooler_output=hidden_states[:, 0],
            hidden_states=all_hidden_states or None,
        )


AutoModel.register(EVA02VisionConfig, EVA02VisionModel, exist_ok=True)

__all__ = ["EVA02PreTrainedModel", "EVA02VisionModel", "eva02_rope_tables"]
