import json

import pytest

from ..shared_data import import_recipe, needs_openi


def test_the_recorded_command_names_every_training_flag_that_differs_from_its_default():
    make_default = import_recipe("make_default_text_encoder")
    args = make_default.build_parser().parse_args([
        "--output-dir", "runs/x", "--held-out-fraction", "0.2", "--hidden-size", "384", "--contrastive-minutes", "4.0",
        "--half-precision-weights", "--skip-evaluation", "--resume",
    ])
    assert make_default.recipe_command(args) == (
        "python training/make_default_text_encoder.py --contrastive-minutes 4.0 --hidden-size 384 "
        "--half-precision-weights --held-out-fraction 0.2"
    )  # where the run goes and how it is driven (output, resume, evaluation) do not change the model
    defaults = make_default.build_parser().parse_args([])
    assert make_default.recipe_command(defaults) == "python training/make_default_text_encoder.py"
    assert make_default.backbone_kwargs(args) == {
        "hidden_size": 384, "num_layers": 4, "num_heads": 6, "num_kv_heads": 6, "intermediate_size": 1152,
        "max_position_embeddings": 512,
    }


def test_dataloader_workers_stay_alive_across_epochs_and_the_flags_parse_as_training_arguments():
    from transformers import TrainingArguments

    from llm2clip4cxr.training.recipe import parse_recipe_arguments

    make_default = import_recipe("make_default_text_encoder")
    train_text_encoder = import_recipe("train_text_encoder")
    for workers, persistent in ((0, False), (2, True)):
        args = make_default.build_parser().parse_args(["--dataloader-workers", str(workers)])
        flags = make_default.common_stage_flags(args, "reports.csv")
        _, training_args = parse_recipe_arguments(train_text_encoder.RecipeArguments, [
            "--stage", "mntp", "--model_name_or_path", "m", "--output_dir", "out", *flags,
        ])
        assert isinstance(training_args, TrainingArguments)
        assert training_args.dataloader_num_workers == workers
        # The round-robin epoch is ~20 steps: restarting the workers each epoch held a GPU run up.
        assert training_args.dataloader_persistent_workers is persistent


def test_a_backbone_width_that_is_no_multiple_of_the_head_size_is_refused_in_one_line(capsys):
    make_default = import_recipe("make_default_text_encoder")
    with pytest.raises(SystemExit) as exit_info:
        make_default.main(["--hidden-size", "100"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: --hidden-size must be a multiple of 64 (attention heads of 64 dimensions), got 100."
    )


@needs_openi
def test_a_sweep_trains_twin_and_final_of_each_variant_and_chooses_on_development_studies(tmp_path):
    sweep = import_recipe("sweep_default_text_encoder")
    tiny = ("--mntp-steps 2 --contrastive-steps 2 --batch-size 8 --mntp-batch-size 4 --synthetic-triplets 20 "
            "--variants-per-report 1 --hidden-size 64 --num-layers 1")
    assert sweep.main(["--output-dir", str(tmp_path), "--variant", "tiny", tiny, "--common", "--save-steps 1000"]) == 0
    results = json.loads((tmp_path / "sweep.json").read_text())
    assert results["chosen"] == "tiny"
    variant = results["variants"]["tiny"]
    assert variant["twin"]["exit_code"] == variant["final"]["exit_code"] == 0
    assert "--held-out-fraction 0.2" in variant["twin"]["training"]["command"]
    assert "--held-out-fraction" not in variant["final"]["training"]["command"]  # the default 0.1: the shippable one
    assert variant["final"]["training"]["backbone"]["hidden_size"] == 64
    development = variant["development"]
    assert development["queries"] > 200  # the twin's hold-out minus the reported split
    assert development["criterion"] == (development["strict_recall@1"] + development["unique_recall@1"]
                                        + development["ordering_accuracy"]) / 3
