import json

import pytest

from llm2clip4cxr.data import split_by_study

from ..shared_data import import_recipe, needs_openi


def test_development_studies_are_outside_the_reported_split_and_the_twins_training():
    tune_fusion = import_recipe("tune_fusion")
    rows = [{"uid": str(i), "findings": f"f{i}", "impression": f"i{i}"} for i in range(1000)]
    development = {row["uid"] for row in tune_fusion.development_studies(rows, 0.2)}
    reported = {row["uid"] for row in split_by_study(rows, 0.1, 0)[1]}
    twin_training = {row["uid"] for row in split_by_study(rows, 0.2, 0)[0]}
    assert len(development) == 100
    assert not development & reported and not development & twin_training
    with pytest.raises(ValueError, match="must contain"):
        tune_fusion.development_studies(rows, 0.05)  # a smaller twin hold-out cannot contain the reported one


@needs_openi
def test_tuning_picks_the_best_grid_row_and_dense_weight_zero_is_bm25(saved_tiny_encoder, tmp_path):
    tune_fusion = import_recipe("tune_fusion")
    results = tune_fusion.main(["--model", str(saved_tiny_encoder), "--output", str(tmp_path / "fusion.json")])
    assert json.loads((tmp_path / "fusion.json").read_text()) == results
    assert results["development_studies"] == 269
    best = max(results["grid"], key=lambda row: (row["objective"], row["strict_mrr"]))
    assert results["chosen"] == {"method": best["method"], "weights": best["weights"]}
    # With the dense weight at 0 both methods rank by BM25 alone (ties included), so they score as BM25 does.
    for row in results["grid"]:
        if row["weights"][0] == 0:
            assert {key: row[key] for key in results["bm25_alone"]} == pytest.approx(results["bm25_alone"])
