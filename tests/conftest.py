import copy

import pytest
import transformers

from llm2clip4cxr.data import openi_report_texts
from llm2clip4cxr.factory import build_text_encoder
from llm2clip4cxr.tokenization import train_report_tokenizer

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
    """Real Open-I report texts (findings + impression)."""
    return openi_report_texts()


@pytest.fixture(scope="session")
def tokenizer(report_texts):
    return train_report_tokenizer(report_texts[:800], vocab_size=600)


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
