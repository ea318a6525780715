"""llm2clip4cxr: LLM-based report encoders (LLM2Vec4CXR) and image-report models (LLM2CLIP4CXR) for chest
X-ray retrieval.

Importing the package registers the model classes with transformers' Auto classes, so saved checkpoints load
with `AutoModel.from_pretrained(path)` without `trust_remote_code` (see `registration`: the registration runs
as soon as transformers is imported, so that this import itself stays light).

The names below are imported on first use (PEP 562 `__getattr__`): `import llm2clip4cxr` does not import torch
or transformers, which keeps the `llm2clip4cxr` command's --help fast.

Subpackages: `data` (reports, corpora, prepare, images), `augment` (report variants, synthetic reports),
`training` (losses, recipe blocks), `retrieval` (encoders, chunked embedding, index, hybrid search, zero-shot),
`evaluation` (tasks, harness, metrics, baselines), `conversion` (published weights), `hub` (cards, push,
checks), `cli` (the command line) and `modeling` (the model code every checkpoint carries).
"""

import importlib
import importlib.util

from .registration import register_when_transformers_loads

__version__ = "0.1.0"

# Public name -> the module defining it.
_EXPORTS = {
    "CheckpointMismatchError": ".modeling.modeling_llm2vec4cxr",
    "EVA02VisionConfig": ".modeling.configuration_eva02",
    "EVA02VisionModel": ".modeling.modeling_eva02",
    "LLM2CLIP4CXRConfig": ".modeling.configuration_llm2clip4cxr",
    "LLM2CLIP4CXRImageProcessor": ".modeling.processing_llm2clip4cxr",
    "LLM2CLIP4CXRModel": ".modeling.modeling_llm2clip4cxr",
    "LLM2CLIP4CXRProcessor": ".modeling.processing_llm2clip4cxr",
    "LLM2Vec4CXRConfig": ".modeling.configuration_llm2vec4cxr",
    "LLM2Vec4CXRModel": ".modeling.modeling_llm2vec4cxr",
    "LLM2Vec4CXRPreTrainedModel": ".modeling.modeling_llm2vec4cxr",
    "LLM2Vec4CXRSentenceEncoder": ".modeling.modeling_llm2vec4cxr",
    "default_model_path": ".defaults",
    "load_default_text_encoder": ".defaults",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)  # `llm2clip4cxr.modeling` as the eager package had it
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups find it directly
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


register_when_transformers_loads()
