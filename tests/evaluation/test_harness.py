import json
import random

import numpy as np
import pytest

from llm2clip4cxr.augment.variants import make_positive
from llm2clip4cxr.evaluation.baselines import bm25_scorer
from llm2clip4cxr.evaluation.harness import TASKS, run_evaluation, write_results
from llm2clip4cxr.evaluation.tasks import (
    Scorer,
    error_discrimination,
    findings_to_impression_retrieval,
    paraphrase_retrieval,
    parse_problems,
    score_matrix,
    zero_shot_label_auroc,
)

from .test_tasks import lookup_encoder


def bag_of_words_encoder(texts):
    """A deterministic lexical mock: hashed, L2-normalised word counts."""
    vectors = np.zeros((len(texts), 64), dtype=np.float32)
    for i, text in enumerate(texts):
        for word in text.lower().replace(".", " ").split():
            vectors[i, sum(map(ord, word)) % 64] += 1
    return vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)


def test_paraphrase_retrieval_with_exact_ranks():
    reports = {
        "a": "No pleural effusion. Heart size normal.",
        "b": "Lung mass.",
        "c": "No pneumothorax. Lungs clear.",
    }
    queries = {uid: make_positive(text, random.Random(f"7:{uid}")) for uid, text in reports.items()}
    # "Lung mass." has one sentence, no abbreviation and no word long enough for a typo: no paraphrase, so no
    # query (it is still in the corpus).
    assert queries["b"] is None and queries["a"] and queries["c"]
    vectors = {reports["a"]: [1, 0], reports["b"]: [0, 1], reports["c"]: [0.6, 0.8],
               queries["a"][0]: [0, 1], queries["c"][0]: [0.6, 0.8]}
    result = paraphrase_retrieval(lookup_encoder(vectors), reports, seed=7, families="training")
    assert result["families"] == sorted({queries["a"][1], queries["c"][1]})
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
    assert (
        scores[0].argmax() == 0 and scores[0, 2] > 0 == scores[0, 1]
    )  # "effusion" also in doc 2, rarer "pleural" wins
    assert scores[1].argmax() == 1
    assert not scores[2:].any()  # unknown words and empty queries score 0
    studies = [{"uid": str(i), "findings": text, "impression": text} for i, text in enumerate(corpus)]
    assert findings_to_impression_retrieval(bm25, studies)["recall@1"] == 1.0
    # Scorer path of error discrimination: the positive shares more words with the anchor.
    triplet = {
        "anchor": "small left effusion",
        "positive": "small left pleural effusion",
        "negative": "large right pneumothorax",
    }
    assert error_discrimination(bm25, [triplet])["accuracy"] == 1.0


ROWS = [
    {"uid": str(i), "findings": findings, "impression": impression, "Problems": problems}
    for i, (findings, impression, problems) in enumerate(
        [
            ("Small left pleural effusion. Heart size normal.", "Left effusion.", "Pleural Effusion"),
            ("The heart is enlarged. No pneumothorax.", "Cardiomegaly.", "Cardiomegaly"),
            ("Lungs are clear. No effusion.", "No acute disease.", "normal"),
            (
                "Large right pleural effusion. Mild cardiomegaly.",
                "Right effusion, cardiomegaly.",
                "Pleural Effusion;Cardiomegaly",
            ),
            ("No focal consolidation. No pneumothorax.", "No acute disease.", "normal"),
            ("Right upper lobe opacity. No pleural effusion.", "Pneumonia.", "Opacity"),
        ]
    )
]


def test_harness_writes_three_files_deterministically(tmp_path):
    models = {"bow": bag_of_words_encoder, "bm25": bm25_scorer()}
    first = run_evaluation(models, ROWS, seed=3)
    again = run_evaluation(models, ROWS, seed=3)
    assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)
    assert set(first["models"]["bm25"]) == set(TASKS)
    assert (
        "embedding_spread" in first["models"]["bow"]
        and "mean_pairwise_cosine" in first["models"]["bow"]["embedding_spread"]
    )
    assert "mean_pairwise_cosine" not in first["models"]["bm25"]["embedding_spread"]  # BM25 has no embedding space
    families = first["variant_families"]
    assert not set(families["evaluation"]["positive"]) & set(families["training_families_not_used_here"])
    assert not set(families["evaluation"]["negative"]) & set(families["training_families_not_used_here"])
    paths = write_results(first, tmp_path / "a")
    write_results(again, tmp_path / "b")
    for name in ("results.json", "results.md", "recall.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert json.loads(paths["results.json"].read_text()) == json.loads(json.dumps(first))
    table = paths["results.md"].read_text().splitlines()
    assert (
        table[0].startswith("| model | F→I R@1")
        and table[2].startswith("| bow | ")
        and table[3].startswith("| bm25 | ")
    )
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


def test_strict_findings_to_impression_counts_one_unique_target_per_query():
    # Three studies share the impression "No acute disease."; the query of study 2 ranks another study's
    # impression "Cardiomegaly." first. Strict (collapse): 2 unique impressions, rank 2. With every copy kept
    # and counted as relevant the corpus holds 4 impressions, and the ranks of all others change with it.
    studies = [
        {"uid": "0", "findings": "q0", "impression": "No acute disease."},
        {"uid": "1", "findings": "q1", "impression": "No acute disease."},
        {"uid": "2", "findings": "q2", "impression": "No acute disease."},
        {"uid": "3", "findings": "q3", "impression": "Cardiomegaly."},
    ]
    vectors = {"q0": [1, 0], "q1": [1, 0], "q2": [0.6, 0.8], "q3": [0, 1],
               "No acute disease.": [1, 0], "Cardiomegaly.": [0, 1]}
    encoder = lookup_encoder(vectors)
    strict = findings_to_impression_retrieval(encoder, studies)
    lenient = findings_to_impression_retrieval(encoder, studies, duplicate_rule="count_as_relevant")
    assert strict["duplicate_rule"] == "collapse" and strict["num_corpus"] == 2 and lenient["num_corpus"] == 4
    assert strict["recall@1"] == pytest.approx(0.75) == lenient["recall@1"]
    assert strict["mean_rank"] == pytest.approx(1.25) and lenient["mean_rank"] == pytest.approx(1.25)
    # Only study 3's impression is its own: the subset of queries with unique impressions is that one.
    assert strict["unique_impressions"]["num_queries"] == 1 and strict["unique_impressions"]["recall@1"] == 1.0
    result = run_evaluation({"lookup": encoder}, studies, tasks=["findings_to_impression"])
    task = result["models"]["lookup"]["findings_to_impression"]
    assert task["recall@1"] == strict["recall@1"] and task["count_as_relevant"]["mrr"] == pytest.approx(lenient["mrr"])


def test_paraphrase_task_uses_held_out_families_by_default():
    from llm2clip4cxr.evaluation.heldout_variants import HELDOUT_POSITIVE_FAMILIES

    reports = {row["uid"]: row["findings"] + " " + row["impression"] for row in ROWS}
    result = paraphrase_retrieval(bag_of_words_encoder, reports, seed=0)
    assert result["num_queries"] > 0 and set(result["families"]) <= set(HELDOUT_POSITIVE_FAMILIES)
    with pytest.raises(ValueError, match="'heldout' or 'training'"):
        paraphrase_retrieval(bag_of_words_encoder, reports, families="mine")


def test_clinical_ordering_accuracy_per_category(tmp_path):
    from llm2clip4cxr.evaluation.tasks import clinical_ordering, load_clinical_ordering_suite

    suite_file = tmp_path / "suite.jsonl"
    suite_file.write_text(
        '{"category": "laterality", "query": "q", "equivalent": "e1", "different": "d1"}\n\n'
        '{"category": "laterality", "query": "q", "equivalent": "e2", "different": "d2", "note": "x"}\n'
        '{"category": "negation", "query": "q", "equivalent": "e3", "different": "d3"}\n'
    )
    suite = load_clinical_ordering_suite(suite_file)
    vectors = {"q": [1, 0], "e1": [1, 0], "d1": [0, 1], "e2": [0, 1], "d2": [1, 0], "e3": [0.6, 0.8], "d3": [0.6, 0.8]}
    result = clinical_ordering(lookup_encoder(vectors), suite)
    assert result["accuracy"] == pytest.approx(1 / 3)  # the tie of e3/d3 is a failure
    assert result["per_category"] == {"laterality": {"accuracy": 0.5, "num_triplets": 2},
                                      "negation": {"accuracy": 0.0, "num_triplets": 1}}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"category": "x", "query": "q", "equivalent": "e"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 1: 'different' must be a non-empty string"):
        load_clinical_ordering_suite(bad)
    bad.write_text('{"category": "x", "query": "q",\n')
    with pytest.raises(ValueError, match=r"line 1: not valid JSON"):
        load_clinical_ordering_suite(bad)


def test_the_shipped_clinical_ordering_suite_covers_every_category():
    from llm2clip4cxr.evaluation.tasks import load_clinical_ordering_suite

    suite = load_clinical_ordering_suite()
    counts = {}
    for row in suite:
        counts[row["category"]] = counts.get(row["category"], 0) + 1
        assert len({row["query"], row["equivalent"], row["different"]}) == 3
    assert len(suite) >= 150
    assert set(counts) == {"normal_paraphrase", "negation", "laterality", "severity_size", "change_over_time",
                           "devices_lines"}
    assert min(counts.values()) >= 25


def test_embedding_spread_sees_a_collapsed_space():
    collapsed = lambda texts: np.ones((len(texts), 4), dtype=np.float32) / 2  # noqa: E731
    reports = [row["findings"] for row in ROWS]
    spread = __import__("llm2clip4cxr.evaluation.tasks", fromlist=["x"]).embedding_spread
    result = spread(collapsed, reports, ROWS)
    assert result["mean_pairwise_cosine"] == pytest.approx(1.0) and result["mean_top1_minus_median"] == 0.0
    assert spread(bag_of_words_encoder, reports, ROWS)["mean_pairwise_cosine"] < 0.5


def test_evaluate_module_loads_offline_and_equals_the_harness():
    import evaluate

    from llm2clip4cxr.evaluation import ranking_metrics, report_retrieval_metric_path, retrieval_metrics

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(30, 50))
    query_ids, corpus_ids = [f"q{i}" for i in range(30)], [f"c{j}" for j in range(50)]
    relevant = {q: {corpus_ids[i], corpus_ids[(7 * i) % 50]} for i, q in enumerate(query_ids)}
    metric = evaluate.load(str(report_retrieval_metric_path()))
    rankings = [[corpus_ids[j] for j in np.argsort(-row)] for row in scores]
    computed = metric.compute(predictions=rankings, references=[sorted(relevant[q]) for q in query_ids], ks=[1, 5, 10])
    expected = retrieval_metrics(scores, query_ids, corpus_ids, relevant)
    for key in ("recall@1", "recall@5", "recall@10", "mrr"):
        assert computed[key] == pytest.approx(expected[key])
    truncated = {q: ranked[:10] for q, ranked in zip(query_ids, rankings)}
    computed_top10 = metric.compute(
        predictions=list(truncated.values()), references=[sorted(relevant[q]) for q in query_ids]
    )
    assert computed_top10["recall@10"] == pytest.approx(ranking_metrics(truncated, relevant)["recall@10"])
