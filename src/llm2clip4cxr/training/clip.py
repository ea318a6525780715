"""Training building blocks for LLM2CLIP4CXR: image-report contrastive training on `transformers.Trainer`.

* `ClipTrainer` scores each local image (and report) against the reports (and images) of the global
  batch (`losses.clip_loss`, gathered across processes), optionally plus a supervised-contrastive term
  on class labels and a normal/abnormal BCE term from a linear head on the image embeddings, as in
  Liang et al. 2026. Only the CLIP term needs paired data; the other two need a `label` per image.
* The trainer trains a `ClipTrainingModel`, a thin `nn.Module` around `LLM2CLIP4CXRModel`. It exists
  because everything a step needs must run inside ONE `forward` (DDP only synchronises gradients of
  what ran through its wrapper): the image tower, the text tower or its cached output, and the
  auxiliary head. The head is a training device: it lives here, not in `modeling/`, and is not saved
  with the model.
* A frozen text tower gives the same pooled output every epoch: `cache_text_embeddings` computes it
  once (before the projection, so `text_projection` still trains) and the collator then emits
  `text_embeds_cached` rows instead of token ids, so the LLM never runs during training.
* `apply_text_lora` puts LoRA adapters on the text tower's attention projections only.
"""

import hashlib
import logging
import os
import random
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer

from ..augment.variants import RandomLike, _as_rng, shuffle_sentences
from ..data.imaging import load_image
from ..fileio import atomic_write
from ..modeling.modeling_llm2clip4cxr import LLM2CLIP4CXRModel
from .losses import clip_loss, supervised_contrastive_loss
from .recipe import apply_lora

logger = logging.getLogger(__name__)

__all__ = [
    "TEXT_LORA_PATTERN",
    "ClipCollator",
    "ClipTrainer",
    "ClipTrainingModel",
    "apply_text_lora",
    "build_caption",
    "cache_text_embeddings",
]

# Attention projections of the text tower's decoder layers (Llama/Mistral/Qwen names). Anchored on
# `text_model.` so that a vision tower with the same module names (CLIP's q/k/v_proj) is left alone.
TEXT_LORA_PATTERN = r"(?:.*\.)?text_model\..*\.(?:q_proj|k_proj|v_proj|o_proj)"
CACHE_KEY = "text_embeds"


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


def build_caption(
    findings: str | None,
    impression: str | None,
    rng: RandomLike = None,
    instruction: str | None = None,
    shuffle_p: float = 0.3,
    instruction_separator: str = "!@#$%^&*()",
) -> str:
    """A training caption from a report's sections: findings, impression or both (drawn uniformly among
    the non-empty choices), with its sentences shuffled with probability `shuffle_p`.

    Args:
        findings, impression: the report sections; either may be empty or None, not both.
        rng: a `random.Random` (advanced in place), an int seed or None (seed 0).
        instruction: prepended in the `instruction + instruction_separator + report` format that the
            processor splits, so the instruction is attended to but not pooled.
        shuffle_p: probability of reordering the sentences (a report's sentences are largely exchangeable).

    Returns:
        `str`: the caption.
    """
    if not 0.0 <= shuffle_p <= 1.0:
        raise ValueError(f"`shuffle_p` must be in [0, 1], got {shuffle_p}.")
    rng = _as_rng(rng)
    parts = [part.strip() for part in (findings, impression) if part and part.strip()]
    if not parts:
        raise ValueError(
            f"A caption needs findings or impression text, got findings={findings!r}, impression={impression!r}."
        )
    choices = parts + ([" ".join(parts)] if len(parts) == 2 else [])
    caption = rng.choice(choices)
    # Draw the coin first so the number of rng draws does not depend on the text.
    if rng.random() < shuffle_p:
        caption = shuffle_sentences(caption, rng) or caption
    return caption if instruction is None else f"{instruction}{instruction_separator}{caption}"


# ---------------------------------------------------------------------------------------------
# Model side: the training module, cached text embeddings, LoRA
# ---------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> LLM2CLIP4CXRModel:
    """The LLM2CLIP4CXRModel inside a PEFT wrapper (LoRA layers are injected in place, so its
    methods run the adapters)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, LLM2CLIP4CXRModel):
        raise TypeError(f"Expected an LLM2CLIP4CXRModel (or a PEFT wrapper of one), got {type(base).__name__}.")
    return base


def _text_is_frozen(model: LLM2CLIP4CXRModel) -> bool:
    return not any(parameter.requires_grad for parameter in model.text_model.parameters())


class ClipTrainingModel(nn.Module):
    """What `ClipTrainer` trains: an `LLM2CLIP4CXRModel` (or its PEFT wrapper) and, with
    `abnormal_head=True`, a linear normal/abnormal classifier on the L2-normalised image embeddings.

    `forward` takes the text either as tokens (`input_ids`, `attention_mask`, `embed_mask`) or as
    `text_embeds_cached`, the text tower's pooled outputs `(batch, text_hidden)` from
    `cache_text_embeddings`; only `text_projection` is applied to those. A frozen text tower runs
    without autograd and in eval mode (no dropout), exactly as its cached outputs were computed.

    Returns a dict: `image_embeds`, `text_embeds` (projected, L2-normalised), `logit_scale`
    (exponentiated and clamped) and `abnormal_logits` `(batch,)` when the head exists.
    """

    def __init__(self, model: nn.Module, abnormal_head: bool = False):
        super().__init__()
        self.model = model
        clip = _unwrap(model)
        self.abnormal_head = nn.Linear(clip.config.projection_dim, 1) if abnormal_head else None

    @property
    def clip(self) -> LLM2CLIP4CXRModel:
        return _unwrap(self.model)

    def train(self, mode: bool = True):
        super().train(mode)
        if _text_is_frozen(self.clip):
            self.clip.text_model.eval()
        return self

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        embed_mask: torch.Tensor | None = None,
        text_embeds_cached: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        clip = self.clip
        image_embeds = F.normalize(clip.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
        if text_embeds_cached is not None:
            pooled = text_embeds_cached.to(dtype=clip.text_projection[1].weight.dtype)
        elif input_ids is not None and attention_mask is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not _text_is_frozen(clip)):
                pooled = clip.text_model(
                    input_ids=input_ids, attention_mask=attention_mask, embed_mask=embed_mask
                ).pooler_output
        else:
            raise ValueError("Pass the text as `input_ids` + `attention_mask` or as `text_embeds_cached`.")
        outputs = {
            "image_embeds": image_embeds,
            "text_embeds": F.normalize(clip.text_projection(pooled), dim=-1),
            "logit_scale": clip.get_logit_scale(),
        }
        if self.abnormal_head is not None:
            outputs["abnormal_logits"] = self.abnormal_head(image_embeds).squeeze(-1)
        return outputs


def _fingerprint(texts: list[str], hidden_size: int) -> str:
    digest = hashlib.sha256(str(hidden_size).encode())
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


@torch.no_grad()
def cache_text_embeddings(
    model: nn.Module,
    texts: list[str],
    batch_size: int = 32,
    path: str | os.PathLike | None = None,
    processor=None,
) -> torch.Tensor:
    """The text tower's pooled outputs for `texts`, computed once, for training with a frozen text tower.

    These are the outputs BEFORE `text_projection`, so the projection keeps training on them. With `path`,
    they are stored as safetensors (written to a temporary file then renamed, so a killed run never leaves
    a partial cache) and reused by later calls whose texts and hidden size match; a stale file is
    recomputed. The cache does not know the tower's weights: use one path per text tower.

    Args:
        model: an `LLM2CLIP4CXRModel` (or a PEFT wrapper of one).
        texts: the captions, in dataset order (an instruction may be embedded with the separator).
        batch_size: texts per forward pass.
        path: the safetensors file.
        processor: an `LLM2CLIP4CXRProcessor` to tokenize with; defaults to the text tower's tokenizer.

    Returns:
        `torch.Tensor` of shape `(len(texts), text_hidden_size)`, float32 on CPU.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
    clip = _unwrap(model)
    fingerprint = _fingerprint(list(texts), clip.text_embed_dim)
    if path is not None and os.path.isfile(path):
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as handle:
            stored = (handle.metadata() or {}).get("fingerprint")
        if stored == fingerprint:
            return load_file(os.fspath(path))[CACHE_KEY]
        logger.warning("%s was computed for other texts or another text tower size; recomputing it.", path)

    text_model = clip.text_model
    was_training = text_model.training
    text_model.eval()
    device = next(text_model.parameters()).device
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch_texts = list(texts[start : start + batch_size])
        batch = processor(text=batch_texts) if processor is not None else text_model.tokenize(batch_texts)
        batch = {key: batch[key].to(device) for key in ("input_ids", "attention_mask", "embed_mask")}
        chunks.append(text_model(**batch).pooler_output.float().cpu())
    text_model.train(was_training)
    embeddings = torch.cat(chunks) if chunks else torch.empty(0, clip.text_embed_dim)

    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {CACHE_KEY: embeddings.contiguous()}
        atomic_write(path, lambda temp: save_file(tensors, temp, metadata={"fingerprint": fingerprint}))
    return embeddings


def apply_text_lora(model: LLM2CLIP4CXRModel, r: int = 16, alpha: int = 32, dropout: float = 0.05):
    """LoRA adapters on the text tower's q/k/v/o projections (modules matching `TEXT_LORA_PATTERN`).

    The text tower's own weights are frozen; the vision tower, both projections and the logit scale stay
    trainable (peft freezes everything else, so they are switched back on). `merge_and_unload()` on the
    result gives back a plain `LLM2CLIP4CXRModel`.
    """
    targets = [name for name, _ in model.named_modules() if re.fullmatch(TEXT_LORA_PATTERN, name)]
    if not targets:
        raise ValueError(
            f"No module of the text tower matches {TEXT_LORA_PATTERN!r}; LoRA needs a Llama/Mistral/Qwen-style "
            "backbone with q_proj/k_proj/v_proj/o_proj."
        )
    # Full module names: peft matches a list entry as a name suffix, so nothing else can match.
    peft_model = apply_lora(model, r=r, alpha=alpha, dropout=dropout, target_modules=targets)
    base = peft_model.get_base_model()
    for name, parameter in base.named_parameters():
        if not name.startswith("text_model."):
            parameter.requires_grad_(True)
    return peft_model


# ---------------------------------------------------------------------------------------------
# Data and trainer
# ---------------------------------------------------------------------------------------------


class ClipCollator:
    """Turns rows `{"image": path, "findings", "impression"[, "label"][, "index"]}` into a batch.

    Images are read with `data.imaging.load_image` and prepared by the processor. Without `text_embeddings`
    a caption is drawn per row and call with `build_caption` (so each epoch sees other captions) and
    tokenized; with them, row `index` of `text_embeddings` is emitted as `text_embeds_cached` and no
    text is tokenized. `label` (an int class, 0 = normal) becomes `labels`.
    """

    def __init__(
        self,
        processor,
        instruction: str | None = None,
        shuffle_p: float = 0.3,
        text_embeddings: torch.Tensor | None = None,
        seed: int = 0,
    ):
        self.processor = processor
        self.instruction = instruction
        self.shuffle_p = shuffle_p
        self.text_embeddings = text_embeddings
        self.rng = random.Random(seed)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = dict(self.processor(images=[load_image(row["image"]) for row in rows]))
        if self.text_embeddings is not None:
            if any(row.get("index") is None for row in rows):
                raise ValueError("Rows need an `index` column (their row in the cached text embeddings).")
            batch["text_embeds_cached"] = self.text_embeddings[[row["index"] for row in rows]]
        else:
            captions = [
                build_caption(row.get("findings"), row.get("impression"), self.rng, shuffle_p=self.shuffle_p)
                for row in rows
            ]
            batch.update(self.processor(text=captions, instruction=self.instruction))
        if rows[0].get("label") is not None:
            batch["labels"] = torch.tensor([int(row["label"]) for row in rows])
        return batch


class ClipTrainer(Trainer):
    """`Trainer` for a `ClipTrainingModel`: the gathered symmetric CLIP loss, plus optional terms.

    Args:
        sup_con_weight: weight of `supervised_contrastive_loss` on the stacked image and text embeddings
            (each pair shares its row's label); needs `labels` in the batch.
        sup_con_temperature: its temperature.
        bce_weight: weight of the normal/abnormal BCE of the model's `abnormal_head` (target `label != 0`).
        gather_across_processes: score local rows against every process's rows.
    """

    def __init__(
        self,
        *args,
        sup_con_weight: float = 0.0,
        sup_con_temperature: float = 0.07,
        bce_weight: float = 0.0,
        gather_across_processes: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        for name, weight in (("sup_con_weight", sup_con_weight), ("bce_weight", bce_weight)):
            if weight < 0:
                raise ValueError(f"`{name}` must be >= 0, got {weight}.")
        if bce_weight > 0 and getattr(self.model, "abnormal_head", None) is None:
            raise ValueError("`bce_weight` > 0 needs a model built as `ClipTrainingModel(model, abnormal_head=True)`.")
        self.sup_con_weight = sup_con_weight
        self.sup_con_temperature = sup_con_temperature
        self.bce_weight = bce_weight
        self.gather_across_processes = gather_across_processes

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None and (self.sup_con_weight > 0 or self.bce_weight > 0):
            raise ValueError("`sup_con_weight` and `bce_weight` need a `label` column in the dataset.")
        outputs = model(**inputs)
        image_embeds, text_embeds = outputs["image_embeds"], outputs["text_embeds"]
        loss = clip_loss(image_embeds, text_embeds, outputs["logit_scale"], gather=self.gather_across_processes)
        if self.sup_con_weight > 0:
            # Stacked per process as [images; texts]; image i and text i share labels[i].
            loss = loss + self.sup_con_weight * supervised_contrastive_loss(
                torch.cat([image_embeds, text_embeds]), torch.cat([labels, labels]), self.sup_con_temperature,
                gather=self.gather_across_processes,
            )
        if self.bce_weight > 0:
            target = (labels != 0).to(outputs["abnormal_logits"].dtype)
            loss = loss + self.bce_weight * F.binary_cross_entropy_with_logits(outputs["abnormal_logits"], target)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Evaluation reports the loss only: the default would try to collect logits and labels.
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
