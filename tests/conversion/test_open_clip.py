"""BiomedCLIP (open_clip timm-ViT + BERT checkpoint) loaded without open_clip: equal to a plain-torch reference."""

import json
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import BertConfig, BertTokenizerFast

from llm2clip4cxr.evaluation.baselines import BiomedCLIPDualEncoder, load_dual_encoder

from ..shared_data import OPENI_REPORTS, needs_openi

EMBED_DIM, VIT_WIDTH, VIT_HEADS, VIT_DEPTH, PATCH, IMAGE = 16, 32, 4, 2, 8, 32
BERT_LAYERS, CONTEXT = 2, 12
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _vocab(report_texts):
    words = Counter(w for text in report_texts[:500] for w in re.findall(r"[a-z]+|[^\sa-z]", text.lower()))
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w, _ in words.most_common(150)] + ["##s", "##ed"]


class _RandomWeights:
    """Small random tensors in open_clip's naming, drawn from one seeded generator."""

    def __init__(self):
        self.generator = torch.Generator().manual_seed(0)

    def rand(self, *shape, scale=0.2):
        return torch.randn(*shape, generator=self.generator) * scale

    def norm(self, prefix, width, gamma="weight", beta="bias"):
        return {f"{prefix}.{gamma}": 1 + self.rand(width, scale=0.1), f"{prefix}.{beta}": self.rand(width, scale=0.1)}

    def linear(self, prefix, out_features, in_features, bias=True):
        weights = {f"{prefix}.weight": self.rand(out_features, in_features)}
        return weights | ({f"{prefix}.bias": self.rand(out_features)} if bias else {})


def _vit_state(w: _RandomWeights) -> dict:
    width, tokens = VIT_WIDTH, 1 + (IMAGE // PATCH) ** 2
    sd = {
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
        "visual.trunk.cls_token": w.rand(1, 1, width),
        "visual.trunk.pos_embed": w.rand(1, tokens, width),
        "visual.trunk.patch_embed.proj.weight": w.rand(width, 3, PATCH, PATCH),
        "visual.trunk.patch_embed.proj.bias": w.rand(width),
    }
    for i in range(VIT_DEPTH):
        block = f"visual.trunk.blocks.{i}"
        sd |= w.norm(f"{block}.norm1", width) | w.norm(f"{block}.norm2", width)
        sd |= w.linear(f"{block}.attn.qkv", 3 * width, width) | w.linear(f"{block}.attn.proj", width, width)
        sd |= w.linear(f"{block}.mlp.fc1", 4 * width, width) | w.linear(f"{block}.mlp.fc2", width, 4 * width)
    return sd | w.norm("visual.trunk.norm", width) | w.linear("visual.head.proj", EMBED_DIM, width, bias=False)


def _bert_state(w: _RandomWeights, vocab_size: int, width: int, proj: str) -> dict:
    t = "text.transformer"
    sd = {
        f"{t}.embeddings.word_embeddings.weight": w.rand(vocab_size, width),
        f"{t}.embeddings.position_embeddings.weight": w.rand(40, width),
        f"{t}.embeddings.token_type_embeddings.weight": w.rand(2, width),
        f"{t}.embeddings.position_ids": torch.arange(40)[None],  # saved by older transformers; not a weight
    }
    sd |= w.norm(f"{t}.embeddings.LayerNorm", width)
    for i in range(BERT_LAYERS):
        layer = f"{t}.encoder.layer.{i}"
        for name in ("query", "key", "value"):
            sd |= w.linear(f"{layer}.attention.self.{name}", width, width)
        sd |= w.linear(f"{layer}.attention.output.dense", width, width)
        sd |= w.norm(f"{layer}.attention.output.LayerNorm", width)
        sd |= w.linear(f"{layer}.intermediate.dense", 2 * width, width)
        sd |= w.linear(f"{layer}.output.dense", width, 2 * width) | w.norm(f"{layer}.output.LayerNorm", width)
    if proj == "mlp":
        hidden = (width + EMBED_DIM) // 2
        return (
            sd
            | w.linear("text.proj.0", hidden, width, bias=False)
            | w.linear("text.proj.2", EMBED_DIM, hidden, bias=False)
        )
    return sd | w.linear("text.proj", EMBED_DIM, width, bias=False)


def _open_clip_config(proj: str, pooler: str) -> dict:
    biomedbert = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    vit_kwargs = {"embed_dim": VIT_WIDTH, "depth": VIT_DEPTH, "num_heads": VIT_HEADS, "patch_size": PATCH}
    return {
        "model_cfg": {
            "embed_dim": EMBED_DIM,
            "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                           "timm_proj": "linear", "image_size": IMAGE, "timm_model_kwargs": vit_kwargs},
            "text_cfg": {"hf_model_name": biomedbert, "hf_tokenizer_name": biomedbert, "hf_proj_type": proj,
                         "hf_pooler_type": pooler, "context_length": CONTEXT},
        },
        "preprocess_cfg": {"mean": list(MEAN), "std": list(STD)},
    }


def _fabricate(folder, report_texts, *, bert_width=32, bert_heads=4, proj="mlp", pooler="cls_last_hidden_state_pooler",
               weights="safetensors", write_bert_config=True):
    """A tiny checkpoint in open_clip's BiomedCLIP layout; returns its state dict and BERT config."""
    vocab = _vocab(report_texts)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    random_weights = _RandomWeights()
    sd = _vit_state(random_weights) | _bert_state(random_weights, len(vocab), bert_width, proj)
    bert = BertConfig(vocab_size=len(vocab), hidden_size=bert_width, num_hidden_layers=BERT_LAYERS,
                      num_attention_heads=bert_heads, intermediate_size=2 * bert_width, max_position_embeddings=40)
    (folder / "open_clip_config.json").write_text(json.dumps(_open_clip_config(proj, pooler)), encoding="utf-8")
    if write_bert_config:
        bert.save_pretrained(folder)
    if weights == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, folder / "open_clip_model.safetensors")
    else:
        torch.save(sd, folder / "open_clip_pytorch_model.bin")
    return sd, bert


# ---- reference forward passes, plain torch on the state dict -----------------------------------------------

def _attention(x, q, k, v, heads, mask=None):
    batch, length, width = x.shape
    split = lambda t: t.view(batch, length, heads, width // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(width // heads)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :].bool(), float("-inf"))
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(batch, length, width)


def _reference_image(sd, pixels):
    p = "visual.trunk."
    ln = lambda x, name: F.layer_norm(x, (VIT_WIDTH,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)  # noqa: E731
    lin = lambda x, name: F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))  # noqa: E731
    x = F.conv2d(pixels, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(len(x), -1, -1), x], dim=1) + sd[p + "pos_embed"]
    for i in range(VIT_DEPTH):
        b = f"{p}blocks.{i}."
        q, k, v = lin(ln(x, b + "norm1"), b + "attn.qkv").chunk(3, dim=-1)
        x = x + lin(_attention(x, q, k, v, VIT_HEADS), b + "attn.proj")  # timm pre-norm block
        x = x + lin(F.gelu(lin(ln(x, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
    return F.linear(ln(x, p + "norm")[:, 0], sd["visual.head.proj.weight"])


def _reference_text(sd, bert, input_ids, proj, pooler):
    t, width = "text.transformer.", bert.hidden_size
    ln = lambda x, name: F.layer_norm(x, (width,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-12)  # noqa: E731
    lin = lambda x, name: F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))  # noqa: E731
    positions = torch.arange(input_ids.shape[1])
    x = (
        sd[t + "embeddings.word_embeddings.weight"][input_ids]
        + sd[t + "embeddings.position_embeddings.weight"][positions]
    )
    x = ln(x + sd[t + "embeddings.token_type_embeddings.weight"][0], t + "embeddings.LayerNorm")
    for i in range(bert.num_hidden_layers):
        b = f"{t}encoder.layer.{i}."
        attn = _attention(x, lin(x, b + "attention.self.query"), lin(x, b + "attention.self.key"),
                          lin(x, b + "attention.self.value"), bert.num_attention_heads)
        x = ln(x + lin(attn, b + "attention.output.dense"), b + "attention.output.LayerNorm")  # BERT post-norm
        x = ln(x + lin(F.gelu(lin(x, b + "intermediate.dense")), b + "output.dense"), b + "output.LayerNorm")
    pooled = x[:, 0] if pooler == "cls_last_hidden_state_pooler" else x.mean(1)
    if proj == "mlp":
        return F.linear(F.gelu(F.linear(pooled, sd["text.proj.0.weight"])), sd["text.proj.2.weight"])
    return F.linear(pooled, sd["text.proj.weight"])


def _reference_pixels(image: np.ndarray) -> torch.Tensor:
    # A 40x48 (H x W) image: shorter side 40 -> 32 makes it 32x38 (int(32 * 48 / 40)); centre crop from column 3.
    assert image.shape[:2] == (40, 48)
    resized = np.asarray(
        Image.fromarray(image).convert("RGB").resize((38, 32), Image.Resampling.BICUBIC), dtype=np.float32
    )
    crop = resized[:, 3:35].transpose(2, 0, 1) / 255.0
    return torch.from_numpy(
        (crop - np.array(MEAN, np.float32)[:, None, None]) / np.array(STD, np.float32)[:, None, None]
    )


CASES = {
    # BiomedCLIP's own shape: MLP projection, class-token pooler, safetensors, the BERT config.json alongside.
    "biomedclip": dict(bert_width=32, bert_heads=4, proj="mlp", pooler="cls_last_hidden_state_pooler",
                       weights="safetensors", write_bert_config=True),
    # A .bin state dict, linear projection, mean pooler, and a BERT config read off the weight shapes (64-wide heads).
    "bin_inferred_config": dict(bert_width=64, bert_heads=1, proj="linear", pooler="mean_pooler",
                                weights="bin", write_bert_config=False),
}


@pytest.mark.parametrize("case", CASES)
def test_biomedclip_features_match_plain_torch_reference(tmp_path, report_texts, case):
    options = CASES[case]
    sd, bert = _fabricate(tmp_path, report_texts, **options)
    encoder = BiomedCLIPDualEncoder.from_open_clip(tmp_path, batch_size=2)
    texts = [
        report_texts[0],
        "Heart size  is normal &amp; lungs are clear.",
        report_texts[3] * 5,
    ]  # the last is truncated
    tokenizer = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"), do_lower_case=True)
    cleaned = [texts[0].strip(), "Heart size is normal & lungs are clear.", texts[2].strip()]
    with torch.no_grad():  # one text at a time, no padding: the adapter's batching and masking must not matter
        expected = torch.cat(
            [
                _reference_text(
                    sd,
                    bert,
                    tokenizer([text], truncation=True, max_length=CONTEXT, return_tensors="pt")["input_ids"],
                    options["proj"],
                    options["pooler"],
                )
                for text in cleaned
            ]
        )
    np.testing.assert_allclose(
        encoder.encode_texts(texts), F.normalize(expected, dim=-1).numpy(), rtol=1e-4, atol=1e-5
    )

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(3)]
    with torch.no_grad():
        expected_images = _reference_image(sd, torch.stack([_reference_pixels(image) for image in images]))
    features = encoder.encode_images(images)
    np.testing.assert_allclose(features, F.normalize(expected_images, dim=-1).numpy(), rtol=1e-4, atol=1e-5)
    assert features.dtype == np.float32 and encoder(texts).dtype == np.float32


def test_biomedclip_reads_grayscale_image_files_as_three_channels(tmp_path, report_texts):
    _fabricate(tmp_path, report_texts)
    encoder = load_dual_encoder(tmp_path)
    assert isinstance(encoder, BiomedCLIPDualEncoder)
    gray = np.random.default_rng(1).integers(0, 256, (40, 48), dtype=np.uint8)
    gray[0, 0], gray[0, 1] = 0, 255  # full range, so load_image's min-max scaling leaves the pixels as they are
    Image.fromarray(gray).save(tmp_path / "cxr.png")
    from_file = encoder.encode_images([tmp_path / "cxr.png", str(tmp_path / "cxr.png")])
    from_rgb = encoder.encode_images([np.repeat(gray[:, :, None], 3, axis=2)])
    np.testing.assert_allclose(from_file, np.concatenate([from_rgb, from_rgb]), rtol=1e-5, atol=1e-6)


class _CodePayload:  # a pickled instance of this class needs code to load
    pass


def _edit_safetensors(folder, edit):
    from safetensors.torch import load_file

    sd = load_file(folder / "open_clip_model.safetensors")
    edit(sd)
    save_file(sd, folder / "open_clip_model.safetensors")


@pytest.mark.parametrize(
    "break_it, error, message",
    [
        (
            lambda f: _edit_safetensors(f, lambda sd: sd.update({"visual.trunk.extra.weight": torch.zeros(2)})),
            ValueError,
            r"Unknown keys: \['visual.trunk.extra.weight'\]",
        ),
        (
            lambda f: _edit_safetensors(f, lambda sd: sd.pop("text.proj.2.weight")),
            ValueError,
            r"Missing keys: \['text.proj.2.weight'\]",
        ),
        (
            lambda f: _edit_safetensors(
                f, lambda sd: sd.update({"visual.head.proj.weight": torch.zeros(EMBED_DIM, 8)})
            ),
            ValueError,
            r"visual.head.proj.weight: \(16, 8\), expected \(16, 32\)",
        ),
        (lambda f: (f / "vocab.txt").unlink(), FileNotFoundError, r"put the vocab.txt .* of 'microsoft/BiomedNLP"),
        (lambda f: (f / "open_clip_model.safetensors").unlink(), FileNotFoundError, "none of"),
        (
            lambda f: (
                (f / "open_clip_model.safetensors").unlink(),
                torch.save(
                    {"visual.trunk.cls_token": torch.zeros(1), "x": _CodePayload()}, f / "open_clip_pytorch_model.bin"
                ),
            ),
            ValueError,
            "pickle that needs code to load, which is refused",
        ),
        (
            lambda f: (f / "config.json").write_text(
                json.dumps({**json.loads((f / "config.json").read_text()), "pad_token_id": 3})
            ),
            ValueError,
            "tokenizer pads with id 0 but .* has pad_token_id 3",
        ),
    ],
    ids=["unknown_key", "missing_key", "wrong_shape", "no_tokenizer", "no_weights", "code_pickle", "pad_id_mismatch"],
)
def test_biomedclip_errors_name_the_problem(tmp_path, report_texts, break_it, error, message):
    _fabricate(tmp_path, report_texts)
    break_it(tmp_path)
    with pytest.raises(error, match=message):
        BiomedCLIPDualEncoder.from_open_clip(tmp_path)


def test_biomedclip_refuses_unsupported_vision_towers(tmp_path, report_texts):
    _fabricate(tmp_path, report_texts)
    config = json.loads((tmp_path / "open_clip_config.json").read_text())
    config["model_cfg"]["vision_cfg"]["timm_model_name"] = "convnext_base"
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'convnext_base' is not supported"):
        BiomedCLIPDualEncoder.from_open_clip(tmp_path)


@needs_openi
def test_eval_cli_scores_a_clip_baseline_like_the_harness(tmp_path, report_texts):
    from llm2clip4cxr.cli import main
    from llm2clip4cxr.data import read_reports_csv
    from llm2clip4cxr.evaluation import harness

    folder = tmp_path / "biomedclip"
    folder.mkdir()
    _fabricate(folder, report_texts)
    out = tmp_path / "eval"
    code = main(
        [
            "eval",
            "--no-model",
            "--clip-baseline",
            str(folder),
            "--limit",
            "20",
            "--tasks",
            "findings_to_impression",
            "--output-dir",
            str(out),
            "--json",
        ]
    )
    assert code == 0
    rows = read_reports_csv(OPENI_REPORTS)[:20]
    expected = harness.run_evaluation({"biomedclip": BiomedCLIPDualEncoder.from_open_clip(folder).encode_texts}, rows,
                                      tasks=["findings_to_impression"])
    assert json.loads((out / "results.json").read_text())["models"] == expected["models"]
    assert main(["eval", "--no-model", "--clip-baseline", str(tmp_path / "nope"), "--output-dir", str(out)]) == 1
