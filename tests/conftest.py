import copy

import pytest
import transformers
from transformers import CLIPVisionConfig, Dinov2Config, SiglipVisionConfig, ViTConfig

from llm2clip4cxr import LLM2CLIP4CXRConfig, LLM2CLIP4CXRImageProcessor, LLM2CLIP4CXRModel, LLM2CLIP4CXRProcessor
from llm2clip4cxr.data import openi_report_texts
from llm2clip4cxr.training.factory import build_text_encoder
from llm2clip4cxr.training.tokenization import train_report_tokenizer

from .shared_data import HAVE_OPENI, OPENI_REPORTS

transformers.logging.set_verbosity_error()

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# Shown in the header of every run: CI installs the newest releases each time, so a new failure can be
# matched to the release that brought it (the full list is in .ci/run's log).
_REPORTED_DISTRIBUTIONS = ("torch", "transformers", "sentence-transformers", "datasets", "numpy", "pillow", "pydicom",
                           "safetensors", "faiss-cpu", "filelock", "huggingface-hub", "hypothesis", "ray",
                           "qdrant-client")


def pytest_report_header(config):
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in _REPORTED_DISTRIBUTIONS:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return "dependencies: " + ", ".join(found)
INSTRUCTION = "Retrieve reports with the same findings"


@pytest.fixture(scope="session")
def report_texts():
    """Real Open-I report texts (findings + impression). Without the data, ~2600 synthetic reports of the
    package's compositional generator instead, so the tests that only need report-like text still run: first
    ~1100 "findings + impression"-like pairs (a report and its restatement, at least as long as the first Open-I
    reports), then single reports."""
    if HAVE_OPENI:
        return openi_report_texts(OPENI_REPORTS)
    from llm2clip4cxr.augment.synthetic import build_synthetic_triplets

    triplets = build_synthetic_triplets(1500, seed=0)
    pairs = [f"{triplet['anchor']} {triplet['positive']}" for triplet in triplets]
    return list(
        dict.fromkeys([pair for pair in pairs if len(pair) >= 250] + [triplet["negative"] for triplet in triplets])
    )


@pytest.fixture(scope="session")
def tokenizer(report_texts):
    corpus = report_texts[:800]
    if not HAVE_OPENI:  # Open-I's reports use the words of the tests' instruction; the synthetic ones never do
        corpus = corpus + [INSTRUCTION] * 100
    return train_report_tokenizer(corpus, vocab_size=600)


@pytest.fixture()
def make_encoder(tokenizer):
    """Factory for tiny random encoders; each call gets its own tokenizer copy (padding side is mutated)."""

    def make(family="llama", pooling_mode="mean", seed=0, **config_kwargs):
        transformers.set_seed(seed)
        backbone_kwargs = config_kwargs.pop("backbone_kwargs", {})
        model = build_text_encoder(
            copy.deepcopy(tokenizer), family=family, pooling_mode=pooling_mode,
            backbone_kwargs={"hidden_size": 64, "num_layers": 2, **backbone_kwargs},
            num_latents=config_kwargs.pop("num_latents", 16), **config_kwargs,
        )
        return model.eval()

    return make


@pytest.fixture()
def saved_tiny_encoder(make_encoder, tmp_path):
    """A tiny random encoder saved as a checkpoint folder (the starting point of recipe runs)."""
    make_encoder().save_pretrained(tmp_path / "init")
    return tmp_path / "init"


# Tiny LLM2CLIP4CXR vision towers, one per supported family (the tests of every subpackage build models on them).
TINY_VISION = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
VISION_CONFIGS = {
    "clip_vision_model": lambda: CLIPVisionConfig(intermediate_size=64, **TINY_VISION),
    "siglip_vision_model": lambda: SiglipVisionConfig(intermediate_size=64, **TINY_VISION),
    "dinov2": lambda: Dinov2Config(mlp_ratio=2, **TINY_VISION),
    "vit": lambda: ViTConfig(intermediate_size=64, **TINY_VISION),
}
PROJECTION_DIM = 16


@pytest.fixture()
def make_model(make_encoder):
    """Tiny random LLM2CLIP4CXR models: a 64-wide LLM2Vec4CXR text tower and a 32-wide vision tower."""

    def make(vision="clip_vision_model", seed=0, **config_kwargs):
        encoder = make_encoder(seed=seed)
        config = LLM2CLIP4CXRConfig(
            text_config=encoder.config, vision_config=VISION_CONFIGS[vision](), projection_dim=PROJECTION_DIM,
            **config_kwargs,
        )
        return LLM2CLIP4CXRModel(config, text_model=encoder).eval()

    return make


@pytest.fixture()
def processor(tokenizer):
    return LLM2CLIP4CXRProcessor(LLM2CLIP4CXRImageProcessor(size=32), tokenizer)
