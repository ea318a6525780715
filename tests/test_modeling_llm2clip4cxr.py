import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    Dinov2Config,
    SiglipVisionConfig,
    ViTConfig,
    pipeline,
)

import llm2clip4cxr
from llm2clip4cxr import (
    LLM2CLIP4CXRConfig,
    LLM2CLIP4CXRImageProcessor,
    LLM2CLIP4CXRModel,
    LLM2CLIP4CXRProcessor,
)
from llm2clip4cxr.losses import clip_loss as gathered_clip_loss
from llm2clip4cxr.modeling.modeling_llm2clip4cxr import clip_loss
from llm2clip4cxr.zero_shot import zero_shot_classify

from .conftest import INSTRUCTION
from .test_remote_code import REFUSE_PACKAGE

MODELING_DIR = Path(llm2clip4cxr.modeling.__file__).parent
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


@pytest.fixture()
def reports(report_texts):
    """Short real reports (their first sentence), so that the tiny towers run fast."""
    return [text.split(".")[0] + "." for text in report_texts[:3]]


def images(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(40 + 5 * i, 48, generator=generator) for i in range(count)]


@pytest.mark.parametrize("vision", sorted(VISION_CONFIGS))
def test_output_shapes_and_symmetric_logits(make_model, processor, reports, vision):
    model = make_model(vision)
    inputs = processor(text=reports, images=images(2), instruction=INSTRUCTION)
    with torch.no_grad():
        output = model(**inputs)
        text_features = model.get_text_features(inputs["input_ids"], inputs["attention_mask"], inputs["embed_mask"])
        image_features = model.get_image_features(inputs["pixel_values"])
    assert output.logits_per_image.shape == (2, 3)
    torch.testing.assert_close(output.logits_per_text, output.logits_per_image.T)
    assert output.text_embeds.shape == (3, PROJECTION_DIM) and output.image_embeds.shape == (2, PROJECTION_DIM)
    torch.testing.assert_close(output.text_embeds.norm(dim=-1), torch.ones(3))
    # As CLIPModel: get_*_features return the tower output with the projected features as pooler_output.
    assert text_features.pooler_output.shape == (3, PROJECTION_DIM)
    assert text_features.last_hidden_state.shape == (3, inputs["input_ids"].shape[1], 64)
    torch.testing.assert_close(output.text_embeds, F.normalize(text_features.pooler_output, dim=-1))
    torch.testing.assert_close(output.image_embeds, F.normalize(image_features.pooler_output, dim=-1))
    cosines = output.image_embeds @ output.text_embeds.T
    torch.testing.assert_close(output.logits_per_image, math.exp(model.config.logit_scale_init_value) * cosines)
    assert output.loss is None


def test_logit_scale_is_clamped_to_logit_scale_max(make_model, processor, reports):
    model = make_model(logit_scale_max=50.0)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
        output = model(**processor(text=reports, images=images(3)))
    torch.testing.assert_close(output.logits_per_image, 50.0 * output.image_embeds @ output.text_embeds.T)


def test_loss_equals_hand_written_cross_entropy(make_model, processor, reports):
    model = make_model()
    with torch.no_grad():
        output = model(**processor(text=reports, images=images(3)), return_loss=True)
    logits = output.logits_per_image.double()  # (3 images, 3 texts); pair i is (image i, text i)
    image_to_text = sum(torch.logsumexp(logits[i], 0) - logits[i, i] for i in range(3)) / 3
    text_to_image = sum(torch.logsumexp(logits[:, i], 0) - logits[i, i] for i in range(3)) / 3
    torch.testing.assert_close(output.loss.double(), (image_to_text + text_to_image) / 2)
    # The library's gathered clip_loss computes the same thing from the features.
    torch.testing.assert_close(
        gathered_clip_loss(output.image_embeds, output.text_embeds, model.get_logit_scale(), gather=False), output.loss
    )
    with pytest.raises(ValueError, match="one text per image .* got 3 texts and 2 images"):
        model(**processor(text=reports, images=images(2)), return_loss=True)


def test_clip_loss_on_a_toy_similarity_matrix():
    similarity = torch.tensor([[4.0, 1.0], [0.0, 2.0]])
    # Rows: -log softmax([4, 1])[0], -log softmax([0, 2])[1]; columns: [4, 0] -> 0, [1, 2] -> 1.
    rows = (math.log(1 + math.exp(-3)) + math.log(1 + math.exp(-2))) / 2
    columns = (math.log(1 + math.exp(-4)) + math.log(1 + math.exp(-1))) / 2
    torch.testing.assert_close(clip_loss(similarity), torch.tensor((rows + columns) / 2))


def test_gradients_reach_both_towers_and_the_logit_scale(make_model, processor, reports):
    model = make_model().train()
    model(**processor(text=reports, images=images(3)), return_loss=True).loss.backward()
    grads = dict(model.named_parameters())
    for name in (
        "logit_scale",
        "text_projection.0.weight",
        "text_projection.1.weight",
        "visual_projection.weight",
        "text_model.model.layers.0.self_attn.q_proj.weight",
        "text_model.model.embed_tokens.weight",
        "vision_model.encoder.layers.0.self_attn.q_proj.weight",
        "vision_model.embeddings.patch_embedding.weight",
    ):
        assert grads[name].grad is not None and grads[name].grad.abs().sum() > 0, name


def test_save_and_auto_model_round_trip(make_model, processor, reports, tmp_path):
    model = make_model("dinov2")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_llm2clip4cxr.LLM2CLIP4CXRConfig",
        "AutoModel": "modeling_llm2clip4cxr.LLM2CLIP4CXRModel",
        "AutoModelForZeroShotImageClassification": "modeling_llm2clip4cxr.LLM2CLIP4CXRModel",
    }
    assert config["text_config"]["backbone_config"]["is_causal"] is False
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is LLM2CLIP4CXRModel  # the package's class, no remote code
    assert isinstance(AutoConfig.from_pretrained(tmp_path).vision_config, Dinov2Config)
    inputs = processor(text=reports, images=images(3))
    with torch.no_grad():
        expected, actual = model(**inputs), loaded(**inputs)
    torch.testing.assert_close(actual.logits_per_image, expected.logits_per_image, rtol=0, atol=0)
    for name in ("configuration_llm2clip4cxr.py", "modeling_llm2clip4cxr.py", "modeling_llm2vec4cxr.py"):
        assert (tmp_path / name).read_bytes() == (MODELING_DIR / name).read_bytes()


FRESH_PROCESS = REFUSE_PACKAGE + r"""
path, inputs_file, out_file = sys.argv[1:]
inputs = torch.load(inputs_file)
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
batch = processor(text=inputs["texts"], images=inputs["images"], instruction=inputs["instruction"])
with torch.no_grad():
    output = model(**batch)
assert "llm2clip4cxr" not in sys.modules, "llm2clip4cxr was imported"
torch.save({
    "modules": [type(model).__module__, type(processor).__module__, type(processor.image_processor).__module__],
    "batch": dict(batch),
    "logits_per_image": output.logits_per_image,
}, out_file)
"""


def test_fresh_process_without_package_reproduces_model_and_processor(make_model, processor, reports, tmp_path):
    model = make_model()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    inputs = {"texts": reports, "images": images(3), "instruction": INSTRUCTION}
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(checkpoint), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        check=True, env=env, cwd=tmp_path,
    )
    result = torch.load(tmp_path / "out.pt")
    assert all(module.startswith("transformers_modules.") for module in result["modules"])
    expected_batch = processor(text=reports, images=inputs["images"], instruction=INSTRUCTION)
    assert result["batch"].keys() == expected_batch.keys()
    for key, value in expected_batch.items():
        torch.testing.assert_close(result["batch"][key], value, rtol=0, atol=0)
    with torch.no_grad():
        expected = model(**expected_batch).logits_per_image
    torch.testing.assert_close(result["logits_per_image"], expected, rtol=0, atol=0)


def test_text_tower_loads_from_an_llm2vec4cxr_checkpoint(make_encoder, processor, reports, tmp_path):
    encoder = make_encoder(pooling_mode="latent_attention")
    encoder.save_pretrained(tmp_path / "text")
    vision_config = VISION_CONFIGS["siglip_vision_model"]()
    model = LLM2CLIP4CXRModel.from_text_vision_pretrained(tmp_path / "text", vision_config, projection_dim=8).eval()
    assert model.config.projection_dim == 8 and isinstance(model.config.vision_config, SiglipVisionConfig)
    batch = processor(text=reports, instruction=INSTRUCTION)
    with torch.no_grad():
        expected = encoder(**batch).pooler_output
        actual = model.text_model(**batch).pooler_output  # before the projection
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_vision_tower_loads_from_a_clip_checkpoint(make_encoder, tmp_path):
    make_encoder().save_pretrained(tmp_path / "text")
    clip = CLIPModel(
        CLIPConfig(
            text_config=CLIPTextConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64),
            vision_config=VISION_CONFIGS["clip_vision_model"]().to_dict(),
        )
    )
    clip.save_pretrained(tmp_path / "clip")
    model = LLM2CLIP4CXRModel.from_text_vision_pretrained(tmp_path / "text", tmp_path / "clip")
    expected = clip.vision_model.state_dict()
    actual = model.vision_model.state_dict()
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


def test_building_a_config_from_an_encoder_keeps_its_attention_mask(make_encoder, reports):
    # PreTrainedConfig.__init__ resets sub-configs' attention implementation; on a config shared with a
    # built encoder, that would make it attend to padding.
    encoder = make_encoder()
    expected = encoder.encode(reports)  # one padded batch
    LLM2CLIP4CXRConfig(text_config=encoder.config, vision_config=VISION_CONFIGS["vit"]())
    assert encoder.config.backbone_config._attn_implementation == "sdpa"
    torch.testing.assert_close(encoder.encode(reports), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"vision_config": {"model_type": "bert"}}, ValueError, r"Unsupported vision `model_type` 'bert'.*'dinov2'"),
        ({"vision_config": {"hidden_size": 32}}, ValueError, r"must name its `model_type`.*got keys \['hidden_size'\]"),
        ({"vision_config": CLIPConfig()}, ValueError, r"'clip'.* Pass its `.vision_config`"),
        ({"vision_config": "dinov2"}, TypeError, r"`vision_config` must be a transformers PreTrainedConfig or a dict, got str"),
        ({"vision_config": SiglipVisionConfig(vision_use_head=False)}, ValueError, r"`vision_config.vision_use_head` must be True"),
        ({"text_config": {"model_type": "llama"}}, ValueError, r"LLM2Vec4CXR encoder .* got model_type 'llama'"),
        ({"projection_dim": 0}, ValueError, r"`projection_dim` must be a positive int, got 0"),
        ({"logit_scale_init_value": 5.0}, ValueError, r"at most log\(logit_scale_max\) = 4.6052.*got 5.0"),
    ],
)
def test_invalid_configs_are_rejected(kwargs, error, match):
    with pytest.raises(error, match=match):
        LLM2CLIP4CXRConfig(**kwargs)


def test_forward_without_one_modality_is_a_clear_error(make_model, processor, reports):
    with pytest.raises(ValueError, match=r"missing \['pixel_values'\].*get_text_features"):
        make_model()(**processor(text=reports))


# --- zero-shot ---------------------------------------------------------------------------------------------------


LABELS = ["pleural effusion", "pneumothorax", "no acute findings"]
TEMPLATES = ("There is {}.", "Findings: {}.")


def test_zero_shot_returns_a_distribution_per_image(make_model, processor):
    probabilities = zero_shot_classify(make_model(), processor, images(4), LABELS, TEMPLATES, instruction=INSTRUCTION)
    assert probabilities.shape == (4, 3) and probabilities.dtype == torch.float32
    assert (probabilities > 0).all()
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(4))


def test_zero_shot_prompt_ensembling_equals_hand_computation(make_model, processor):
    model = make_model()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(30.0))
    probabilities = zero_shot_classify(model, processor, images(2), LABELS, TEMPLATES, batch_size=1)
    with torch.no_grad():
        label_embeds = []
        for label in LABELS:
            prompts = [template.format(label) for template in TEMPLATES]
            embeds = F.normalize(model.get_text_features(**processor(text=prompts)).pooler_output, dim=-1)
            label_embeds.append(F.normalize(embeds.mean(dim=0), dim=-1))
        image_embeds = F.normalize(model.get_image_features(**processor(images=images(2))).pooler_output, dim=-1)
        expected = (30.0 * image_embeds @ torch.stack(label_embeds).T).softmax(dim=-1)
    torch.testing.assert_close(probabilities, expected)


@pytest.mark.parametrize(
    ("labels", "templates", "match"),
    [([], ("{}",), "`labels` must be a non-empty list"), (LABELS, ("no placeholder",), "exactly one '\\{\\}'")],
)
def test_zero_shot_rejects_bad_labels_and_templates(make_model, processor, labels, templates, match):
    with pytest.raises(ValueError, match=match):
        zero_shot_classify(make_model(), processor, images(1), labels, templates)


def test_zero_shot_pipeline_runs_but_pools_every_token(make_model, processor):
    """transformers' pipeline works when given the tokenizer and image processor, but it feeds the bare
    tokenizer's output (no instruction, no `embed_mask`), so the leading <s> is pooled too."""
    from PIL import Image

    model = make_model()
    classifier = pipeline(
        "zero-shot-image-classification", model=model, tokenizer=processor.tokenizer,
        image_processor=processor.image_processor,
    )
    image = Image.fromarray((images(1)[0].numpy() * 255).round().astype("uint8"))
    result = classifier(image, candidate_labels=LABELS, hypothesis_template="{}")
    assert sorted(entry["label"] for entry in result) == sorted(LABELS)
    assert math.isclose(sum(entry["score"] for entry in result), 1.0, rel_tol=1e-5)
    text = processor.tokenizer(LABELS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(
            input_ids=text["input_ids"], attention_mask=text["attention_mask"], **processor(images=image)
        ).logits_per_image[0]
    expected = dict(zip(LABELS, logits.softmax(dim=-1).tolist()))
    for entry in result:
        assert math.isclose(entry["score"], expected[entry["label"]], rel_tol=1e-5)


def test_zero_shot_pipeline_from_a_saved_checkpoint_equals_zero_shot_classify(make_model, processor, tmp_path):
    from transformers import pipeline

    model = make_model()
    processor.default_instruction = INSTRUCTION  # the instruction the model "was trained with"
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["custom_pipelines"]["zero-shot-image-classification"]["impl"].startswith("pipeline_llm2clip4cxr.")
    assert (tmp_path / "pipeline_llm2clip4cxr.py").is_file()

    classify = pipeline("zero-shot-image-classification", model=str(tmp_path), trust_remote_code=True)
    assert type(classify).__name__ == "LLM2CLIP4CXRZeroShotImageClassificationPipeline"
    image = images(1)[0].numpy()
    ranked = classify(image, candidate_labels=LABELS)
    expected = zero_shot_classify(model, processor, [image], LABELS, ("{}",), instruction=INSTRUCTION)[0]
    assert [entry["label"] for entry in ranked] == [LABELS[i] for i in expected.argsort(descending=True)]
    scores = {entry["label"]: entry["score"] for entry in ranked}
    torch.testing.assert_close(torch.tensor([scores[label] for label in LABELS]), expected, rtol=1e-4, atol=1e-5)
    # Without the instruction the prompts are tokenized differently, and so scored differently.
    unprompted = classify(image, candidate_labels=LABELS, instruction="")
    assert [entry["score"] for entry in unprompted] != [entry["score"] for entry in ranked]
