"""Baseline dual encoders behind the harness's encode interface."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, LlamaConfig

from llm2clip4cxr.evaluation.baselines import HFDualEncoder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 64, "eos_token_id": tokenizer.eos_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(folder)
    return folder, model, processor


def test_hf_dual_encoder_matches_clip_features(tiny_clip, report_texts):
    folder, model, processor = tiny_clip
    encoder = HFDualEncoder(folder, batch_size=2)
    texts = report_texts[:3]
    images = [np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8) for i in range(3)]
    with torch.no_grad():
        # One at a time, so padding cannot matter.
        expected_text = torch.cat(
            [
                model.get_text_features(
                    **processor(text=[t], truncation=True, max_length=64, return_tensors="pt")
                ).pooler_output
                for t in texts
            ]
        )
        expected_image = model.get_image_features(**processor(images=images, return_tensors="pt")).pooler_output
    np.testing.assert_allclose(
        encoder.encode_texts(texts), F.normalize(expected_text, dim=-1).numpy(), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        encoder.encode_images(images), F.normalize(expected_image, dim=-1).numpy(), rtol=1e-4, atol=1e-5
    )
    assert encoder(texts).dtype == np.float32


def test_hf_dual_encoder_refuses_other_models(tmp_path):
    from transformers import LlamaModel

    LlamaModel(
        LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32)
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="supports"):
        HFDualEncoder(tmp_path)


def test_load_dual_encoder_picks_hf_for_a_clip_folder(tiny_clip, report_texts, tmp_path):
    from llm2clip4cxr.evaluation.baselines import load_dual_encoder

    folder, _, _ = tiny_clip
    encoder = load_dual_encoder(folder, batch_size=2)
    assert isinstance(encoder, HFDualEncoder)
    np.testing.assert_allclose(
        encoder.encode_texts(report_texts[:2]),
        HFDualEncoder(folder).encode_texts(report_texts[:2]),
        rtol=1e-5,
        atol=1e-6,
    )
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_dual_encoder(tmp_path / "missing")
