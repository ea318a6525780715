"""`import llm2clip4cxr` is light (no torch, no transformers) and still makes the package's checkpoints load
through transformers' Auto classes without trust_remote_code, whichever of the two is imported first. Each case
runs in a fresh interpreter: in this one both are long imported."""

import json
import subprocess
import sys

import pytest

import llm2clip4cxr
from llm2clip4cxr.defaults import default_model_path

HEAVY = ("torch", "transformers", "datasets", "faiss", "sentence_transformers")

LOAD_CHECKPOINTS = r"""
from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForZeroShotImageClassification,
                          AutoProcessor)
text, clip = sys.argv[1:3]
loaded = {
    "text_config": AutoConfig.from_pretrained(text, trust_remote_code=False),
    "text_model": AutoModel.from_pretrained(text, trust_remote_code=False),
    "clip_model": AutoModel.from_pretrained(clip, trust_remote_code=False),
    "zero_shot": AutoModelForZeroShotImageClassification.from_pretrained(clip, trust_remote_code=False),
    "processor": AutoProcessor.from_pretrained(clip, trust_remote_code=False),
    "image_processor": AutoImageProcessor.from_pretrained(clip, trust_remote_code=False),
}
print(json.dumps({name: type(value).__module__ + "." + type(value).__name__ for name, value in loaded.items()}))
"""
EXPECTED = {
    "text_config": "llm2clip4cxr.modeling.configuration_llm2vec4cxr.LLM2Vec4CXRConfig",
    "text_model": "llm2clip4cxr.modeling.modeling_llm2vec4cxr.LLM2Vec4CXRModel",
    "clip_model": "llm2clip4cxr.modeling.modeling_llm2clip4cxr.LLM2CLIP4CXRModel",
    "zero_shot": "llm2clip4cxr.modeling.modeling_llm2clip4cxr.LLM2CLIP4CXRModel",
    "processor": "llm2clip4cxr.modeling.processing_llm2clip4cxr.LLM2CLIP4CXRProcessor",
    "image_processor": "llm2clip4cxr.modeling.processing_llm2clip4cxr.LLM2CLIP4CXRImageProcessor",
}


def fresh_python(script: str, *args) -> str:
    result = subprocess.run([sys.executable, "-c", "import json, sys\n" + script, *map(str, args)],
                            capture_output=True, text=True, env=None)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_importing_the_package_imports_no_heavy_library():
    loaded = json.loads(
        fresh_python(f"import llm2clip4cxr\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    )
    assert loaded == []


@pytest.fixture()
def checkpoints(make_model, processor, tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    return default_model_path("text"), tmp_path / "clip"


IMPORT_ORDERS = {
    "llm2clip4cxr first": "import llm2clip4cxr\nimport transformers\n",
    "transformers first": "import transformers\nimport llm2clip4cxr\n",
    # transformers first imported from inside the package's own model code (registration must wait for it)
    "a model class first": "from llm2clip4cxr import LLM2CLIP4CXRModel\n",
    "a model module first": "import llm2clip4cxr.modeling.modeling_llm2vec4cxr\n",
    "a training module first": "from llm2clip4cxr.training.factory import build_text_encoder\n",
}


@pytest.mark.parametrize("imports", IMPORT_ORDERS.values(), ids=IMPORT_ORDERS)
def test_auto_classes_load_the_package_classes_whichever_is_imported_first(checkpoints, imports):
    """The README contract: `import llm2clip4cxr` is all a user adds to load a checkpoint with its own classes,
    never the folder's copy of the model code."""
    assert json.loads(fresh_python(imports + LOAD_CHECKPOINTS, *checkpoints)) == EXPECTED


def test_public_names_are_importable_and_listed():
    assert set(llm2clip4cxr.__all__) <= set(dir(llm2clip4cxr))
    for name in llm2clip4cxr.__all__:
        assert getattr(llm2clip4cxr, name) is not None
    assert llm2clip4cxr.modeling.__name__ == "llm2clip4cxr.modeling"  # subpackages are attributes, as before
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        llm2clip4cxr.nothing  # noqa: B018
