import json
import random

import numpy as np
import pytest

from llm2clip4cxr.evaluation.harness import run_evaluation, write_results
from llm2clip4cxr.evaluation.report_tasks import (
    Scorer,
    bm25_scorer,
    error_discrimination,
    findings_to_impression_retrieval,
    paraphrase_retrieval,
    parse_problems,
    score_matrix,
    zero_shot_label_auroc,
)
from llm2clip4cxr.report_variants import make_positive

from .test_report_tasks import lookup_encoder


def bag_of_words_encoder(texts):
    """A deterministic lexical mock: hashed, L2-normalised word counts."""
    vectors = np.zeros((len(texts), 64), dtype=np.float32)
    for i, text in enumerate(texts):
        for word in text.lower().replace(".", " ").split():
            vectors[i, sum(map(ord, word)) % 64] += 1
    return vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)


def test_paraphrase_retrieval_with_exact_ranks():
    reports = {"a": "No pleural effusion. Heart size normal.", "b": "Cardiomegaly.", "c": "No pneumothorax. Lungs clear."}
    queries = {uid: make_positive(text, random.Random(f"7:{uid}")) for uid, text in reports.items()}
    # "Cardiomegaly." has one sentence and no abbreviation: no paraphrase, so no query (still in the corpus).
    assert queries["b"] is None and queries["a"] and queries["c"]
    vectors = {reports["a"]: [1, 0], reports["b"]: [0, 1], reports["c"]: [0.6, 0.8],
               queries["a"][0]: [0, 1], queries["c"][0]: [0.6, 0.8]}
    result = paraphrase_retrieval(lookup_encoder(vectors), reports, seed=7)
    # a's paraphrase scores (0, 1, .8): its original is 3rd; c's scores (.6, .8, 1): 1st.
    assert result["num_queries"] == 2 and result["num_corpus"] == 3
    assert result["recall@1"] == pytest.approx(0.5)
    assert result["mrr"] == pytest.approx((1 / 3 + 1) / 2)


def test_paraphrase_retrieval_rejects_empty_reports():
    with pytest.raises(ValueError, match="'1' is empty"):
        paraphrase_retrieval(bag_of_words_encoder, ["No effusion.", " "])


def test_zero_shot_label_auroc_exact_values_and_fixed_rule():
    prompts = {"Effusion": "effusion prompt", "Cardiomegaly": "cardiomegaly prompt"}
    vectors = {
        "effusion prompt": [1, 0, 0], "cardiomegaly prompt": [0, 1, 0], "normal prompt": [0, 0, 1],
        "r1": [0.8, 0.0, 0.6], "r2": [0.6, 0.0, 0.8], "r3": [0.0, 0.6, 0.8], "r4": [0.0, 0.0, 1.0],
    }
    reports = {uid: uid for uid in ("r1", "r2", "r3", "r4")}
    labels = {"r1": {"Effusion"}, "r2": {"Effusion"}, "r3": {"Effusion", "Cardiomegaly"}}
    result = zero_shot_label_auroc(lookup_encoder(vectors), reports, labels, prompts, normal_prompt="normal prompt")
    effusion, cardiomegaly = result["per_label"]["Effusion"], result["per_label"]["Cardiomegaly"]
    # Effusion scores (.8, .6, 0, 0) with truth (1, 1, 1, 0): r3 ties r4 -> AUROC (1 + 1 + .5) / 3.
    assert effusion["auroc"] == pytest.approx(2.5 / 3)
    # The rule "beats the normal prompt" predicts only r1 (.8 > .6): precision 1, recall 1/3 -> F1 .5.
    assert effusion["f1"] == pytest.approx(0.5)
    # Cardiomegaly (0, 0, .6, 0), truth only r3: AUROC 1; .6 < .8, so nothing predicted: F1 0.
    assert cardiomegaly == {"auroc": 1.0, "f1": 0.0, "num_positive": 1}
    assert result["macro_auroc"] == pytest.approx((2.5 / 3 + 1) / 2)
    assert result["macro_f1"] == pytest.approx(0.25)
    assert result["skipped_labels"] == []


def test_zero_shot_skips_labels_without_both_classes():
    result = zero_shot_label_auroc(
        bag_of_words_encoder, {"1": "effusion", "2": "clear"}, {"1": {"Effusion"}},
        {"Effusion": "effusion", "Nodule": "nodule"},
    )
    assert result["skipped_labels"] == ["Nodule"] and result["num_labels"] == 1
    with pytest.raises(ValueError, match="No label"):
        zero_shot_label_auroc(bag_of_words_encoder, {"1": "a", "2": "b"}, {}, {"Nodule": "nodule"})
    assert parse_problems("normal") == set() and parse_problems("Opacity;Opacity; Nodule") == {"Opacity", "Nodule"}


def test_bm25_is_a_scorer_and_ranks_lexical_matches_first():
    bm25 = bm25_scorer()
    assert isinstance(bm25, Scorer) and not isinstance(bag_of_words_encoder, Scorer)
    corpus = ["small left pleural effusion", "no pneumothorax", "large right effusion", "heart size normal"]
    scores = score_matrix(bm25, ["pleural effusion", "pneumothorax", "zzz", ""], corpus)
    assert scores.shape == (4, 4)
    assert scores[0].argmax() == 0 and scores[0, 2] > 0 == scores[0, 1]  # "effusion" also in doc 2, rarer "pleural" wins
    assert scores[1].argmax() == 1
    assert not scores[2:].any()  # unknown words and empty queries score 0
    studies = [{"uid": str(i), "findings": text, "impression": text} for i, text in enumerate(corpus)]
    assert findings_to_impression_retrieval(bm25, studies)["recall@1"] == 1.0
    # Scorer path of error discrimination: the positive shares more words with the anchor.
    triplet = {"anchor": "small left effusion", "positive": "small left pleural effusion", "negative": "large right pneumothorax"}
    assert error_discrimination(bm25, [triplet])["accuracy"] == 1.0


ROWS = [
    {"uid": str(i), "findings": findings, "impression": impression, "Problems": problems}
    for i, (findings, impression, problems) in enumerate([
        ("Small left pleural effusion. Heart size normal.", "Left effusion.", "Pleural Effusion"),
        ("The heart is enlarged. No pneumothorax.", "Cardiomegaly.", "Cardiomegaly"),
        ("Lungs are clear. No effusion.", "No acute disease.", "normal"),
        ("Large right pleural effusion. Mild cardiomegaly.", "Right effusion, cardiomegaly.", "Pleural Effusion;Cardiomegaly"),
        ("No focal consolidation. No pneumothorax.", "No acute disease.", "normal"),
        ("Right upper lobe opacity. No pleural effusion.", "Pneumonia.", "Opacity"),
    ])
]


def test_harness_writes_three_files_deterministically(tmp_path):
    models = {"bow": bag_of_words_encoder, "bm25": bm25_scorer()}
    first = run_evaluation(models, ROWS, seed=3)
    again = run_evaluation(models, ROWS, seed=3)
    assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)
    assert set(first["models"]["bm25"]) == {"findings_to_impression", "paraphrase", "error_discrimination", "zero_shot_labels"}
    paths = write_results(first, tmp_path / "a")
    write_results(again, tmp_path / "b")
    for name in ("results.json", "results.md", "recall.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert json.loads(paths["results.json"].read_text()) == json.loads(json.dumps(first))
    table = paths["results.md"].read_text().splitlines()
    assert table[0].startswith("| model | F→I R@1") and table[2].startswith("| bow | ") and table[3].startswith("| bm25 | ")
    assert paths["recall.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "a").glob(".*.tmp"))  # temp files were renamed away


def test_harness_validates_tasks_and_columns():
    with pytest.raises(ValueError, match="subset of"):
        run_evaluation({"bow": bag_of_words_encoder}, ROWS, tasks=["frobnicate"])
    no_labels = [{key: value for key, value in row.items() if key != "Problems"} for row in ROWS]
    with pytest.raises(ValueError, match="`Problems` column"):
        run_evaluation({"bow": bag_of_words_encoder}, no_labels)
    only_retrieval = run_evaluation({"bow": bag_of_words_encoder}, no_labels, tasks=["findings_to_impression"])
    assert list(only_retrieval["models"]["bow"]) == ["findings_to_impression"]
