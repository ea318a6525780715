"""LLM2Vec4CXR: a decoder LLM with bidirectional attention and a pooling head, as a report encoder.

Shipped inside every saved checkpoint as Hub remote code: imports only torch, transformers and the
sibling configuration file. The attention mask is NOT causal: every token sees every other
non-padding token (the backbone config carries `is_causal=False`).
"""

import json
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import cached_file, logging

from .configuration_llm2vec4cxr import DEFAULT_INSTRUCTION_SEPARATOR, LLM2Vec4CXRConfig

logger = logging.get_logger(__name__)

# Files of the sentence-transformers layout written next to config.json.
ST_MODULES_FILE = "modules.json"
ST_CONFIG_FILE = "config_sentence_transformers.json"


class CheckpointMismatchError(ValueError):
    """The weights of a checkpoint do not fit the model its config describes."""


class LatentAttentionPooling(nn.Module):
    """Latent-attention pooling (NV-Embed style, as in the published LLM2Vec4CXR).

    The token states are the queries of a multi-head attention whose keys and values are a learned
    latent array; a Linear-GELU-Linear follows, then a mean over the content tokens. Parameter
    names (`latents`, `multihead_attn.*`, `mlp.{0,2}.*`) match the published weights.
    """

    def __init__(self, hidden_size: int, num_latents: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.latents = nn.Parameter(torch.empty(num_latents, hidden_size))
        self.multihead_attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, hidden_size))

    def forward(self, hidden_states: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        # Same math as self.multihead_attn(tokens, latents, latents), written out so that the latent
        # keys/values are projected once per batch (not once per sample) and only the pooled tokens
        # (no instruction, no padding) are attended from: the pooling cost then scales with the report.
        batch_size, _, hidden_size = hidden_states.shape
        attention = self.multihead_attn
        num_heads = attention.num_heads
        head_dim = hidden_size // num_heads
        selected = pool_mask.bool()
        tokens = hidden_states[selected]  # (N, d): the pooled tokens of the whole batch
        sample_of_token = selected.nonzero()[:, 0]  # (N,)
        w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attention.in_proj_bias.chunk(3)
        latents = self.latents.to(hidden_states.dtype)
        query = F.linear(tokens, w_q, b_q).view(-1, num_heads, head_dim).transpose(0, 1)  # (h, N, dh)
        key = F.linear(latents, w_k, b_k).view(-1, num_heads, head_dim).transpose(0, 1)  # (h, L, dh)
        value = F.linear(latents, w_v, b_v).view(-1, num_heads, head_dim).transpose(0, 1)  # (h, L, dh)
        dropout = attention.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout)  # (h, N, dh)
        attended = attention.out_proj(attended.transpose(0, 1).reshape(-1, hidden_size))  # (N, d)
        per_token = self.mlp(attended)
        sums = per_token.new_zeros(batch_size, hidden_size).index_add_(0, sample_of_token, per_token)
        counts = selected.sum(dim=1, keepdim=True).clamp(min=1).to(per_token.dtype)
        return sums / counts


def masked_mean(hidden_states: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden_states` (B, T, d) over the positions where `pool_mask` (B, T) is 1."""
    weights = pool_mask.to(hidden_states.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def weighted_mean(hidden_states: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
    """Position-weighted mean: the k-th content token weighs k (later tokens saw more in causal
    pretraining). Counting from the first content token keeps it independent of padding side."""
    positions = pool_mask.cumsum(dim=1) * pool_mask  # (B, T): 1..n on content tokens, 0 elsewhere
    return masked_mean(hidden_states * positions.unsqueeze(-1).to(hidden_states.dtype), pool_mask) / (
        masked_mean(positions.unsqueeze(-1).to(hidden_states.dtype), pool_mask)
    )


def last_token(hidden_states: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
    """State of the last content token, wherever the padding is."""
    positions = torch.arange(pool_mask.shape[1], device=pool_mask.device)
    last = (pool_mask.to(torch.long) * positions).argmax(dim=1)  # (B,)
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last]


# ---------------------------------------------------------------------- tokenization
# Module-level so that LLM2CLIP4CXRProcessor tokenizes exactly as the encoder does, without a model.


def prepare_report_tokenizer(tokenizer, instruction_separator: str = DEFAULT_INSTRUCTION_SEPARATOR):
    """Check that `tokenizer` can tokenize for LLM2Vec4CXR and give it a pad token (its eos, as the published
    model) when it has none. Returns the tokenizer."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"LLM2Vec4CXR needs a fast tokenizer (token offsets locate the report after the "
            f"instruction), got {type(tokenizer).__name__}. Load it with use_fast=True."
        )
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("The tokenizer has neither a pad nor an eos token: set `tokenizer.pad_token`.")
        tokenizer.pad_token = tokenizer.eos_token
    # Instruction-prefixed strings ("instruction" + sep + "report") are stored in datasets and
    # prompts; a tokenizer whose normaliser alters the separator would hide that boundary.
    ids = tokenizer(instruction_separator, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if decoded.strip() != instruction_separator:
        raise ValueError(
            f"The instruction separator {instruction_separator!r} does not survive the tokenizer round trip "
            f"(decoded as {decoded!r}). Choose an `instruction_separator` the tokenizer keeps verbatim."
        )
    return tokenizer


def split_instruction(
    texts: Sequence[str],
    instruction: str | None = None,
    instruction_separator: str = DEFAULT_INSTRUCTION_SEPARATOR,
    *,
    default_instruction: str | None = None,
) -> list[tuple[str, str]]:
    """Split each text into (instruction, report). A text may carry its own instruction as
    `"instruction" + instruction_separator + "report"`; otherwise `instruction` applies, and when that is
    None, `default_instruction` (the one a checkpoint was trained with). `instruction=""` means none."""
    separator = instruction_separator
    if isinstance(texts, str):
        raise TypeError("Pass a list of texts, not a single string.")
    if instruction is not None and separator in instruction:
        instruction = instruction.split(separator)[0] if instruction.endswith(separator) else instruction
        if separator in instruction:
            raise ValueError(f"`instruction` contains the separator {separator!r} in its middle: {instruction!r}.")
    pairs = []
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"Text {index} is a {type(text).__name__}, expected str.")
        text_instruction = instruction if instruction is not None else default_instruction
        if separator in text:
            if instruction:
                raise ValueError(
                    f"Text {index} already carries an instruction (it contains {separator!r}) and "
                    f"`instruction=` was given too; use one or the other."
                )
            text_instruction, text = text.split(separator, 1)
        if not text.strip():
            raise ValueError(f"Text {index} has an empty report: {texts[index]!r}. Remove it or give report text.")
        pairs.append(((text_instruction or "").strip(), text))
    return pairs


# Reports are cut (at a space) this many tokens' worth of characters past `max_seq_length` before tokenizing:
# the kept tokens are the same, and a 200k-character report no longer costs ~46 bytes per character.
_CUT_MARGIN_TOKENS = 16


def _longest_token_chars(tokenizer) -> int:
    """Characters the longest vocabulary entry can cover (cached on the tokenizer)."""
    cached = getattr(tokenizer, "_llm2vec4cxr_longest_token_chars", None)
    if cached is None:
        specials = set(tokenizer.all_special_tokens)
        cached = max((len(token) for token in tokenizer.get_vocab() if token not in specials), default=1)
        tokenizer._llm2vec4cxr_longest_token_chars = cached
    return cached


def _cut_report(report: str, max_chars: int) -> str:
    """`report` cut at the first whitespace after `max_chars` characters (unchanged when shorter)."""
    if len(report) <= max_chars:
        return report
    space = next((i for i in range(max_chars, len(report)) if report[i].isspace()), None)
    return report if space is None else report[:space]


def tokenize_reports(
    tokenizer,
    texts: Sequence[str],
    instruction: str | None = None,
    *,
    instruction_separator: str = DEFAULT_INSTRUCTION_SEPARATOR,
    max_seq_length: int = 512,
    embed_mask_rule: str = "offsets",
    default_instruction: str | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Tokenize reports as LLM2Vec4CXR expects them: `instruction.strip() + " " + report`, with `embed_mask`
    covering only the report tokens (found as `embed_mask_rule` says, see `EMBED_MASK_RULES`). Reports
    longer than `max_seq_length` are cut at their end (the instruction is always kept). `tokenizer` must
    have passed `prepare_report_tokenizer`. `default_instruction` applies where neither `instruction` nor the
    text gives one (see `split_instruction`).

    Memory is bounded by the batch, not by the length of the reports: each report is first cut (at a space)
    well past what `max_seq_length` tokens can cover.

    Returns:
        A dict of `input_ids`, `attention_mask`, `embed_mask` of shape `(len(texts), longest)`, padded on the
        tokenizer's `padding_side`, and the number of truncated reports.
    """
    pairs = split_instruction(texts, instruction, instruction_separator, default_instruction=default_instruction)
    max_report_chars = (max_seq_length + _CUT_MARGIN_TOKENS) * _longest_token_chars(tokenizer)
    pairs = [(text_instruction, _cut_report(report, max_report_chars)) for text_instruction, report in pairs]
    full_texts, report_starts = [], []
    for text_instruction, report in pairs:
        prefix = f"{text_instruction} " if text_instruction else ""
        full_texts.append(prefix + report)
        report_starts.append(len(prefix))
    encoded = tokenizer(
        full_texts,
        add_special_tokens=True,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    all_ids, all_embed, truncated = [], [], 0
    for index, (ids, offsets, special, start) in enumerate(
        zip(encoded["input_ids"], encoded["offset_mapping"], encoded["special_tokens_mask"], report_starts)
    ):
        if embed_mask_rule == "report_token_count":
            count = min(len(tokenizer(pairs[index][1], add_special_tokens=False)["input_ids"]), len(ids))
            embed = [0] * (len(ids) - count) + [1] * count
        else:
            embed, seen_content = [], False
            for (_, end), is_special in zip(offsets, special):
                # A special token belongs to the report only after it (an appended eos), never before.
                is_content = seen_content if is_special else end > start
                seen_content = seen_content or is_content
                embed.append(int(is_content))
        if len(ids) > max_seq_length:
            truncated += 1
            num_trailing_special = 0
            while num_trailing_special < len(special) and special[len(special) - 1 - num_trailing_special]:
                num_trailing_special += 1
            keep = max_seq_length - num_trailing_special
            ids = ids[:keep] + ids[len(ids) - num_trailing_special :]
            embed = embed[:keep] + embed[len(embed) - num_trailing_special :]
        if not any(embed):
            raise ValueError(
                f"Text {index}: the instruction alone fills max_seq_length={max_seq_length} tokens, leaving no "
                f"room for the report. Shorten the instruction or raise `max_seq_length`."
            )
        all_ids.append(ids)
        all_embed.append(embed)
    return _pad_reports(tokenizer, all_ids, all_embed), truncated


def _pad_reports(tokenizer, all_ids: list[list[int]], all_embed: list[list[int]]) -> dict[str, torch.Tensor]:
    # Hand-padded: tokenizer.pad() does not know the extra `embed_mask` key.
    longest = max(len(ids) for ids in all_ids)
    pad_id = tokenizer.pad_token_id
    left = tokenizer.padding_side == "left"
    input_ids = torch.full((len(all_ids), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(all_ids), longest), dtype=torch.long)
    embed_mask = torch.zeros((len(all_ids), longest), dtype=torch.long)
    for row, (ids, embed) in enumerate(zip(all_ids, all_embed)):
        span = slice(longest - len(ids), longest) if left else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, span] = 1
        embed_mask[row, span] = torch.tensor(embed, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "embed_mask": embed_mask}


class LLM2Vec4CXRPreTrainedModel(PreTrainedModel):
    config_class = LLM2Vec4CXRConfig
    config: LLM2Vec4CXRConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LatentAttentionPooling):
            init.normal_(module.latents, mean=0.0, std=self.config.backbone_config.initializer_range)


class LLM2Vec4CXRModel(LLM2Vec4CXRPreTrainedModel):
    """Bidirectional decoder backbone + pooling over the report tokens (the instruction is attended
    to but pooled out through `embed_mask`).

    `model.tokenizer` is attached by `from_pretrained` when the checkpoint has tokenizer files, and
    `save_pretrained` writes it back together with a sentence-transformers layout.
    """

    def __init__(self, config: LLM2Vec4CXRConfig):
        super().__init__(config)
        self.model = AutoModel.from_config(config.backbone_config)
        self._no_split_modules = list(getattr(self.model, "_no_split_modules", None) or [])
        if config.pooling_mode == "latent_attention":
            self.latent_attn = LatentAttentionPooling(
                config.hidden_size, config.num_latents, config.latent_attention_heads, config.latent_mlp_dim
            )
        self.tokenizer = None
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        embed_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`): token ids, padded on either side.
            attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`): 1 for real tokens, 0 for padding.
                Attention is bidirectional over the real tokens.
            embed_mask (`torch.Tensor` of shape `(batch_size, seq_len)`, *optional*): 1 for the tokens to pool
                (the report), 0 for the instruction and padding. Defaults to `attention_mask`.

        Returns:
            `BaseModelOutputWithPooling` with `last_hidden_state` `(batch_size, seq_len, hidden_size)` and
            `pooler_output` `(batch_size, hidden_size)`.
        """
        reference = input_ids if input_ids is not None else inputs_embeds
        if reference is None:
            raise ValueError("LLM2Vec4CXRModel.forward needs `input_ids` or `inputs_embeds`.")
        if attention_mask is None:
            attention_mask = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
        if position_ids is None:
            # Count positions from the first real token: plain RoPE is relative, but scaled RoPE variants
            # and the max_position_embeddings limit see absolute positions, which left padding would shift.
            position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        pool_mask = attention_mask if embed_mask is None else embed_mask * attention_mask
        pooled = self.pool(hidden_states, pool_mask)
        if self.config.normalize_embeddings:
            pooled = F.normalize(pooled, p=2, dim=-1)
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden_states,
            pooler_output=pooled,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def pool(self, hidden_states: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        """Pool token states (B, T, d) over `pool_mask` (B, T) with the configured pooling mode."""
        mode = self.config.pooling_mode
        if mode == "mean":
            return masked_mean(hidden_states, pool_mask)
        if mode == "weighted_mean":
            return weighted_mean(hidden_states, pool_mask)
        if mode == "eos":
            return last_token(hidden_states, pool_mask)
        return self.latent_attn(hidden_states, pool_mask)

    # ------------------------------------------------------------------ tokenization and encode()

    def set_tokenizer(self, tokenizer) -> None:
        """Attach a (fast) tokenizer; pads with eos when the tokenizer has no pad token, as the
        published model does (see `prepare_report_tokenizer`)."""
        if tokenizer is not None:
            prepare_report_tokenizer(tokenizer, self.config.instruction_separator)
        self.tokenizer = tokenizer

    def split_instruction(self, texts: Sequence[str], instruction: str | None = None) -> list[tuple[str, str]]:
        """Split each text into (instruction, report) with this model's separator and default instruction
        (see `split_instruction`)."""
        return split_instruction(
            texts, instruction, self.config.instruction_separator, default_instruction=self.config.default_instruction
        )

    def tokenize(
        self,
        texts: Sequence[str],
        instruction: str | None = None,
        return_truncated_count: bool = False,
    ):
        """Tokenize reports as the model expects them: `instruction.strip() + " " + report`, with
        `embed_mask` covering only the report tokens. Reports longer than `max_seq_length` are cut
        at their end (the instruction is always kept).

        `instruction=None` uses the instruction the checkpoint was trained with (`config.default_instruction`,
        if any); `instruction=""` means none.

        Returns a dict of `input_ids`, `attention_mask`, `embed_mask` (padded on the tokenizer's
        `padding_side`), and the number of truncated reports when `return_truncated_count`.
        """
        if self.tokenizer is None:
            raise ValueError(
                "This LLM2Vec4CXRModel has no tokenizer: load it from a checkpoint with tokenizer files or "
                "call `model.set_tokenizer(AutoTokenizer.from_pretrained(...))`."
            )
        batch, truncated = tokenize_reports(
            self.tokenizer,
            texts,
            instruction,
            instruction_separator=self.config.instruction_separator,
            max_seq_length=self.config.max_seq_length,
            embed_mask_rule=getattr(self.config, "embed_mask_rule", "offsets"),
            default_instruction=self.config.default_instruction,
        )
        return (batch, truncated) if return_truncated_count else batch

    @torch.inference_mode()
    def encode(
        self,
        texts: str | Sequence[str],
        instruction: str | None = None,
        batch_size: int = 32,
        *,
        normalize: bool | None = None,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = False,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        """Embed reports.

        Args:
            texts: a list of reports (a single string gives a 1-D result). A report may carry its own
                instruction as `"instruction" + config.instruction_separator + "report"`.
            instruction: prepended to every report and pooled out (attended to, not averaged). None (the
                default) uses the instruction the checkpoint was trained with (`config.default_instruction`);
                `""` means no instruction.
            batch_size: reports per forward pass; batches are formed after sorting by length, so
                little compute is spent on padding, and results come back in input order.
            normalize: L2-normalise the embeddings (they already are when `config.normalize_embeddings`).
            show_progress_bar: defaults to True for more than 10 batches.
            device: where the forward passes run (default: the model's device).
            dtype: compute dtype (autocast); default bfloat16 on CUDA, the weights' dtype elsewhere.

        Returns:
            A float32 tensor (or array) of shape `(len(texts), hidden_size)`, on the CPU.
        """
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if not texts:
            raise ValueError("`texts` is empty: nothing to encode.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
        self.split_instruction(texts, instruction)  # every bad input is refused before any compute
        device = torch.device(device) if device is not None else self.device
        if dtype is None and device.type == "cuda":
            dtype = torch.bfloat16
        # Longest first (a too-large batch fails at once); character length stands in for token length, so
        # nothing is tokenized up front: each batch is tokenized (one ahead, in a thread) when it is needed.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        batches = [[texts[i] for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)]
        if show_progress_bar is None:
            show_progress_bar = len(batches) > 10
        was_training = self.training
        self.eval()
        try:
            chunks, truncated = self._encode_batches(batches, instruction, device, dtype, normalize, show_progress_bar)
        finally:
            self.train(was_training)
        if truncated:
            warnings.warn(
                f"{truncated} of {len(texts)} reports exceeded max_seq_length={self.config.max_seq_length} "
                f"tokens and were truncated at their end.",
                stacklevel=2,
            )
        sorted_embeddings = torch.cat(chunks)
        embeddings = torch.empty_like(sorted_embeddings)
        embeddings[torch.tensor(order, device=sorted_embeddings.device)] = sorted_embeddings
        embeddings = embeddings.cpu()
        if single:
            embeddings = embeddings[0]
        return embeddings.numpy() if convert_to_numpy else embeddings

    def _encode_batches(self, batches, instruction, device, dtype, normalize, show_progress_bar):
        """(pooled float32 embeddings of each batch, kept on `device`; number of truncated reports). Batch n + 1
        is tokenized in a thread (into pinned memory on CUDA) while batch n runs."""
        autocast = dtype is not None and dtype != torch.float32
        pin = device.type == "cuda"

        def prepare(batch_texts):
            features, truncated = self.tokenize(batch_texts, instruction, return_truncated_count=True)
            if pin:
                features = {key: value.pin_memory() for key, value in features.items()}
            return features, truncated

        chunks, truncated = [], 0
        with ThreadPoolExecutor(max_workers=1) as producer:
            pending = producer.submit(prepare, batches[0])
            for number in logging.tqdm(range(len(batches)), desc="Encoding", disable=not show_progress_bar):
                features, batch_truncated = pending.result()
                truncated += batch_truncated
                if number + 1 < len(batches):
                    pending = producer.submit(prepare, batches[number + 1])
                batch = {key: value.to(device, non_blocking=pin) for key, value in features.items()}
                with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                    pooled = self(**batch).pooler_output
                if normalize:
                    pooled = F.normalize(pooled.float(), p=2, dim=-1)
                chunks.append(pooled.float())  # stays on the device: one transfer at the end
        return chunks, truncated

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, tokenizer=None, **kwargs):
        """Load a checkpoint; unlike plain transformers, weights that do not match the config raise
        `CheckpointMismatchError` naming the keys instead of being initialised at random. The
        checkpoint's tokenizer is attached as `model.tokenizer` (or pass `tokenizer=`).

        A folder in the published LLM2Vec4CXR layout (a plain decoder `config.json`) raises a `ValueError`
        telling to convert it with `llm2clip4cxr convert llm2vec4cxr`."""
        if "config" not in kwargs:
            _refuse_published_layout(pretrained_model_name_or_path, kwargs)
        want_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = from_pretrained_strict(
            cls,
            pretrained_model_name_or_path,
            *model_args,
            describe=lambda model: (
                f"LLM2Vec4CXRConfig(pooling_mode={model.config.pooling_mode!r}, "
                f"hidden_size={model.config.hidden_size})"
            ),
            **kwargs,
        )
        if tokenizer is None:
            tokenizer = _load_tokenizer_if_present(pretrained_model_name_or_path, kwargs)
        model.set_tokenizer(tokenizer)
        return (model, loading_info) if want_loading_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights, config and remote code, the tokenizer when attached, and a
        sentence-transformers layout so `SentenceTransformer(save_directory, trust_remote_code=True)` works."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True) is False:
            return
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory)
        write_sentence_transformers_layout(save_directory, self.config)


def from_pretrained_strict(cls, pretrained_model_name_or_path, *model_args, describe, **kwargs):
    """`PreTrainedModel.from_pretrained` of `cls`, raising `CheckpointMismatchError` naming every missing,
    unexpected or size-mismatched key instead of initialising those weights at random.

    Returns `(model, loading_info)`. `describe(model)` names the configuration in the error message.
    """
    kwargs.pop("output_loading_info", None)
    # Let transformers finish loading on a size mismatch so that every offending key can be named below.
    kwargs.setdefault("ignore_mismatched_sizes", True)
    model, loading_info = PreTrainedModel.from_pretrained.__func__(
        cls, pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
    )
    problems = []
    for kind in ("missing_keys", "unexpected_keys"):
        keys = sorted(str(key) for key in loading_info.get(kind) or [])
        if keys:
            problems.append(f"{kind}: {', '.join(keys[:20])}" + (" ..." if len(keys) > 20 else ""))
    mismatched = loading_info.get("mismatched_keys") or []
    if mismatched:
        shown = [
            f"{key} (checkpoint {tuple(saved)} vs model {tuple(expected)})"
            for key, saved, expected in (_as_triple(item) for item in sorted(mismatched, key=str)[:20])
        ]
        problems.append("mismatched_keys: " + ", ".join(shown))
    if problems:
        raise CheckpointMismatchError(
            f"The checkpoint {pretrained_model_name_or_path} does not match {describe(model)}: "
            + "; ".join(problems)
            + ". Fix the config (pooling mode, sizes) to match the weights, or convert the checkpoint "
            "with `llm2clip4cxr convert`."
        )
    return model, loading_info


def _refuse_published_layout(path, load_kwargs) -> None:
    """The published LLM2Vec4CXR folder has a plain decoder config.json: loading it as this class would
    build a default config and then fail on every key, so say what to do instead."""
    hub_kwargs = {
        key: load_kwargs[key]
        for key in ("cache_dir", "revision", "token", "local_files_only", "subfolder")
        if key in load_kwargs
    }
    config_file = cached_file(path, "config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if config_file is None:
        return
    with open(config_file, encoding="utf-8") as handle:
        model_type = json.load(handle).get("model_type")
    if model_type != LLM2Vec4CXRConfig.model_type:
        raise ValueError(
            f"{path} is not an LLM2Vec4CXR checkpoint of this package (its config.json has model_type "
            f"{model_type!r}). If it is the published LLM2Vec4CXR release (a plain decoder config with "
            f"`latent_attn.*` weights), convert it first: `llm2clip4cxr convert llm2vec4cxr {path} OUTPUT_DIR`."
        )


def _as_triple(item):
    """transformers reports a mismatched key as (key, checkpoint_shape, model_shape)."""
    if isinstance(item, (tuple, list)) and len(item) == 3:
        return tuple(item)
    return (str(item), (), ())


def _load_tokenizer_if_present(path, load_kwargs):
    hub_kwargs = {
        key: load_kwargs[key]
        for key in ("cache_dir", "revision", "token", "local_files_only", "subfolder", "trust_remote_code")
        if key in load_kwargs
    }
    tokenizer_config = cached_file(
        path, "tokenizer_config.json", _raise_exceptions_for_missing_entries=False, **{
            key: value for key, value in hub_kwargs.items() if key != "trust_remote_code"
        }
    )
    if tokenizer_config is None:
        return None
    return AutoTokenizer.from_pretrained(path, **hub_kwargs)


def write_sentence_transformers_layout(save_directory, config: LLM2Vec4CXRConfig) -> None:
    """modules.json points sentence-transformers at `LLM2Vec4CXRSentenceEncoder` in this file (loaded
    as remote code); the config's named instructions become its prompts."""
    modules = [
        {
            "idx": 0,
            "name": "0",
            "path": "",
            "type": f"{LLM2Vec4CXRSentenceEncoder.__module__.rsplit('.', 1)[-1]}.LLM2Vec4CXRSentenceEncoder",
        }
    ]
    st_config = {
        "model_type": "SentenceTransformer",
        "prompts": dict(config.instructions),
        "default_prompt_name": getattr(config, "default_instruction_name", None),
        "similarity_fn_name": "cosine",
    }
    for name, content in ((ST_MODULES_FILE, modules), (ST_CONFIG_FILE, st_config)):
        path = os.path.join(save_directory, name)
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(content, handle, indent=2)
        os.replace(path + ".tmp", path)


class LLM2Vec4CXRSentenceEncoder(nn.Module):
    """sentence-transformers input module around an [`LLM2Vec4CXRModel`].

    Duck-typed (no sentence_transformers import) so this file stays loadable as remote code.
    Prompts given to `SentenceTransformer.encode(prompt=...)` are used as the instruction.
    """

    modalities = ["text"]
    # SentenceTransformer.save() then writes the model (and this remote code) at the folder root.
    save_in_root = True

    def __init__(self, model: LLM2Vec4CXRModel, bucket_rows: int = 32):
        super().__init__()
        self.auto_model = model
        # Rows per length bucket of `forward` (training batches); a batch this small runs in one pass.
        self.bucket_rows = bucket_rows

    @classmethod
    def load(cls, input_path, **kwargs):
        # This module is itself the checkpoint's remote code, which the user has already trusted; without
        # the flag the tokenizer's AutoConfig lookup would prompt for the same code again.
        return cls(LLM2Vec4CXRModel.from_pretrained(input_path, trust_remote_code=True))

    @property
    def tokenizer(self):
        return self.auto_model.tokenizer

    @property
    def max_seq_length(self) -> int:
        return self.auto_model.config.max_seq_length

    def preprocess(self, inputs, prompt: str | None = None, **kwargs):
        # prompt None: the checkpoint's own instruction (config.default_instruction); "" means none.
        return self.auto_model.tokenize(list(inputs), instruction=prompt)

    def tokenize(self, texts, **kwargs):
        return self.preprocess(texts)

    def forward(self, features: dict, **kwargs) -> dict:
        input_ids, attention_mask = features["input_ids"], features["attention_mask"]
        embed_mask = features.get("embed_mask")
        lengths = attention_mask.sum(dim=1)
        rows, width = input_ids.shape
        if rows <= self.bucket_rows or int(lengths.sum()) > 0.75 * rows * width:
            output = self.auto_model(input_ids=input_ids, attention_mask=attention_mask, embed_mask=embed_mask)
            features["token_embeddings"] = output.last_hidden_state
            features["sentence_embedding"] = output.pooler_output
            return features
        # A training batch of reports is padded to its longest one (often 3x the median): run it as length-sorted
        # buckets, each trimmed to its own longest row. Same embeddings and gradients, a fraction of the compute.
        left = bool((attention_mask[:, 0] == 0).any())
        order = torch.argsort(lengths, descending=True)
        pooled = []
        token_embeddings = None
        for start in range(0, rows, self.bucket_rows):
            bucket = order[start : start + self.bucket_rows]
            bucket_width = int(lengths[bucket].max())
            cols = slice(width - bucket_width, width) if left else slice(0, bucket_width)
            output = self.auto_model(
                input_ids=input_ids[bucket][:, cols],
                attention_mask=attention_mask[bucket][:, cols],
                embed_mask=None if embed_mask is None else embed_mask[bucket][:, cols],
            )
            if token_embeddings is None:
                token_embeddings = output.last_hidden_state.new_zeros(rows, width, output.last_hidden_state.shape[-1])
            token_embeddings[bucket.unsqueeze(1), torch.arange(width, device=order.device)[cols]] = output.last_hidden_state
            pooled.append(output.pooler_output)
        sentence_embedding = torch.empty_like(torch.cat(pooled))
        sentence_embedding[order] = torch.cat(pooled)
        features["token_embeddings"] = token_embeddings
        features["sentence_embedding"] = sentence_embedding
        return features

    def get_embedding_dimension(self) -> int:
        return self.auto_model.config.hidden_size

    get_sentence_embedding_dimension = get_embedding_dimension

    def save(self, output_path: str, *args, **kwargs) -> None:
        self.auto_model.save_pretrained(output_path)


LLM2Vec4CXRConfig.register_for_auto_class()
LLM2Vec4CXRModel.register_for_auto_class("AutoModel")

__all__ = [
    "CheckpointMismatchError",
    "LatentAttentionPooling",
    "LLM2Vec4CXRModel",
    "LLM2Vec4CXRPreTrainedModel",
    "LLM2Vec4CXRSentenceEncoder",
    "prepare_report_tokenizer",
    "split_instruction",
    "tokenize_reports",
]
