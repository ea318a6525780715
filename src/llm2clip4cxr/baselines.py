"""Baseline image-text encoders that LLM2CLIP4CXR is compared against, behind one interface.

`HFDualEncoder` wraps any local `transformers` CLIP or SigLIP checkpoint and exposes `encode_texts(texts)`
and `encode_images(images)`, each returning L2-normalised float32 numpy arrays: the callables the evaluation
harness (`llm2clip4cxr.evaluation.report_tasks`) plugs encoders in as.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoProcessor

# Dual encoders whose transformers model has get_text_features / get_image_features.
SUPPORTED_DUAL_ENCODERS = ("clip", "siglip", "siglip2")


class HFDualEncoder:
    """A local `transformers` CLIP/SigLIP checkpoint as an encoder of reports and images.

    Args:
        model_name_or_path: folder (or Hub id, when online) of a CLIP or SigLIP checkpoint with its processor.
        batch_size: texts or images per forward pass.
        device: where to run; defaults to CPU.
    """

    def __init__(self, model_name_or_path: str | os.PathLike, batch_size: int = 32, device: str | None = None):
        self.model = AutoModel.from_pretrained(model_name_or_path).eval()
        model_type = self.model.config.model_type
        if model_type not in SUPPORTED_DUAL_ENCODERS:
            raise ValueError(
                f"{model_name_or_path} is a {model_type!r} model; HFDualEncoder supports {SUPPORTED_DUAL_ENCODERS}."
            )
        self.processor = AutoProcessor.from_pretrained(model_name_or_path)
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
        self.batch_size = batch_size
        self.device = torch.device(device or "cpu")
        self.model.to(self.device)
        # SigLIP was trained on texts padded to a fixed length; CLIP pads to the longest of the batch.
        self._text_padding = "max_length" if model_type.startswith("siglip") else True
        # Reports are longer than a CLIP text tower takes: cut at the model's limit, not the tokenizer's default.
        self._max_length = self.model.config.text_config.max_position_embeddings

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings, float32 `(len(texts), projection_dim)`."""
        texts = list(texts)
        if not texts:
            raise ValueError("`texts` is empty: nothing to encode.")
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.processor(
                text=texts[start : start + self.batch_size], padding=self._text_padding, truncation=True,
                max_length=self._max_length, return_tensors="pt",
            ).to(self.device)
            chunks.append(_features(self.model.get_text_features(**batch)))
        return torch.cat(chunks).numpy()

    @torch.inference_mode()
    def encode_images(self, images: Sequence) -> np.ndarray:
        """L2-normalised image embeddings, float32 `(len(images), projection_dim)`; images as PIL images or
        arrays (see `llm2clip4cxr.imaging.load_image` for DICOM)."""
        images = list(images)
        if not images:
            raise ValueError("`images` is empty: nothing to encode.")
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = self.processor(images=images[start : start + self.batch_size], return_tensors="pt").to(self.device)
            chunks.append(_features(self.model.get_image_features(**batch)))
        return torch.cat(chunks).numpy()

    __call__ = encode_texts


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output holds the projected features.
    features = output.pooler_output if hasattr(output, "pooler_output") else output
    return F.normalize(features.float(), dim=-1).cpu()


__all__ = ["HFDualEncoder", "SUPPORTED_DUAL_ENCODERS"]
