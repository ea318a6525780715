"""Where things are by default: the models shipped inside the package, and the folder of real CXR data; and the
hybrid search's fusion methods, here (not in retrieval.hybrid, which imports numpy) so the CLI's --help stays light."""

import os
from pathlib import Path

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
KINDS = ("text", "clip")
FUSION_METHODS = ("rrf", "normalized", "zscore")
DEFAULT_FUSION = "zscore"  # the CLI's, fuse()'s, HybridScorer's and EmbeddingIndex.search_hybrid's default
DEFAULT_FUSION_WEIGHTS = (4.0, 1.0)  # (dense, lexical), chosen on development studies: see retrieval.hybrid
# ../shared/data beside the project root, as laid out for development and CI.
_DEFAULT_SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def shared_data_dir() -> Path:
    """The folder of real CXR data (`$LLM2CLIP4CXR_DATA`, else ../shared/data beside the project)."""
    path = Path(os.environ.get("LLM2CLIP4CXR_DATA", _DEFAULT_SHARED_DATA))
    if not path.is_dir():
        raise FileNotFoundError(
            f"No CXR data folder at {path}. Set LLM2CLIP4CXR_DATA to the folder holding openi/reports.csv."
        )
    return path


def default_model_path(kind: str = "text") -> Path:
    """Folder of the shipped default model of `kind`, loadable by `AutoModel.from_pretrained` (and, for
    "text", by `SentenceTransformer(str(path), trust_remote_code=True)`: sentence-transformers 6 needs
    the path as a `str`, a `Path` makes it raise a TypeError).

    "text": LLM2Vec4CXR-tiny trained on Open-I reports (`training/make_default_text_encoder.py`).
    "clip": no default ships, because no chest X-ray images paired with reports are available to
    train one; this raises with that explanation.
    """
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
    if kind == "clip":
        raise FileNotFoundError(
            "No default LLM2CLIP4CXR model ships: the data available to this project has no chest X-ray "
            "images paired with reports, and a model trained without them would be fake. Train one on your "
            "own image-report pairs and pass its folder instead."
        )
    path = PRETRAINED_DIR / kind
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"The default {kind} model is not installed at {path}. Rebuild it with "
            "`python training/make_default_text_encoder.py --install`."
        )
    return path


def load_default_text_encoder(**kwargs):
    """The shipped LLM2Vec4CXR-tiny encoder, in eval mode, with its tokenizer attached."""
    from . import LLM2Vec4CXRModel

    return LLM2Vec4CXRModel.from_pretrained(default_model_path("text"), **kwargs).eval()
