"""The contrastive stage on sentence-transformers: length-bucketed forward, GradCache equivalence, recipe."""


import pytest
import torch

from llm2clip4cxr.augment.triplets import build_section_pairs
from llm2clip4cxr.training.text import contrastive_loss, sentence_transformer_for

from ..shared_data import OPENI_REPORTS as REPORTS_CSV
from ..shared_data import import_recipe, needs_openi

# GradCache recomputes each mini-batch in a second forward pass: float32 sums in another order.
ATOL, RTOL = 1e-5, 1e-4


def _features(st_model, texts):
    return st_model.preprocess(texts)


def test_bucketed_forward_equals_one_padded_pass_with_gradients(make_encoder, report_texts):
    texts = sorted(report_texts[:40], key=len)[::3] + [" ".join(report_texts[:12])]  # one long row: heavy padding
    outputs = {}
    for bucket_rows in (4, 1000):
        encoder = make_encoder(instructions={"r": "Find similar reports"}, default_instruction_name="r").train()
        st_model = sentence_transformer_for(encoder, bucket_rows=bucket_rows)
        features = _features(st_model, texts)
        embedding = st_model(features)["sentence_embedding"]
        embedding.pow(2).sum().backward()
        grads = {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}
        outputs[bucket_rows] = (embedding.detach(), grads)
    (bucketed, bucket_grads), (whole, whole_grads) = outputs[4], outputs[1000]
    torch.testing.assert_close(bucketed, whole, atol=ATOL, rtol=RTOL)
    assert bucket_grads.keys() == whole_grads.keys() and len(whole_grads) > 10
    for name in whole_grads:
        torch.testing.assert_close(bucket_grads[name], whole_grads[name], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("symmetric", [False, True])
def test_cached_loss_equals_uncached_loss_and_gradients(make_encoder, report_texts, symmetric):
    rows = [{"anchor": a, "positive": p, "negative": n} for a, p, n in zip(
        report_texts[:12], report_texts[12:24], report_texts[24:36])]
    results = []
    for mini_batch_size in (None, 4):
        encoder = make_encoder().train()
        st_model = sentence_transformer_for(encoder)
        loss_fn = contrastive_loss(st_model, batch_size=12, mini_batch_size=mini_batch_size, symmetric=symmetric,
                                   gather_across_devices=False)
        assert type(loss_fn).__name__ == ("MultipleNegativesRankingLoss" if mini_batch_size is None
                                          else "CachedMultipleNegativesRankingLoss")
        features = [_features(st_model, [row[role] for row in rows]) for role in ("anchor", "positive", "negative")]
        loss = loss_fn(features, None)
        loss.backward()
        results.append(
            (loss.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None})
        )
    (plain_loss, plain_grads), (cached_loss, cached_grads) = results
    torch.testing.assert_close(cached_loss, plain_loss, atol=ATOL, rtol=RTOL)
    assert cached_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(cached_grads[name], plain_grads[name], atol=1e-5, rtol=1e-3)


def test_section_pairs_are_findings_and_impression_of_one_study_once():
    rows = [
        {"findings": "Heart normal. Lungs clear.", "impression": "No acute disease."},
        {"findings": "Heart normal.  Lungs clear.", "impression": "No acute disease."},  # same pair, other spacing
        {"findings": "Small left effusion.", "impression": ""},
        {"findings": "", "impression": "Normal."},
        {"findings": "Left effusion.", "impression": "Left pleural effusion."},
    ]
    assert build_section_pairs(rows) == [
        {"anchor": "Heart normal. Lungs clear.", "positive": "No acute disease."},
        {"anchor": "Left effusion.", "positive": "Left pleural effusion."},
    ]


@needs_openi
def test_recipe_with_mini_batches_ends_with_the_weights_of_the_plain_run(saved_tiny_encoder, tmp_path):
    train_text_encoder = import_recipe("train_text_encoder")
    from llm2clip4cxr import LLM2Vec4CXRModel

    finals = []
    for name, extra in (("plain", []), ("cached", ["--mini_batch_size", "4"])):
        finals.append(train_text_encoder.main([
            "--stage", "contrastive", "--model_name_or_path", str(saved_tiny_encoder), "--reports", str(REPORTS_CSV),
            "--validation_fraction", "0.9", "--output_dir", str(tmp_path / name), "--max_steps", "3",
            "--per_device_train_batch_size", "16", "--report_to", "none", "--save_strategy", "no",
            "--instruction", "Find similar reports", "--disable_tqdm", "true", "--use_cpu", "true",
            "--synthetic_triplets", "40", "--learning_rate", "1e-3", "--seed", "3", *extra,
        ]))
    plain, cached = (LLM2Vec4CXRModel.from_pretrained(path) for path in finals)
    initial = LLM2Vec4CXRModel.from_pretrained(saved_tiny_encoder)
    moved = 0
    for (name, value), cached_value, start in zip(
        plain.state_dict().items(), cached.state_dict().values(), initial.state_dict().values()
    ):
        torch.testing.assert_close(cached_value, value, atol=2e-5, rtol=1e-4, msg=name)
        moved += not torch.equal(value, start)
    assert moved > 10  # the runs really trained
    assert plain.config.default_instruction == "Find similar reports"
