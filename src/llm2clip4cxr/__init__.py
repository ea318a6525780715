"""llm2clip4cxr: LLM-based report encoders (LLM2Vec4CXR) and image-report models (LLM2CLIP4CXR) for chest
X-ray retrieval.

Importing the package registers the model classes with transformers' Auto classes, so saved
checkpoints load with `AutoModel.from_pretrained(path)` without `trust_remote_code`.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from .defaults import default_model_path, load_default_text_encoder

from .modeling.configuration_eva02 import EVA02VisionConfig
from .modeling.configuration_llm2clip4cxr import LLM2CLIP4CXRConfig
from .modeling.configuration_llm2vec4cxr import LLM2Vec4CXRConfig
from .modeling.modeling_eva02 import EVA02VisionModel
from .modeling.modeling_llm2clip4cxr import LLM2CLIP4CXRModel
from .modeling.modeling_llm2vec4cxr import (
    CheckpointMismatchError,
    LLM2Vec4CXRModel,
    LLM2Vec4CXRPreTrainedModel,
    LLM2Vec4CXRSentenceEncoder,
)
from .modeling.processing_llm2clip4cxr import LLM2CLIP4CXRImageProcessor, LLM2CLIP4CXRProcessor

AutoConfig.register(LLM2Vec4CXRConfig.model_type, LLM2Vec4CXRConfig, exist_ok=True)
AutoModel.register(LLM2Vec4CXRConfig, LLM2Vec4CXRModel, exist_ok=True)
AutoConfig.register(LLM2CLIP4CXRConfig.model_type, LLM2CLIP4CXRConfig, exist_ok=True)
AutoModel.register(LLM2CLIP4CXRConfig, LLM2CLIP4CXRModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(LLM2CLIP4CXRConfig, LLM2CLIP4CXRModel, exist_ok=True)
# One plain-torch implementation serves whichever backend AutoImageProcessor asks for (it needs neither
# torchvision nor Pillow), so no "backend not available" fallback warning is logged.
AutoImageProcessor.register(
    LLM2CLIP4CXRConfig,
    image_processor_classes={"torchvision": LLM2CLIP4CXRImageProcessor, "pil": LLM2CLIP4CXRImageProcessor},
    exist_ok=True,
)
AutoProcessor.register(LLM2CLIP4CXRConfig, LLM2CLIP4CXRProcessor, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "CheckpointMismatchError",
    "EVA02VisionConfig",
    "EVA02VisionModel",
    "LLM2CLIP4CXRConfig",
    "LLM2CLIP4CXRImageProcessor",
    "LLM2CLIP4CXRModel",
    "LLM2CLIP4CXRProcessor",
    "LLM2Vec4CXRConfig",
    "LLM2Vec4CXRModel",
    "LLM2Vec4CXRPreTrainedModel",
    "LLM2Vec4CXRSentenceEncoder",
    "default_model_path",
    "load_default_text_encoder",
]
