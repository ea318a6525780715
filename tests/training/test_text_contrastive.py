"""The contrastive stage on sentence-transformers: length-bucketed forward, GradCache equivalence, recipe."""

import subprocess
import sys

import pytest
import torch

from llm2clip4cxr.augment.triplets import build_section_pairs
from llm2clip4cxr.training.text import contrastive_loss, sentence_transformer_for

from ..shared_data import OPENI_REPORTS as REPORTS_CSV
from ..shared_data import ROOT, import_recipe, needs_openi

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


def _reference_equivalence_loss(anchors, positives, negatives, groups, symmetric, scale=20.0):
    """Row by row: an anchor's softmax runs over its own positive, the positives of rows outside its group (all
    rows when it has none, group -1) and every hard negative; `symmetric` averages in the positive->anchor one."""
    cosine = torch.nn.functional.cosine_similarity
    losses = []
    for i in range(len(anchors)):
        others = [j for j in range(len(anchors)) if j == i or groups[i] < 0 or groups[j] != groups[i]]
        forward = [cosine(anchors[i], positives[j], dim=0) for j in others]
        forward += [cosine(anchors[i], negative, dim=0) for negative in negatives]
        log_z = torch.logsumexp(torch.stack(forward) * scale, 0)
        if symmetric:
            backward = torch.stack([cosine(positives[i], anchors[j], dim=0) for j in others]) * scale
            log_z = (log_z + torch.logsumexp(backward, 0)) / 2
        losses.append(log_z - cosine(anchors[i], positives[i], dim=0) * scale)
    return torch.stack(losses).mean()


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("with_negatives", [False, True])
def test_equivalence_aware_loss_matches_row_by_row_reference_and_its_gradients(make_encoder, symmetric,
                                                                                with_negatives):
    st_model = sentence_transformer_for(make_encoder())
    loss_fn = contrastive_loss(st_model, batch_size=8, symmetric=symmetric, gather_across_devices=False,
                               equivalence_groups=True)
    assert type(loss_fn).__name__ == "EquivalenceAwareRankingLoss"
    generator = torch.Generator().manual_seed(0)
    columns = [torch.randn(8, 16, generator=generator, requires_grad=True) for _ in range(3 if with_negatives else 2)]
    groups = torch.tensor([0, 0, 0, 1, 1, -1, -1, 2])  # a group of three, one of two, no group, a singleton
    loss = loss_fn.compute_loss_from_embeddings(columns, groups)
    gradients = torch.autograd.grad(loss, columns)
    negatives = columns[2] if with_negatives else []
    reference = _reference_equivalence_loss(columns[0], columns[1], negatives, groups.tolist(), symmetric)
    reference_gradients = torch.autograd.grad(reference, columns)
    torch.testing.assert_close(loss, reference, atol=ATOL, rtol=RTOL)
    for gradient, expected in zip(gradients, reference_gradients):
        torch.testing.assert_close(gradient, expected, atol=1e-5, rtol=1e-4)
    # Without shared groups the mask is empty: sentence-transformers' own loss, exactly.
    plain = contrastive_loss(st_model, batch_size=8, symmetric=symmetric, gather_across_devices=False)
    torch.testing.assert_close(loss_fn.compute_loss_from_embeddings(columns, torch.arange(8)),
                               plain.compute_loss_from_embeddings(columns, None))
    assert loss < plain.compute_loss_from_embeddings(columns, None)  # fewer negatives, lower loss


def test_equivalence_aware_loss_refuses_gradcache_and_missing_groups(make_encoder):
    st_model = sentence_transformer_for(make_encoder())
    with pytest.raises(ValueError, match="not available with GradCache"):
        contrastive_loss(st_model, batch_size=8, mini_batch_size=2, equivalence_groups=True)
    loss_fn = contrastive_loss(st_model, batch_size=8, gather_across_devices=False, equivalence_groups=True)
    with pytest.raises(ValueError, match="group id in a `label` column"):
        loss_fn.compute_loss_from_embeddings([torch.randn(2, 4), torch.randn(2, 4)], None)


def test_equivalent_study_pairs_join_different_studies_with_the_same_label_set():
    from llm2clip4cxr.augment.triplets import build_equivalent_study_pairs

    rows = [
        {"MeSH": "normal", "findings": "Lungs clear.", "impression": "No acute disease."},
        {"MeSH": "Normal", "findings": "Clear lungs, normal heart.", "impression": "No active disease."},
        {"MeSH": "normal", "findings": "Lungs  clear.", "impression": ""},  # same findings as the first
        {"MeSH": "Cardiomegaly/mild;Opacity", "findings": "Mild cardiomegaly. Opacity.", "impression": "Big heart."},
        {"MeSH": "Opacity; Cardiomegaly/mild", "findings": "Heart mildly enlarged, basilar opacity.",
         "impression": "Cardiomegaly, opacity."},
        {"MeSH": "Cardiomegaly", "findings": "Enlarged heart.", "impression": "Cardiomegaly."},  # alone in its set
        {"MeSH": "No Indexing", "findings": "Lungs clear.", "impression": "Unremarkable."},
        {"MeSH": "", "findings": "Lungs clear.", "impression": "Clear."},
    ]
    pairs = build_equivalent_study_pairs(rows, seed=1)
    normal_group = {pair["label"] for pair in pairs if pair["anchor"] == "No acute disease."
                    or pair["positive"] == "No acute disease."}
    assert len(normal_group) == 1
    # Texts equal up to spacing are one text: the third study's findings pair no second time.
    as_sets = {frozenset(" ".join(text.split()) for text in (pair["anchor"], pair["positive"])) for pair in pairs}
    assert len(as_sets) == len(pairs)
    assert as_sets == {
        frozenset(("Clear lungs, normal heart.", "Lungs clear.")),
        frozenset(("No acute disease.", "No active disease.")),
        frozenset(("Mild cardiomegaly. Opacity.", "Heart mildly enlarged, basilar opacity.")),
        frozenset(("Big heart.", "Cardiomegaly, opacity.")),
    }
    labels = {frozenset((pair["anchor"], pair["positive"])): pair["label"] for pair in pairs}
    assert all(type(label) is int for label in labels.values())
    assert labels[frozenset(("Big heart.", "Cardiomegaly, opacity."))] != normal_group.pop()
    with pytest.raises(ValueError, match="no 'Problems' column"):
        build_equivalent_study_pairs(rows, label_column="Problems")


@needs_openi
def test_recipe_trains_on_equivalent_studies_with_their_label_groups(saved_tiny_encoder, tmp_path):
    # Round robin visits every dataset in the first steps; the equivalence loss raises without its labels.
    train_text_encoder = import_recipe("train_text_encoder")
    args = train_text_encoder.RecipeArguments(stage="contrastive", model_name_or_path=str(saved_tiny_encoder),
                                              reports=str(REPORTS_CSV), equivalent_studies=True)
    train, _ = train_text_encoder.build_datasets(args, seed=0)
    assert train["equivalent"].column_names == ["anchor", "positive", "label"]
    assert len(set(train["equivalent"]["label"])) > 20
    final = train_text_encoder.main([
        "--stage", "contrastive", "--model_name_or_path", str(saved_tiny_encoder), "--reports", str(REPORTS_CSV),
        "--validation_fraction", "0.5", "--output_dir", str(tmp_path / "run"), "--max_steps", "3",
        "--per_device_train_batch_size", "16", "--report_to", "none", "--save_strategy", "no",
        "--disable_tqdm", "true", "--use_cpu", "true", "--equivalent_studies", "true", "--section_pairs", "false",
        "--batch_sampler", "no_duplicates", "--multi_dataset_batch_sampler", "round_robin",
    ])
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file() and final


def test_recipe_reports_bad_input_in_one_line_and_exit_status_1(saved_tiny_encoder, tmp_path):
    reports = tmp_path / "reports.csv"
    reports.write_text("uid,findings,impression\n1,Lungs clear.,No acute disease.\n2,Left effusion.,Effusion.\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "training" / "train_text_encoder.py"), "--stage", "contrastive",
         "--model_name_or_path", str(saved_tiny_encoder), "--reports", str(reports), "--equivalent_studies", "true",
         "--output_dir", str(tmp_path / "run"), "--use_cpu", "true", "--report_to", "none"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: reports[0] has no 'MeSH' column to group equivalent studies by; its keys are "
        "['findings', 'impression', 'uid']."
    )
    assert "Traceback" not in result.stderr


def test_split_seed_keeps_the_held_out_studies_when_the_training_seed_changes(saved_tiny_encoder, tmp_path):
    # Runs of several training seeds are only comparable on the same held-out studies.
    train_text_encoder = import_recipe("train_text_encoder")
    reports = tmp_path / "reports.csv"
    reports.write_text("uid,findings,impression\n" + "".join(
        f"{i},Finding number {i}.,Impression number {i}.\n" for i in range(60)
    ))

    def held_out(seed, split_seed=None):
        args = train_text_encoder.RecipeArguments(stage="mntp", model_name_or_path=str(saved_tiny_encoder),
                                                  reports=str(reports), validation_fraction=0.2,
                                                  split_seed=split_seed)
        _, validation = train_text_encoder.build_datasets(args, seed=seed)
        return sorted(validation["text"])

    assert held_out(1, split_seed=0) == held_out(2, split_seed=0) == held_out(0)
    assert held_out(1) != held_out(2)  # without it, the seed also moves the split (the recipe's old behaviour)
    assert len(held_out(1, split_seed=0)) == 12
