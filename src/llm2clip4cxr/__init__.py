"""llm2clip4cxr: LLM-based report encoders (LLM2Vec4CXR) for chest X-ray retrieval.

Importing the package registers the model classes with transformers' Auto classes, so saved
checkpoints load with `AutoModel.from_pretrained(path)` without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel

from .modeling.configuration_llm2vec4cxr import LLM2Vec4CXRConfig
from .modeling.modeling_llm2vec4cxr import (
    CheckpointMismatchError,
    LLM2Vec4CXRModel,
    LLM2Vec4CXRPreTrainedModel,
    LLM2Vec4CXRSentenceEncoder,
)

AutoConfig.register(LLM2Vec4CXRConfig.model_type, LLM2Vec4CXRConfig, exist_ok=True)
AutoModel.register(LLM2Vec4CXRConfig, LLM2Vec4CXRModel, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "CheckpointMismatchError",
    "LLM2Vec4CXRConfig",
    "LLM2Vec4CXRModel",
    "LLM2Vec4CXRPreTrainedModel",
    "LLM2Vec4CXRSentenceEncoder",
]
