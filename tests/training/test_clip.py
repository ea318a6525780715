import copy
import json
import math
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor, CLIPVisionConfig

from llm2clip4cxr import LLM2CLIP4CXRConfig, LLM2CLIP4CXRImageProcessor, LLM2CLIP4CXRModel, LLM2CLIP4CXRProcessor
from llm2clip4cxr.augment.variants import split_sentences
from llm2clip4cxr.training.clip import (
    ClipCollator,
    ClipTrainer,
    ClipTrainingModel,
    apply_text_lora,
    build_caption,
    cache_text_embeddings,
)
from llm2clip4cxr.training.losses import supervised_contrastive_loss

from ..shared_data import ROOT, import_recipe, needs_samples
from ..shared_data import XRV as SAMPLES

SAMPLE_PNGS = sorted(SAMPLES.rglob("*.png")) if SAMPLES.is_dir() else []
TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
FINDINGS = [
    "Heart size is normal. Lungs are clear. No pleural effusion.",
    "Small right pleural effusion. Mild cardiomegaly.",
    "Right upper lobe opacity. No pneumothorax.",
    "The lungs are clear.",
]
IMPRESSIONS = ["No acute disease.", "Effusion.", "Pneumonia.", ""]
LABELS = torch.tensor([0, 1, 2, 0])


def _trainer(sup_con_weight=0.0, bce_weight=0.0, temperature=0.07):
    """ClipTrainer.compute_loss without a Trainer around it (the loss reads only these attributes)."""
    return SimpleNamespace(
        sup_con_weight=sup_con_weight,
        sup_con_temperature=temperature,
        bce_weight=bce_weight,
        gather_across_processes=True,
    )


@pytest.fixture()
def make_clip(make_encoder):
    def make(seed=0):
        encoder = make_encoder(seed=seed)
        config = LLM2CLIP4CXRConfig(
            text_config=encoder.config, vision_config=CLIPVisionConfig(**TINY_VISION), projection_dim=16
        )
        return LLM2CLIP4CXRModel(config, text_model=encoder)

    return make


@pytest.fixture()
def processor(tokenizer):
    return LLM2CLIP4CXRProcessor(LLM2CLIP4CXRImageProcessor(size=32), copy.deepcopy(tokenizer))


def _pixels(count=4, seed=0):
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_supervised_contrastive_loss_equals_a_hand_written_loop():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    temperature = 0.5
    z = F.normalize(features, dim=-1)
    terms = []
    for i in range(6):
        positives = [p for p in range(6) if p != i and labels[p] == labels[i]]
        if not positives:  # label 2 has a single sample: no positive, not counted
            continue
        denominator = sum(math.exp(z[i] @ z[a] / temperature) for a in range(6) if a != i)
        terms.append(
            -sum(math.log(math.exp(z[i] @ z[p] / temperature) / denominator) for p in positives) / len(positives)
        )
    expected = torch.tensor(sum(terms) / len(terms), dtype=torch.float64)
    torch.testing.assert_close(supervised_contrastive_loss(features, labels, temperature), expected)
    with pytest.raises(ValueError, match="temperature"):
        supervised_contrastive_loss(features, labels, 0.0)


def test_trainer_loss_is_clip_plus_weighted_terms_on_a_toy_batch(make_clip, processor):
    """Reference: the CLIP cross-entropy written out from the model's own logits, plus the two terms."""
    model = ClipTrainingModel(make_clip(), abnormal_head=True).eval()
    batch = dict(processor(text=FINDINGS), pixel_values=_pixels(), labels=LABELS)
    with torch.no_grad():
        loss = ClipTrainer.compute_loss(_trainer(0.5, 0.25), model, batch)
        outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
        clip_output = model.clip(**processor(text=FINDINGS), pixel_values=batch["pixel_values"])
    logits = clip_output.logits_per_image.double()
    image_to_text = sum(torch.logsumexp(logits[i], 0) - logits[i, i] for i in range(4)) / 4
    text_to_image = sum(torch.logsumexp(logits[:, i], 0) - logits[i, i] for i in range(4)) / 4
    stacked = torch.cat([outputs["image_embeds"], outputs["text_embeds"]])
    expected = (
        (image_to_text + text_to_image) / 2
        + 0.5 * supervised_contrastive_loss(stacked, torch.cat([LABELS, LABELS]), 0.07)
        + 0.25 * F.binary_cross_entropy_with_logits(outputs["abnormal_logits"], (LABELS != 0).float())
    )
    torch.testing.assert_close(loss.double(), expected.double(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="label"):
        ClipTrainer.compute_loss(_trainer(0.5), model, {k: v for k, v in batch.items() if k != "labels"})


def test_text_lora_trains_only_adapters_and_only_in_the_text_tower(make_clip, processor):
    model = apply_text_lora(make_clip())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    text_trainable = {name for name in trainable if ".text_model." in name}
    lora = {name for name in trainable if "lora_" in name}
    assert lora and lora == text_trainable  # the text tower trains its adapters and nothing else
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} == {name.split(".")[-4] for name in lora}
    # The vision tower (whose attention also has q/k/v_proj) has no adapters and trains fully, as do the heads.
    assert not any("lora_" in name for name, _ in model.named_modules() if ".vision_model." in name)
    assert any(".vision_model." in name for name in trainable)
    assert any("text_projection" in name for name in trainable) and any("logit_scale" in name for name in trainable)

    training = ClipTrainingModel(model).train()
    batch = dict(processor(text=FINDINGS), pixel_values=_pixels())
    ClipTrainer.compute_loss(_trainer(), training, batch).backward()
    text_grads = {name for name, p in model.named_parameters() if ".text_model." in name and p.grad is not None}
    assert text_grads == text_trainable
    assert isinstance(model.merge_and_unload(), LLM2CLIP4CXRModel)


def test_cached_text_embeddings_train_like_the_online_frozen_tower(make_clip, processor, tmp_path):
    """Same loss and same gradients on the projections, logit scale and vision tower, to 1e-5 (the two
    runs compute the same float32 values; only kernel batching may differ)."""
    captions = [build_caption(f, i, seed) for seed, (f, i) in enumerate(zip(FINDINGS, IMPRESSIONS))]
    results = []
    for cached in (False, True):
        clip = make_clip(seed=0)
        clip.text_model.requires_grad_(False)
        model = ClipTrainingModel(clip).train()
        batch = {"pixel_values": _pixels(), "labels": LABELS}
        if cached:
            path = tmp_path / "text.safetensors"
            embeddings = cache_text_embeddings(clip, captions, batch_size=3, path=path, processor=processor)
            torch.testing.assert_close(load_file(path)["text_embeds"], embeddings)
            with pytest.MonkeyPatch.context() as patch:  # a second call reads the file, the tower does not run
                patch.setattr(clip.text_model, "forward", lambda *a, **k: pytest.fail("recomputed a cached file"))
                torch.testing.assert_close(cache_text_embeddings(clip, captions, batch_size=3, path=path), embeddings)
            batch["text_embeds_cached"] = embeddings[[0, 1, 2, 3]]
        else:
            batch.update(processor(text=captions))
        loss = ClipTrainer.compute_loss(_trainer(sup_con_weight=0.5), model, batch)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in clip.named_parameters() if p.requires_grad}
        assert all(not name.startswith("text_model.") for name in grads)
        results.append((loss.detach(), grads))
    (online_loss, online_grads), (cached_loss, cached_grads) = results
    torch.testing.assert_close(cached_loss, online_loss, rtol=1e-5, atol=1e-5)
    assert cached_grads.keys() == online_grads.keys() and any("vision_model" in name for name in online_grads)
    for name, grad in online_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_build_caption_is_deterministic_and_shuffles_sentences():
    findings, impression = FINDINGS[0], "No acute cardiopulmonary process."
    captions = [build_caption(findings, impression, random.Random(7)) for _ in range(2)]
    assert captions[0] == captions[1]
    draws = [build_caption(findings, impression, seed) for seed in range(200)]
    assert set(draws) >= {findings, impression, f"{findings} {impression}"}
    shuffled = [draw for draw in draws if draw not in (findings, impression, f"{findings} {impression}")]
    assert 0.1 < len(shuffled) / len(draws) < 0.4  # the 2 of 3 draws that have >1 sentence, times p=0.3
    assert all(
        sorted(split_sentences(draw))
        in (sorted(split_sentences(findings)), sorted(split_sentences(f"{findings} {impression}")))
        for draw in shuffled
    )
    assert build_caption(findings, None, 0, shuffle_p=0.0) == findings
    assert build_caption(None, impression, 0, instruction="Find it").startswith("Find it!@#$%^&*()")
    with pytest.raises(ValueError, match="findings or impression"):
        build_caption("", None)
    with pytest.raises(ValueError, match="shuffle_p"):
        build_caption(findings, impression, shuffle_p=1.5)


@pytest.mark.skipif(len(SAMPLE_PNGS) < 5, reason=needs_samples.kwargs["reason"])
@pytest.mark.parametrize(
    "text_mode",
    [
        ["--freeze_text", "true", "--cache_text_embeddings", "true"],
        ["--lora_text", "true", "--instruction", "Find it"],
    ],
    ids=["frozen-cached", "lora-online"],
)
def test_recipe_smoke_run_on_a_fabricated_tiny_dataset(make_encoder, tmp_path, text_mode):
    """FABRICATED PAIRING, for this smoke test only: the real sample X-rays get made-up short reports
    (the project has no real image-report pairs). It checks that the recipe runs end to end."""
    make_encoder().save_pretrained(tmp_path / "text")
    (tmp_path / "vision.json").write_text(json.dumps({"model_type": "clip_vision_model", **TINY_VISION}))
    with open(tmp_path / "pairs.jsonl", "w") as handle:
        for index, image in enumerate(SAMPLE_PNGS[:5]):
            row = {
                "image": str(image),
                "findings": FINDINGS[index % 4],
                "impression": IMPRESSIONS[index % 4],
                "label": index % 2,
            }
            handle.write(json.dumps(row) + "\n")
    train_clip = import_recipe("train_clip")
    output_dir = tmp_path / "run"
    final = train_clip.main([
        "--text_model_name_or_path", str(tmp_path / "text"), "--vision", str(tmp_path / "vision.json"),
        "--projection_dim", "16", "--image_size", "32", "--data", str(tmp_path / "pairs.jsonl"),
        *text_mode, "--sup_con_weight", "0.5", "--bce_weight", "0.5",
        "--output_dir", str(output_dir), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--use_cpu", "true",
    ])
    cached = "--cache_text_embeddings" in text_mode
    assert (output_dir / "text_embeddings.safetensors").is_file() == cached
    model, processor = AutoModel.from_pretrained(final), AutoProcessor.from_pretrained(final)
    assert isinstance(model, LLM2CLIP4CXRModel) and processor.image_processor.size["height"] == 32
    assert not any("lora_" in name for name in model.state_dict())  # adapters merged before saving
    initial = LLM2CLIP4CXRModel.from_text_vision_pretrained(
        tmp_path / "text", CLIPVisionConfig(**TINY_VISION), projection_dim=16
    )
    text_changed = [
        name for name, value in initial.text_model.state_dict().items()
        if not torch.equal(model.text_model.state_dict()[name], value)
    ]
    # Frozen: the text tower is saved unchanged. LoRA: only the merged attention projections moved.
    if cached:
        assert text_changed == []
    else:
        assert text_changed and all(
            name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))
            for name in text_changed
        )


def test_collator_emits_cached_rows_instead_of_tokens(processor):
    image = str(SAMPLE_PNGS[0]) if SAMPLE_PNGS else pytest.skip(needs_samples.kwargs["reason"])
    rows = [
        {"image": image, "findings": FINDINGS[i], "impression": IMPRESSIONS[i], "index": i, "label": i} for i in (2, 0)
    ]
    table = torch.arange(12.0).reshape(4, 3)
    batch = ClipCollator(processor, text_embeddings=table)(rows)
    assert set(batch) == {"pixel_values", "text_embeds_cached", "labels"}
    torch.testing.assert_close(batch["text_embeds_cached"], table[[2, 0]])
    online = ClipCollator(processor)(rows)
    assert {"input_ids", "attention_mask", "embed_mask", "pixel_values", "labels"} <= set(online)


def test_recipe_reports_bad_input_in_one_line_and_exit_status_1(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "training" / "train_clip.py"), "--model_name_or_path", str(tmp_path / "a"),
         "--text_model_name_or_path", str(tmp_path / "b"), "--data", str(tmp_path / "rows.csv"),
         "--output_dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: Pass exactly one of --model_name_or_path and --text_model_name_or_path (with --vision)."
    )
    assert "Traceback" not in result.stderr
