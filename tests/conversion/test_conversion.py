"""Converters of the published LLM2Vec4CXR / LLM2CLIP4CXR weights, on tiny checkpoints fabricated in the exact
published layouts, against reference computations written here with plain torch ops."""

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaModel

from llm2clip4cxr import CheckpointMismatchError, LLM2CLIP4CXRModel, LLM2CLIP4CXRProcessor, LLM2Vec4CXRModel
from llm2clip4cxr.cli import main as cli_main
from llm2clip4cxr.conversion import convert_llm2clip4cxr, convert_llm2vec4cxr, load_state_dict_file

from ..modeling.test_remote_code import REFUSE_PACKAGE

SEPARATOR = "!@#$%^&*()"
# As the authors' tutorial and training data: "instruction; " + separator + report.
INSTRUCTION = "Determine the change or the status of the pleural effusion.; "
HIDDEN, LATENTS, LATENT_HEADS = 64, 16, 8


def fabricate_llm2vec4cxr_release(folder, tokenizer, seed=0, causal_lm_prefix=False):
    """A folder in the published LLM2Vec4CXR layout: plain Llama config.json, tokenizer files and one
    model.safetensors with the bare decoder's keys plus latent_attn.*."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    backbone = LlamaModel(config)
    weights = {("model." if causal_lm_prefix else "") + key: value for key, value in backbone.state_dict().items()}
    if causal_lm_prefix:
        weights["lm_head.weight"] = torch.randn(len(tokenizer), HIDDEN)
    attention = torch.nn.MultiheadAttention(HIDDEN, LATENT_HEADS, batch_first=True)
    weights.update(
        {
            "latent_attn.latents": torch.randn(LATENTS, HIDDEN),
            **{
                f"latent_attn.multihead_attn.{key}": value.detach().clone()
                for key, value in attention.state_dict().items()
            },
            "latent_attn.mlp.0.weight": torch.randn(HIDDEN, HIDDEN) * 0.1,
            "latent_attn.mlp.0.bias": torch.randn(HIDDEN) * 0.1,
            "latent_attn.mlp.2.weight": torch.randn(HIDDEN, HIDDEN) * 0.1,
            "latent_attn.mlp.2.bias": torch.randn(HIDDEN) * 0.1,
        }
    )
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    release_tokenizer = copy.deepcopy(tokenizer)
    release_tokenizer.pad_token = None  # the published tokenizer has no pad token: the loader pads with eos
    release_tokenizer.save_pretrained(folder)
    save_file({key: value.contiguous() for key, value in weights.items()}, folder / "model.safetensors")
    return config, weights


def reference_llm2vec4cxr(config, weights, tokenizer, texts):
    """The original computation, sample by sample: split on the separator, tokenize the joined text, count the
    report's tokens tokenized alone, run the decoder bidirectionally (a full 4-D mask), and pool the last
    `count` token states with nn.MultiheadAttention(tokens, latents, latents) -> Linear-GELU-Linear -> mean."""
    backbone = LlamaModel(config).eval()
    backbone.load_state_dict(
        {
            key.removeprefix("model."): value
            for key, value in weights.items()
            if not key.startswith(("latent_attn.", "lm_head."))
        }
    )
    attention = torch.nn.MultiheadAttention(HIDDEN, LATENT_HEADS, batch_first=True).eval()
    attention.load_state_dict(
        {
            key.removeprefix("latent_attn.multihead_attn."): value
            for key, value in weights.items()
            if key.startswith("latent_attn.multihead_attn.")
        }
    )
    latents = weights["latent_attn.latents"].unsqueeze(0)
    out = []
    with torch.no_grad():
        for text in texts:
            parts = text.split(SEPARATOR)
            ids = tokenizer("".join(parts), return_tensors="pt")["input_ids"]
            count = len(tokenizer(parts[1], add_special_tokens=False)["input_ids"])
            bidirectional = torch.zeros(1, 1, ids.shape[1], ids.shape[1])
            states = backbone(input_ids=ids, attention_mask=bidirectional).last_hidden_state[0]
            tokens = states[-count:].unsqueeze(0)
            attended, _ = attention(tokens, latents, latents)
            hidden = F.linear(attended, weights["latent_attn.mlp.0.weight"], weights["latent_attn.mlp.0.bias"])
            hidden = F.linear(F.gelu(hidden), weights["latent_attn.mlp.2.weight"], weights["latent_attn.mlp.2.bias"])
            out.append(hidden.mean(dim=1)[0])
    return torch.stack(out)


def report_tokens_agree(tokenizer, text):
    """Whether the report alone has as many tokens as in context (then the original's embed mask covers
    exactly the report; see docs/compatibility.md for when it does not)."""
    instruction, report = text.split(SEPARATOR)
    joined = tokenizer(instruction + report, add_special_tokens=False)["input_ids"]
    head = tokenizer(instruction.rstrip(), add_special_tokens=False)["input_ids"]
    return len(joined) - len(head) == len(tokenizer(report, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def converted_text(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("llm2vec4cxr")
    config, weights = fabricate_llm2vec4cxr_release(root / "release", tokenizer)
    summary = convert_llm2vec4cxr(root / "release", root / "converted")
    return root, config, weights, summary


def test_llm2vec4cxr_conversion_equals_original_computation(converted_text, tokenizer, report_texts):
    root, config, weights, summary = converted_text
    assert summary["pooling_mode"] == "latent_attention" and summary["num_latents"] == LATENTS
    assert summary["latent_attention_keys"] == 9 and summary["dropped_keys"] == []
    texts = [INSTRUCTION + SEPARATOR + report for report in report_texts[:40]]
    # Both kinds: texts where the report's first word tokenizes alike alone and after the instruction, and
    # texts where it does not (there the original's embed mask is off by a token, and so must ours be).
    agreeing = [text for text in texts if report_tokens_agree(tokenizer, text)][:4]
    disagreeing = [text for text in texts if not report_tokens_agree(tokenizer, text)][:4]
    assert len(agreeing) == len(disagreeing) == 4
    texts = agreeing + disagreeing
    model = LLM2Vec4CXRModel.from_pretrained(root / "converted")
    assert model.config.pooling_mode == "latent_attention"
    assert model.config.instruction_separator == SEPARATOR
    assert model.config.embed_mask_rule == summary["embed_mask_rule"] == "report_token_count"
    assert model.tokenizer.pad_token == model.tokenizer.eos_token
    expected = reference_llm2vec4cxr(config, weights, tokenizer, texts)
    torch.testing.assert_close(model.encode(texts, batch_size=4), expected, rtol=1e-4, atol=1e-5)
    # The exact (offsets) rule pools exactly the report: same result where the counts agree, not elsewhere.
    model.config.embed_mask_rule = "offsets"
    exact = model.encode(texts, batch_size=4)
    torch.testing.assert_close(exact[:4], expected[:4], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(exact[4:], expected[4:], rtol=1e-4, atol=1e-5)


FRESH_TEXT = REFUSE_PACKAGE + r"""
path, texts_file, out_file = sys.argv[1:]
texts = json.load(open(texts_file))
from transformers import AutoModel
from sentence_transformers import SentenceTransformer
model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
st = SentenceTransformer(path, trust_remote_code=True)
assert "llm2clip4cxr" not in sys.modules, "llm2clip4cxr was imported"
torch.save({"module": type(model).__module__, "encode": model.encode(texts),
            "st": torch.from_numpy(st.encode(texts))}, out_file)
"""


def test_converted_llm2vec4cxr_loads_as_remote_code_in_fresh_process(
    converted_text, tokenizer, report_texts, tmp_path
):
    root, config, weights, _ = converted_text
    texts = [INSTRUCTION + SEPARATOR + report for report in report_texts[:40]]
    texts = [text for text in texts if report_tokens_agree(tokenizer, text)][:2] + [
        text for text in texts if not report_tokens_agree(tokenizer, text)
    ][:2]  # the published mask rule matters here
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run([sys.executable, "-c", FRESH_TEXT, str(root / "converted"), str(tmp_path / "texts.json"),
                    str(tmp_path / "out.pt")], check=True, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL)
    result = torch.load(tmp_path / "out.pt")
    assert result["module"].startswith("transformers_modules.")
    expected = reference_llm2vec4cxr(config, weights, tokenizer, texts)
    torch.testing.assert_close(result["encode"], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result["st"], expected, rtol=1e-4, atol=1e-5)


def test_llm2vec4cxr_conversion_accepts_causal_lm_layout(tmp_path, tokenizer, report_texts):
    config, weights = fabricate_llm2vec4cxr_release(tmp_path / "release", tokenizer, seed=1, causal_lm_prefix=True)
    summary = convert_llm2vec4cxr(tmp_path / "release", tmp_path / "converted")
    assert summary["dropped_keys"] == ["lm_head.weight"]
    text = [INSTRUCTION + SEPARATOR + report for report in report_texts[:2]]
    torch.testing.assert_close(
        LLM2Vec4CXRModel.from_pretrained(tmp_path / "converted").encode(text),
        reference_llm2vec4cxr(config, weights, tokenizer, text), rtol=1e-4, atol=1e-5,
    )


def test_from_pretrained_on_published_layout_says_to_convert(converted_text):
    root = converted_text[0]
    with pytest.raises(ValueError, match=r"llm2clip4cxr convert llm2vec4cxr"):
        LLM2Vec4CXRModel.from_pretrained(root / "release")


def _rewrite_release(source, destination, edit):
    import shutil

    shutil.copytree(source, destination)
    weights = load_file(destination / "model.safetensors")
    edit(weights)
    save_file(weights, destination / "model.safetensors")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda w: w.pop("latent_attn.mlp.2.bias"), r"missing keys: mlp\.2\.bias"),
        (lambda w: w.pop("layers.1.mlp.up_proj.weight"), r"missing keys: layers\.1\.mlp\.up_proj\.weight"),
        (lambda w: w.update({"layers.0.extra.weight": torch.zeros(2)}), r"unknown keys: layers\.0\.extra\.weight"),
        (lambda w: w.update({"latent_attn.extra": torch.zeros(2)}), r"unknown keys: extra"),
        (
            lambda w: w.update({"norm.weight": torch.zeros(3)}),
            r"size-mismatched keys: norm\.weight \(checkpoint \(3,\) vs expected \(64,\)\)",
        ),
    ],
)
def test_llm2vec4cxr_conversion_names_bad_keys(converted_text, tmp_path, edit, message):
    _rewrite_release(converted_text[0] / "release", tmp_path / "release", edit)
    with pytest.raises(CheckpointMismatchError, match=message):
        convert_llm2vec4cxr(tmp_path / "release", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_llm2vec4cxr_pooling_mode_rules(converted_text, tmp_path):
    release = converted_text[0] / "release"
    with pytest.raises(ValueError, match="would discard them"):
        convert_llm2vec4cxr(release, tmp_path / "out", pooling_mode="mean")
    _rewrite_release(
        release, tmp_path / "plain", lambda w: [w.pop(key) for key in list(w) if key.startswith("latent_attn.")]
    )
    with pytest.raises(ValueError, match="does not store its pooling mode"):
        convert_llm2vec4cxr(tmp_path / "plain", tmp_path / "out")
    assert convert_llm2vec4cxr(tmp_path / "plain", tmp_path / "out", pooling_mode="mean")["pooling_mode"] == "mean"
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_llm2vec4cxr(tmp_path / "plain", tmp_path / "out", pooling_mode="mean")


# ------------------------------------------------------------------------------------------- LLM2CLIP4CXR

WIDTH, LAYERS, HEADS, PATCH, IMAGE, MLP, PROJECTION = 64, 2, 4, 14, 56, 96, 48
GRID, PRETRAIN_GRID, HEAD_DIM = IMAGE // PATCH, 2, WIDTH // HEADS
LORA_RANK, LORA_ALPHA = 4, 8.0


def reference_rope(grid, pretrain_grid, head_dim):
    """EVA's VisionRotaryEmbeddingFast tables, written out: 2D, interleaved pairs, intp_freq."""
    dim = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(grid) / grid * pretrain_grid
    f = torch.einsum("i,f->if", t, freqs).repeat_interleave(2, dim=-1)  # (grid, dim)
    table = torch.cat((f[:, None, :].expand(grid, grid, dim), f[None, :, :].expand(grid, grid, dim)), dim=-1)
    table = table.reshape(grid * grid, head_dim)
    return table.cos(), table.sin()


def fabricate_llm2clip4cxr_state_dict(text_state, seed=0):
    """A state dict with the key structure of the published LLM2CLIP4CXR training checkpoint: EVA02 `visual.*`
    (q_proj/v_proj biases, no k bias, sub-LN, SwiGLU, rope tables in every block), `text.projection.{0,1}`,
    `logit_scale`, and the text tower twice (`text.core.` and its alias `text.model.`) as a PEFT model with
    a zero-initialised "default" adapter and the trained "llm2clip" one on q/k/v/o."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    cos, sin = reference_rope(GRID, PRETRAIN_GRID, HEAD_DIM)
    sd = {
        "visual.cls_token": rand(1, 1, WIDTH),
        "visual.pos_embed": rand(1, GRID * GRID + 1, WIDTH),
        "visual.patch_embed.proj.weight": rand(WIDTH, 3, PATCH, PATCH, scale=0.05),
        "visual.patch_embed.proj.bias": rand(WIDTH),
        "visual.rope.freqs_cos": cos,
        "visual.rope.freqs_sin": sin,
        "visual.norm.weight": 1 + rand(WIDTH),
        "visual.norm.bias": rand(WIDTH),
        "visual.head.weight": rand(PROJECTION, WIDTH),
        "visual.head.bias": rand(PROJECTION),
        "text.projection.0.weight": 1 + rand(HIDDEN),
        "text.projection.0.bias": rand(HIDDEN),
        "text.projection.1.weight": rand(PROJECTION, HIDDEN),
        "text.projection.1.bias": rand(PROJECTION),
        "logit_scale": torch.tensor(math.log(50.0)),
    }
    for i in range(LAYERS):
        b = f"visual.blocks.{i}."
        sd.update({
            b + "norm1.weight": 1 + rand(WIDTH), b + "norm1.bias": rand(WIDTH),
            b + "attn.q_proj.weight": rand(WIDTH, WIDTH), b + "attn.q_proj.bias": rand(WIDTH),
            b + "attn.k_proj.weight": rand(WIDTH, WIDTH),
            b + "attn.v_proj.weight": rand(WIDTH, WIDTH), b + "attn.v_proj.bias": rand(WIDTH),
            b + "attn.inner_attn_ln.weight": 1 + rand(WIDTH), b + "attn.inner_attn_ln.bias": rand(WIDTH),
            b + "attn.proj.weight": rand(WIDTH, WIDTH), b + "attn.proj.bias": rand(WIDTH),
            b + "attn.rope.freqs_cos": cos, b + "attn.rope.freqs_sin": sin,
            b + "norm2.weight": 1 + rand(WIDTH), b + "norm2.bias": rand(WIDTH),
            b + "mlp.w1.weight": rand(MLP, WIDTH), b + "mlp.w1.bias": rand(MLP),
            b + "mlp.w2.weight": rand(MLP, WIDTH), b + "mlp.w2.bias": rand(MLP),
            b + "mlp.ffn_ln.weight": 1 + rand(MLP), b + "mlp.ffn_ln.bias": rand(MLP),
            b + "mlp.w3.weight": rand(WIDTH, MLP), b + "mlp.w3.bias": rand(WIDTH),
        })
    lora = {}
    for key, value in text_state.items():
        if key.startswith("latent_attn."):
            core = {key: value}
        else:
            rest = key.removeprefix("model.")
            module = rest.rsplit(".", 1)[0]
            if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")):
                rest = rest.replace(module, module + ".base_layer")
                for adapter, scale in (("default", 0.0), ("llm2clip", 0.2)):
                    base = f"model.base_model.model.{module}"
                    lora[f"{base}.lora_A.{adapter}.weight"] = rand(LORA_RANK, value.shape[1])
                    lora[f"{base}.lora_B.{adapter}.weight"] = rand(value.shape[0], LORA_RANK, scale=scale)
            core = {f"model.base_model.model.{rest}": value}
        for prefix in ("text.core.", "text.model."):
            sd.update({prefix + k: v for k, v in core.items()})
    for prefix in ("text.core.", "text.model."):
        sd.update({prefix + k: v for k, v in lora.items()})
    return sd


def reference_eva02_image_features(sd, pixels):
    """The published EVA02 forward written with plain ops on the state dict: patch conv, CLS, absolute
    positions, blocks (rope on patch tokens only, sub-LN, SwiGLU), final norm, CLS, head."""
    def ln(x, name, eps=1e-6):
        return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)

    def linear(x, name):
        return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))

    x = F.conv2d(pixels, sd["visual.patch_embed.proj.weight"], sd["visual.patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat((sd["visual.cls_token"].expand(len(x), -1, -1), x), dim=1) + sd["visual.pos_embed"]
    cos, sin = sd["visual.rope.freqs_cos"], sd["visual.rope.freqs_sin"]

    def rope(t):
        pairs = t.reshape(*t.shape[:-1], -1, 2)
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).reshape(t.shape)
        return t * cos + rotated * sin

    B, N, _ = x.shape
    for i in range(LAYERS):
        b = f"visual.blocks.{i}."
        h = ln(x, b + "norm1")
        q, k, v = (linear(h, b + f"attn.{n}_proj").reshape(B, N, HEADS, HEAD_DIM).permute(0, 2, 1, 3) for n in "qkv")
        q = torch.cat((q[:, :, :1], rope(q[:, :, 1:])), dim=2)
        k = torch.cat((k[:, :, :1], rope(k[:, :, 1:])), dim=2)
        attn = ((q * HEAD_DIM**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(B, N, WIDTH)
        x = x + linear(ln(h, b + "attn.inner_attn_ln"), b + "attn.proj")
        h = ln(x, b + "norm2")
        h = F.silu(linear(h, b + "mlp.w1")) * linear(h, b + "mlp.w2")
        x = x + linear(ln(h, b + "mlp.ffn_ln"), b + "mlp.w3")
    return linear(ln(x, "visual.norm")[:, 0], "visual.head")


@pytest.fixture(scope="module")
def published_clip(converted_text, tmp_path_factory):
    root = tmp_path_factory.mktemp("llm2clip4cxr")
    text_dir = converted_text[0] / "converted"
    text_state = LLM2Vec4CXRModel.from_pretrained(text_dir).state_dict()
    sd = fabricate_llm2clip4cxr_state_dict(text_state)
    torch.save({"state_dict": sd, "epoch": 3}, root / "llm2clip4cxr.bin")
    summary = convert_llm2clip4cxr(
        root / "llm2clip4cxr.bin", root / "converted", text_model=text_dir, lora_alpha=LORA_ALPHA,
        rope_pretrain_grid=PRETRAIN_GRID,
    )
    return root, text_dir, sd, summary


def test_llm2clip4cxr_conversion_equals_reference_forward(published_clip, report_texts):
    root, text_dir, sd, summary = published_clip
    assert summary["merged_lora_adapter"] == "llm2clip" and summary["merged_lora_modules"] == 4 * 2
    assert summary["rope_tables_checked"] == 2 + 2 * LAYERS
    model = LLM2CLIP4CXRModel.from_pretrained(root / "converted").eval()
    assert model.config.vision_config.model_type == "eva02_vision_model"
    assert model.config.vision_config.image_size == IMAGE
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(image, reference_eva02_image_features(sd, pixels), rtol=1e-4, atol=1e-5)

    # Text side: the LLM2Vec4CXR tower with the "llm2clip" LoRA applied by PEFT (the original's runtime path),
    # then LayerNorm -> Linear.
    from peft import LoraConfig, get_peft_model

    tower = LLM2Vec4CXRModel.from_pretrained(text_dir).eval()
    tower.model = get_peft_model(
        tower.model,
        LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        adapter_name="llm2clip",
    )
    lora = {
        key.removeprefix("text.core.model.base_model.model."): value
        for key, value in sd.items()
        if key.startswith("text.core.") and ".llm2clip." in key
    }
    for name, parameter in tower.model.named_parameters():
        if "lora_" in name:
            parameter.data.copy_(lora[name.removeprefix("base_model.model.")])
    texts = ["Retrieve the image that best matches the following report.; " + SEPARATOR + r for r in report_texts[:4]]
    with torch.no_grad():
        pooled = tower.encode(texts)
        expected = F.linear(
            F.layer_norm(pooled, (HIDDEN,), sd["text.projection.0.weight"], sd["text.projection.0.bias"]),
            sd["text.projection.1.weight"], sd["text.projection.1.bias"],
        )
        batch = LLM2CLIP4CXRProcessor.from_pretrained(root / "converted")(text=texts)
        text = model.get_text_features(**batch).pooler_output
    torch.testing.assert_close(text, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.get_logit_scale(), torch.tensor(50.0))


FRESH_CLIP = REFUSE_PACKAGE + r"""
path, out_file = sys.argv[1:]
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
assert "llm2clip4cxr" not in sys.modules, "llm2clip4cxr was imported"
torch.manual_seed(0)
pixels = torch.randn(2, 3, model.config.vision_config.image_size, model.config.vision_config.image_size)
with torch.no_grad():
    image = model.get_image_features(pixel_values=pixels).pooler_output
torch.save({"module": type(model.vision_model).__module__, "image": image, "pixels": pixels,
            "size": dict(processor.image_processor.size)}, out_file)
"""


def test_converted_llm2clip4cxr_loads_as_remote_code_in_fresh_process(published_clip, tmp_path):
    root, _, sd, _ = published_clip
    converted = root / "converted"
    assert {"modeling_eva02.py", "configuration_eva02.py"} <= {p.name for p in converted.iterdir()}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run(
        [sys.executable, "-c", FRESH_CLIP, str(converted), str(tmp_path / "out.pt")], check=True, env=env, cwd=tmp_path
    )
    result = torch.load(tmp_path / "out.pt")
    assert result["module"].startswith("transformers_modules.")
    assert result["size"] == {"height": IMAGE, "width": IMAGE}
    torch.testing.assert_close(
        result["image"], reference_eva02_image_features(sd, result["pixels"]), rtol=1e-4, atol=1e-5
    )


def _convert_edited(published_clip, tmp_path, edit, **kwargs):
    root, text_dir, sd, _ = published_clip
    edited = dict(sd)
    edit(edited)
    torch.save(edited, tmp_path / "edited.bin")
    convert_llm2clip4cxr(tmp_path / "edited.bin", tmp_path / "out", text_model=text_dir, lora_alpha=LORA_ALPHA,
                         rope_pretrain_grid=kwargs.pop("rope_pretrain_grid", PRETRAIN_GRID), **kwargs)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda sd: sd.pop("visual.blocks.1.mlp.ffn_ln.bias"),
            r"missing keys: vision_model\.blocks\.1\.mlp\.ffn_ln\.bias",
        ),
        (lambda sd: sd.pop("text.projection.1.bias"), r"missing keys: text_projection\.1\.bias"),
        (
            lambda sd: sd.update({"visual.blocks.0.attn.k_proj.bias": torch.zeros(WIDTH)}),
            r"unknown keys: vision_model\.blocks\.0\.attn\.k_proj\.bias",
        ),
        (lambda sd: sd.update({"text.text_adaptor.weight": torch.zeros(2)}), r"does not: text\.text_adaptor\.weight"),
        (
            lambda sd: sd.update({"text.core.model.base_model.model.layers.0.extra.weight": torch.zeros(2)}),
            r"does not have: text\.core\.model\.base_model\.model\.layers\.0\.extra\.weight",
        ),
        (
            lambda sd: sd.update({"text.core.model.base_model.model.norm.weight": torch.zeros(HIDDEN)}),
            r"differ from --text-model \(text\.core\.model\.base_model\.model\.norm\.weight\)",
        ),
        (
            lambda sd: [
                sd.pop(f"text.{alias}.model.base_model.model.layers.0.self_attn.q_proj.lora_B.llm2clip.weight")
                for alias in ("core", "model")
            ],
            r"lacks lora_B",
        ),
        (
            lambda sd: sd.update(
                {
                    "text.model.model.base_model.model.layers.0.self_attn.q_proj.lora_A.llm2clip.weight": torch.zeros(
                        LORA_RANK, HIDDEN
                    )
                }
            ),
            r"copies of .*q_proj\.lora_A\.llm2clip\.weight differ",
        ),
        (
            lambda sd: sd.update({"visual.head.weight": torch.zeros(PROJECTION, WIDTH + 1)}),
            r"size-mismatched keys: visual_projection\.weight",
        ),
    ],
)
def test_llm2clip4cxr_conversion_names_bad_keys(published_clip, tmp_path, edit, message):
    with pytest.raises(CheckpointMismatchError, match=message):
        _convert_edited(published_clip, tmp_path, edit)
    assert not (tmp_path / "out").exists()


def test_llm2clip4cxr_conversion_checks_rope_tables(published_clip, tmp_path):
    with pytest.raises(CheckpointMismatchError, match=r"rotary table .* --rope-pretrain-grid"):
        _convert_edited(published_clip, tmp_path, lambda sd: None, rope_pretrain_grid=16)


class NeedsCode:
    pass


def test_pickle_needing_code_is_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": NeedsCode()}, tmp_path / "unsafe.bin")
    with pytest.raises(ValueError, match="needs arbitrary code to load"):
        load_state_dict_file(tmp_path / "unsafe.bin")


def test_damaged_safetensors_state_dicts_are_named_not_raw_safetensor_errors(tmp_path):
    from llm2clip4cxr.errors import CorruptFileError

    save_file({"w": torch.zeros(64)}, tmp_path / "whole.safetensors")
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    (tmp_path / "empty.safetensors").write_bytes(b"")
    torch.save({"w": torch.zeros(1)}, tmp_path / "pickle.safetensors")
    for name, what in (("cut", "truncated"), ("empty", "empty"), ("pickle", "PyTorch pickle")):
        with pytest.raises(CorruptFileError, match=f"{name}.safetensors: unreadable weights: .*{what}"):
            load_state_dict_file(tmp_path / f"{name}.safetensors")
    assert load_state_dict_file(tmp_path / "whole.safetensors")["w"].shape == (64,)


def test_llm2clip4cxr_from_pretrained_is_strict(published_clip, tmp_path):
    import shutil

    converted = tmp_path / "converted"
    shutil.copytree(published_clip[0] / "converted", converted)
    weights = load_file(converted / "model.safetensors")
    weights.pop("visual_projection.bias")
    weights["vision_model.extra"] = torch.zeros(1)
    weights["logit_scale"] = torch.zeros(2)
    save_file(weights, converted / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError) as error:
        LLM2CLIP4CXRModel.from_pretrained(converted)
    message = str(error.value)
    assert "missing_keys: visual_projection.bias" in message
    assert "unexpected_keys: vision_model.extra" in message
    assert "mismatched_keys: logit_scale (checkpoint (2,) vs model ())" in message
    with pytest.raises(ValueError, match="convert llm2clip4cxr"):
        LLM2CLIP4CXRModel.from_pretrained(published_clip[0] / "llm2clip4cxr.bin")


def test_convert_cli(converted_text, published_clip, tmp_path, capsys):
    root = converted_text[0]
    assert cli_main(["convert", "llm2vec4cxr", str(root / "release"), str(tmp_path / "text"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pooling_mode"] == "latent_attention"
    code = cli_main(
        [
            "convert",
            "llm2clip4cxr",
            str(published_clip[0] / "llm2clip4cxr.bin"),
            str(tmp_path / "clip"),
            "--text-model",
            str(tmp_path / "text"),
            "--lora-alpha",
            str(LORA_ALPHA),
            "--rope-pretrain-grid",
            str(PRETRAIN_GRID),
            "--json",
        ]
    )
    assert code == 0
    assert json.loads(capsys.readouterr().out)["merged_lora_adapter"] == "llm2clip"
    assert cli_main(["convert", "llm2vec4cxr", str(root / "release"), str(tmp_path / "text")]) == 1
    assert "already exists" in capsys.readouterr().err
