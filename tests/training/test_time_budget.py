import json

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments, get_linear_schedule_with_warmup

from llm2clip4cxr.errors import InputError
from llm2clip4cxr.training.recipe import TrainingTimeBudget

from ..shared_data import OPENI_REPORTS as REPORTS_CSV
from ..shared_data import import_recipe, needs_openi


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_learning_rate_follows_the_budget_spent_and_training_stops_when_it_is_spent(tmp_path):
    clock, peak = FakeClock(), 0.5
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=4, num_training_steps=1_000_000)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1_000_000, warmup_steps=4, report_to="none")
    budget, control = TrainingTimeBudget(minutes=2, clock=clock), TrainerControl()
    budget.on_train_begin(args, TrainerState(), control, lr_scheduler=scheduler)

    rates = []
    for step, seconds in enumerate([0, 1, 2, 3, 30, 60, 90, 119], start=1):
        clock.now = 100.0 + seconds
        optimizer.step()
        scheduler.step()  # what Trainer does after each optimizer step
        rates.append(optimizer.param_groups[0]["lr"])
        budget.on_step_end(args, TrainerState(global_step=step), control)
        assert not control.should_training_stop
    expected = [min(1.0, step / 4) * (1 - seconds / 120) * peak
                for step, seconds in enumerate([0, 1, 2, 3, 30, 60, 90, 119], start=1)]
    torch.testing.assert_close(torch.tensor(rates), torch.tensor(expected))
    clock.now = 100.0 + 120
    budget.on_step_end(args, TrainerState(global_step=9), control)
    assert control.should_training_stop


def test_a_budget_must_be_positive_and_needs_a_step_schedule(tmp_path):
    with pytest.raises(ValueError, match="positive number of minutes"):
        TrainingTimeBudget(minutes=0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=10, report_to="none")
    with pytest.raises(ValueError, match="needs a step schedule"):
        TrainingTimeBudget(minutes=1).on_train_begin(args, TrainerState(), TrainerControl(), lr_scheduler=plateau)


@needs_openi
def test_the_recipe_stops_at_its_time_budget_and_records_the_steps_reached(saved_tiny_encoder, tmp_path):
    train_text_encoder = import_recipe("train_text_encoder")
    args = ["--stage", "mntp", "--model_name_or_path", str(saved_tiny_encoder), "--reports", str(REPORTS_CSV),
            "--output_dir", str(tmp_path / "run"), "--max_steps", "1000000", "--per_device_train_batch_size", "4",
            "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--save_steps", "2",
            "--time_budget_minutes", "0.05"]
    train_text_encoder.main(args)
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert 0 < summary["global_step"] < 1_000_000 and summary["time_budget_minutes"] == 0.05
    assert summary["minutes"] < 1  # it stopped at the budget, not at --max_steps
    # A resumed run would restart the clock with the rate already decayed: refused, with what to do instead.
    with pytest.raises(InputError, match="resume without the budget and with --max_steps"):
        train_text_encoder.main([*args, "--resume", "true"])
