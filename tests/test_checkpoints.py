import json

import pytest
import torch
from safetensors import safe_open
from sentence_transformers import SentenceTransformer
from transformers import AutoModel

from llm2clip4cxr import LLM2Vec4CXRModel
from llm2clip4cxr.checkpoints import store_weights_in_half_precision
from llm2clip4cxr.errors import InputError


def test_half_precision_weights_halve_the_file_and_still_load_as_float32(make_encoder, report_texts, tmp_path):
    encoder = make_encoder()
    encoder.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    full_size = weights.stat().st_size

    assert store_weights_in_half_precision(tmp_path) == len(encoder.state_dict())
    assert weights.stat().st_size < 0.55 * full_size
    with safe_open(str(weights), framework="pt") as handle:
        assert {handle.get_tensor(name).dtype for name in handle.keys()} == {torch.float16}  # noqa: SIM118
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float32"

    for loaded in (LLM2Vec4CXRModel.from_pretrained(tmp_path),
                   AutoModel.from_pretrained(tmp_path, trust_remote_code=True),
                   SentenceTransformer(str(tmp_path), trust_remote_code=True)):
        assert {parameter.dtype for parameter in loaded.parameters()} == {torch.float32}
    reloaded = LLM2Vec4CXRModel.from_pretrained(tmp_path)
    for name, weight in encoder.state_dict().items():  # the stored values are the float16 roundings
        torch.testing.assert_close(reloaded.state_dict()[name], weight.half().float(), rtol=0, atol=0, msg=name)
    original, halved = encoder.encode(report_texts[:4]), reloaded.encode(report_texts[:4])
    assert torch.nn.functional.cosine_similarity(torch.as_tensor(original), torch.as_tensor(halved)).min() > 0.999


def test_a_model_saved_in_another_dtype_is_not_halved(make_encoder, tmp_path):
    make_encoder().to(torch.bfloat16).save_pretrained(tmp_path)
    with pytest.raises(InputError, match="only a float32 model is halved"):
        store_weights_in_half_precision(tmp_path)
