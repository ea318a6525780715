"""Encoders: the adapters that turn a model into callables mapping texts (or images) to L2-normalised float32
arrays, so that dot products are cosine similarities. The CLI, the index, zero-shot classification and the
evaluation all embed through them.

- `llm2vec_encoder(model)`: an LLM2Vec4CXR text encoder (the instruction is prepended and pooled out).
- `load_clip_model(path)`, `report_encoder` / `image_encoder`: an LLM2CLIP4CXR checkpoint's two towers, into
  the shared image-report space whose dot products the model's `logits_per_image` scales. Images are paths
  (PNG, JPEG or DICOM, read by `llm2clip4cxr.data.imaging.load_image`), arrays or PIL images.
- `find_images(paths)`: the image files among files and folders.

They plug into `embed_in_chunks` for collections, into `EmbeddingIndex` for search at scale and into
`ranking.rank` for exact top-k on small collections. torch is imported by the functions that run a model,
so the text path of the evaluation (TF-IDF, BM25) does not need it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from ..checkpoints import check_model_folder, remote_code_guard

__all__ = [
    "IMAGE_SUFFIXES", "Encoder", "find_images", "image_encoder", "llm2vec_encoder", "load_clip_model", "normalized",
    "report_encoder",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
# texts -> (n, d) float32 L2-normalised embeddings.
Encoder = Callable[[Sequence[str]], np.ndarray]


def normalized(features) -> np.ndarray:
    """`features` with every row scaled to unit L2 norm, as float32 numpy (a torch tensor is moved to the CPU
    first); a zero row stays zero."""
    if hasattr(features, "detach"):  # a torch tensor, recognised without importing torch
        features = features.detach().float().cpu().numpy()
    features = np.asarray(features, dtype=np.float32)
    return features / np.clip(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12, None)


def llm2vec_encoder(model, instruction: str | None = None, batch_size: int = 64) -> Encoder:
    """An LLM2Vec4CXR model as an encoder (the instruction is prepended and pooled out; None: the one the
    checkpoint was trained with)."""

    def encode(texts):
        return normalized(
            model.encode(list(texts), instruction=instruction, batch_size=batch_size, convert_to_numpy=True)
        )

    return encode


def load_clip_model(path: str | os.PathLike, trust_remote_code: bool = False):
    """(model, processor) of a saved LLM2CLIP4CXR checkpoint folder, in eval mode.

    The folder is checked first (`check_model_folder`). No Python file of the folder runs unless
    `trust_remote_code=True` (a checkpoint of this package never needs it: its classes are registered).

    Raises:
        FileNotFoundError: `path` is not a directory or has no config.json.
        CorruptFileError: its weights are truncated, empty or a pickle.
        UntrustedCodeError: loading it would run code it ships, and `trust_remote_code` is False.
        ValueError: the folder holds another kind of model.
    """
    from transformers import AutoConfig, AutoModel, AutoProcessor

    path = check_model_folder(path, kind="LLM2CLIP4CXR checkpoint")
    with remote_code_guard(path, trust_remote_code) as remote:
        config = AutoConfig.from_pretrained(path, **remote)
        if config.model_type != "llm2clip4cxr":
            raise ValueError(
                f"{path} holds a {config.model_type!r} model; image-report retrieval needs an LLM2CLIP4CXR checkpoint "
                "(model_type 'llm2clip4cxr'), e.g. one written by training/train_clip.py."
            )
        return AutoModel.from_pretrained(path, **remote).eval(), AutoProcessor.from_pretrained(path, **remote)


def find_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The image files among `paths`, folders searched recursively (sorted), files kept in the given order.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: no image file was found.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such image file or folder.")
    if not found:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {[str(p) for p in paths]}.")
    return found


def image_encoder(
    model, processor, batch_size: int = 16, max_pixels: int | None = None
) -> Callable[[Sequence], np.ndarray]:
    """A callable: image paths (or arrays / PIL images) -> `(n, projection_dim)` L2-normalised float32.

    Images are read and preprocessed one at a time (each is resized to the model's input as soon as it
    is read), so memory holds one full-resolution image and a batch of small model inputs, not a batch of
    full-resolution images. Files declaring more than `max_pixels` pixels (default
    `llm2clip4cxr.data.imaging.MAX_IMAGE_PIXELS`) are refused with `ImageTooLargeError` before decoding.
    """
    import torch

    from ..data.imaging import load_image

    @torch.inference_mode()
    def encode(images: Sequence) -> np.ndarray:
        outputs = []
        for start in range(0, len(images), batch_size):
            pixel_values = torch.cat([
                processor(images=[load_image(image, max_pixels=max_pixels)
                                  if isinstance(image, (str, os.PathLike)) else image])["pixel_values"]
                for image in images[start : start + batch_size]
            ]).to(device=model.device, dtype=model.dtype)
            outputs.append(normalized(model.get_image_features(pixel_values=pixel_values).pooler_output))
        return np.concatenate(outputs)

    return encode


def report_encoder(model, processor, instruction: str | None = None, batch_size: int = 32) -> Callable:
    """A callable: report texts -> `(n, projection_dim)` L2-normalised float32 (the instruction is pooled out)."""
    import torch

    @torch.inference_mode()
    def encode(texts: Sequence[str]) -> np.ndarray:
        outputs = []
        for start in range(0, len(texts), batch_size):
            inputs = processor(text=list(texts[start : start + batch_size]), instruction=instruction).to(model.device)
            outputs.append(normalized(model.get_text_features(**inputs).pooler_output))
        return np.concatenate(outputs)

    return encode
