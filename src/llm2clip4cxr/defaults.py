"""The default models shipped inside the package."""

from pathlib import Path

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
KINDS = ("text", "clip")


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
