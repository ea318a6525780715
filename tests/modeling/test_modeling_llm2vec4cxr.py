import json
import math

import pytest
import torch
import torch.nn.functional as F

from llm2clip4cxr import CheckpointMismatchError, LLM2Vec4CXRModel

from ..conftest import FAMILIES, INSTRUCTION

POOLING_MODES = ("mean", "weighted_mean", "eos", "latent_attention")


def _first_token_state(model, ids):
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0, 0]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tokens_see_later_tokens(make_encoder, family, attn_implementation):
    bidirectional = make_encoder(family)
    causal = make_encoder(family, bidirectional=False)
    for model in (bidirectional, causal):
        model.config._attn_implementation = attn_implementation
    ids = torch.tensor([[5, 17, 33, 48, 61, 70]])
    changed = ids.clone()
    changed[0, -1] = 99
    with torch.no_grad():
        bidirectional_delta = (
            (_first_token_state(bidirectional, ids) - _first_token_state(bidirectional, changed)).abs().max()
        )
        causal_delta = (_first_token_state(causal, ids) - _first_token_state(causal, changed)).abs().max()
    assert bidirectional_delta > 1e-4
    assert causal_delta < 1e-6  # the same check on a causal model cannot see the change


def _reference_pool(model, hidden, content):
    """Per-sample reference of each pooling mode, on the content rows of one sample."""
    states = hidden[content]  # (n, d)
    mode = model.config.pooling_mode
    if mode == "mean":
        return states.mean(0)
    if mode == "eos":
        return states[-1]
    if mode == "weighted_mean":
        weights = torch.arange(1, len(states) + 1, dtype=states.dtype)
        return (states * weights[:, None]).sum(0) / weights.sum()
    pooling = model.latent_attn
    attention = pooling.multihead_attn
    d = states.shape[1]
    heads = attention.num_heads
    w_q, w_k, w_v = attention.in_proj_weight.split(d)
    b_q, b_k, b_v = attention.in_proj_bias.split(d)
    q = (states @ w_q.T + b_q).view(-1, heads, d // heads).transpose(0, 1)  # (h, n, dh)
    k = (pooling.latents @ w_k.T + b_k).view(-1, heads, d // heads).transpose(0, 1)  # (h, L, dh)
    v = (pooling.latents @ w_v.T + b_v).view(-1, heads, d // heads).transpose(0, 1)
    attended = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d // heads), dim=-1) @ v  # (h, n, dh)
    attended = attended.transpose(0, 1).reshape(-1, d) @ attention.out_proj.weight.T + attention.out_proj.bias
    mlp = pooling.mlp
    out = mlp[2](F.gelu(mlp[0](attended)))
    return out.mean(0)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("pooling_mode", POOLING_MODES)
def test_batched_pooling_equals_per_sample_reference(make_encoder, report_texts, pooling_mode, padding_side):
    model = make_encoder(pooling_mode=pooling_mode)
    model.tokenizer.padding_side = padding_side
    with torch.no_grad():
        # Give the pooling head non-trivial weights (random init leaves it near zero).
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
        batch = model.tokenize(report_texts[:5], instruction=INSTRUCTION)
        output = model(**batch)
    assert (batch["embed_mask"].sum(1) < batch["attention_mask"].sum(1)).all()  # the instruction is pooled out
    for row in range(5):
        content = batch["embed_mask"][row].bool()
        expected = _reference_pool(model, output.last_hidden_state[row], content)
        torch.testing.assert_close(output.pooler_output[row], expected, rtol=1e-4, atol=1e-5)


def test_latent_attention_parameter_names_match_published_weights(make_encoder):
    model = make_encoder(pooling_mode="latent_attention", num_latents=512)
    names = {name: tuple(p.shape) for name, p in model.state_dict().items() if name.startswith("latent_attn.")}
    d = model.config.hidden_size
    assert names == {
        "latent_attn.latents": (512, d),
        "latent_attn.multihead_attn.in_proj_weight": (3 * d, d),
        "latent_attn.multihead_attn.in_proj_bias": (3 * d,),
        "latent_attn.multihead_attn.out_proj.weight": (d, d),
        "latent_attn.multihead_attn.out_proj.bias": (d,),
        "latent_attn.mlp.0.weight": (d, d),
        "latent_attn.mlp.0.bias": (d,),
        "latent_attn.mlp.2.weight": (d, d),
        "latent_attn.mlp.2.bias": (d,),
    }
    assert model.latent_attn.multihead_attn.num_heads == 8


def test_embed_mask_covers_exactly_the_report(make_encoder):
    model = make_encoder()
    report = "Small left pleural effusion."
    batch = model.tokenize([report], instruction="  Find similar reports  ")
    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    embed = batch["embed_mask"][0][batch["attention_mask"][0].bool()].bool()
    assert model.tokenizer.decode(ids[embed]).strip() == report
    assert model.tokenizer.decode(ids[~embed], skip_special_tokens=True).strip() == "Find similar reports"


@pytest.mark.parametrize(
    ("family", "pooling_mode"),
    [("llama", mode) for mode in POOLING_MODES] + [(family, "mean") for family in FAMILIES[1:]],
)
def test_padding_side_and_batch_size_do_not_change_embeddings(make_encoder, report_texts, family, pooling_mode):
    model = make_encoder(family, pooling_mode=pooling_mode)
    texts = report_texts[:9]
    model.tokenizer.padding_side = "right"
    reference = model.encode(texts, instruction=INSTRUCTION, batch_size=9)
    model.tokenizer.padding_side = "left"
    for batch_size in (1, 4, 9):
        embeddings = model.encode(texts, instruction=INSTRUCTION, batch_size=batch_size)
        torch.testing.assert_close(embeddings, reference, rtol=1e-4, atol=1e-5)


def test_encode_returns_input_order_and_matches_forward(make_encoder, report_texts):
    model = make_encoder()
    texts = sorted(report_texts[:6], key=len)  # length sorting inside encode() must be undone
    embeddings = model.encode(texts, batch_size=2)
    for row, text in enumerate(texts):
        with torch.no_grad():
            single = model(**model.tokenize([text])).pooler_output[0]
        torch.testing.assert_close(embeddings[row], single, rtol=1e-4, atol=1e-5)
    assert model.encode(texts[0]).shape == (model.config.hidden_size,)


def test_instruction_inside_text_equals_instruction_argument(make_encoder, report_texts):
    model = make_encoder()
    separator = model.config.instruction_separator
    joined = model.encode([f"{INSTRUCTION}{separator}{text}" for text in report_texts[:3]])
    separate = model.encode(report_texts[:3], instruction=INSTRUCTION)
    torch.testing.assert_close(joined, separate)
    # The instruction is attended to: it changes the embedding even though it is not pooled.
    assert not torch.allclose(separate, model.encode(report_texts[:3]), atol=1e-6)


@pytest.mark.parametrize(
    ("texts", "kwargs", "match"),
    [
        (["No effusion.", "   "], {}, r"Text 1 has an empty report"),
        ([f"{INSTRUCTION}!@#$%^&*()"], {}, r"Text 0 has an empty report"),
        (["a!@#$%^&*()No effusion."], {"instruction": INSTRUCTION}, r"Text 0 already carries an instruction"),
        ([], {}, r"`texts` is empty"),
    ],
)
def test_bad_texts_are_rejected(make_encoder, texts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_encoder().encode(texts, **kwargs)


def test_long_reports_are_cut_at_their_end_with_a_count(make_encoder, report_texts):
    model = make_encoder(max_seq_length=24)
    texts = [report_texts[0] * 3, "No effusion.", report_texts[1] * 3]
    with pytest.warns(UserWarning, match=r"2 of 3 reports exceeded max_seq_length=24"):
        embeddings = model.encode(texts, instruction=INSTRUCTION)
    batch = model.tokenize(texts, instruction=INSTRUCTION)
    assert batch["attention_mask"].sum(1).tolist()[0] == 24
    instruction_ids = model.tokenizer(INSTRUCTION)["input_ids"]
    assert batch["input_ids"][0, : len(instruction_ids)].tolist() == instruction_ids
    assert torch.isfinite(embeddings).all()
    with pytest.raises(ValueError, match="the instruction alone fills"):
        model.encode(["No effusion."], instruction=INSTRUCTION * 10)


@pytest.mark.parametrize("pooling_mode", ["mean", "latent_attention"])
def test_gradients_reach_backbone_and_pooling(make_encoder, report_texts, pooling_mode):
    model = make_encoder(pooling_mode=pooling_mode).train()
    batch = model.tokenize(report_texts[:4], instruction=INSTRUCTION)
    embeddings = F.normalize(model(**batch).pooler_output, dim=-1)
    loss = F.cross_entropy(embeddings @ embeddings.T * 20, torch.arange(4))
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert grads["model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0
    assert grads["model.embed_tokens.weight"].abs().sum() > 0
    if pooling_mode == "latent_attention":
        assert grads["latent_attn.latents"].abs().sum() > 0
        assert grads["latent_attn.mlp.2.weight"].abs().sum() > 0


def test_normalize_embeddings_config(make_encoder, report_texts):
    model = make_encoder(normalize_embeddings=True)
    norms = model.encode(report_texts[:3]).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(3))


def test_save_load_round_trip_with_tokenizer(make_encoder, report_texts, tmp_path):
    model = make_encoder(pooling_mode="latent_attention")
    model.save_pretrained(tmp_path)
    loaded = LLM2Vec4CXRModel.from_pretrained(tmp_path)
    assert loaded.tokenizer is not None
    torch.testing.assert_close(loaded.encode(report_texts[:4]), model.encode(report_texts[:4]), rtol=0, atol=0)


def test_missing_tokenizer_is_a_clear_error(make_encoder, tmp_path):
    model = make_encoder()
    model.set_tokenizer(None)
    model.save_pretrained(tmp_path)
    loaded = LLM2Vec4CXRModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no tokenizer"):
        loaded.encode(["No effusion."])


def _edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_pooling_weights_raise_naming_keys(make_encoder, tmp_path):
    make_encoder(pooling_mode="mean").save_pretrained(tmp_path)
    _edit_config(tmp_path, lambda config: config.update(pooling_mode="latent_attention"))
    with pytest.raises(CheckpointMismatchError, match=r"missing_keys: latent_attn\.latents"):
        LLM2Vec4CXRModel.from_pretrained(tmp_path)


def test_unexpected_pooling_weights_raise_naming_keys(make_encoder, tmp_path):
    # The published checkpoint's trap: latent-attention weights read with mean pooling.
    make_encoder(pooling_mode="latent_attention").save_pretrained(tmp_path)
    _edit_config(tmp_path, lambda config: config.update(pooling_mode="mean"))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected_keys: latent_attn\."):
        LLM2Vec4CXRModel.from_pretrained(tmp_path)


def test_wrong_hidden_size_raises_naming_keys(make_encoder, tmp_path):
    make_encoder().save_pretrained(tmp_path)

    def widen(config):
        config["backbone_config"].update(hidden_size=128, head_dim=32)

    _edit_config(tmp_path, widen)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"mismatched_keys: model\.embed_tokens\.weight \(checkpoint \(\d+, 64\) vs model \(\d+, 128\)\)",
    ):
        LLM2Vec4CXRModel.from_pretrained(tmp_path)


def test_slow_tokenizer_and_mangled_separator_are_rejected(make_encoder, tokenizer):
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast

    model = make_encoder()
    backend = tokenizer.backend_tokenizer.__class__.from_str(tokenizer.backend_tokenizer.to_str())
    backend.normalizer = normalizers.Replace("!", "")
    bad = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>")
    with pytest.raises(ValueError, match=r"does not survive the tokenizer round trip"):
        model.set_tokenizer(bad)

    class SlowTokenizer:
        is_fast = False

    with pytest.raises(TypeError, match="needs a fast tokenizer"):
        model.set_tokenizer(SlowTokenizer())
