import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llm2clip4cxr import LLM2Vec4CXRModel
from llm2clip4cxr.augment.triplets import build_triplets
from llm2clip4cxr.training.recipe import apply_lora, last_complete_checkpoint
from llm2clip4cxr.training.text import (
    mntp_collator,
    mntp_model_for,
    sentence_transformer_for,
    set_attention_dropout,
)

from ..shared_data import OPENI_REPORTS as REPORTS_CSV
from ..shared_data import ROOT as REPO
from ..shared_data import import_recipe, needs_openi
from . import distributed_contrastive

RECIPE = REPO / "training" / "train_text_encoder.py"


def test_mntp_predicts_each_masked_token_from_the_previous_position(make_encoder, report_texts):
    encoder = make_encoder()
    lm = mntp_model_for(encoder)
    assert lm.model is encoder.model  # MNTP trains the encoder's own backbone
    collator = mntp_collator(encoder.tokenizer, mask_probability=0.3, seed=0)
    features = [encoder.tokenizer(text, return_special_tokens_mask=True) for text in report_texts[:4]]
    batch = collator(features)
    masked = batch["labels"] != -100
    assert masked.any()
    assert (batch["input_ids"][masked] != batch["labels"][masked]).float().mean() > 0.5  # mostly replaced
    special = torch.tensor(
        [[int(i in encoder.tokenizer.all_special_ids) for i in row] for row in batch["labels"].clamp(min=0).tolist()]
    )
    assert not (masked & special.bool()).any()
    output = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    logits = output.logits
    rows, positions = masked.nonzero(as_tuple=True)
    # Reference: the label at position i is predicted from the logits at position i - 1.
    keep = positions > 0
    expected = F.cross_entropy(logits[rows[keep], positions[keep] - 1], batch["labels"][rows[keep], positions[keep]])
    torch.testing.assert_close(output.loss, expected, rtol=1e-5, atol=1e-6)


def test_mntp_collator_needs_a_mask_token(make_encoder):
    tokenizer = make_encoder().tokenizer
    tokenizer.mask_token = None
    with pytest.raises(ValueError, match="no mask token"):
        mntp_collator(tokenizer)
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        mntp_collator(tokenizer, mask_token="\u2603\u2603\u2603")
    assert mntp_collator(tokenizer, mask_token="_").tokenizer.mask_token == "_"


def test_lora_merge_equals_adapter_model(make_encoder, report_texts):
    encoder = make_encoder(pooling_mode="latent_attention")
    peft_model = apply_lora(encoder)
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert any("gate_proj" in name for name in trainable) and any("o_proj" in name for name in trainable)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # zero at init: give the adapters an effect to merge
                parameter.normal_(std=0.05)
    peft_model.eval()
    batch = encoder.tokenize(report_texts[:3], instruction="Find similar reports")
    with torch.no_grad():
        with_adapters = peft_model(**batch).pooler_output
        merged = peft_model.merge_and_unload()
        after_merge = merged(**batch).pooler_output
    assert type(merged) is LLM2Vec4CXRModel
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(after_merge, with_adapters, rtol=1e-4, atol=1e-5)


def _triplet_rows(report_texts, n=8):
    return [
        {key: item[key] for key in ("anchor", "positive", "negative")}
        for item in build_triplets(report_texts[:40], seed=0)[:n]
    ]


def test_distributed_loss_and_gradients_equal_one_process(saved_tiny_encoder, report_texts, tmp_path):
    """sentence-transformers' loss with gather_across_devices on 2 gloo processes, each with half the batch,
    DDP-averaged gradients == one process on the whole batch (equal halves, so the mean of the local means is the
    global mean).
    Tolerance 1e-5: the runs differ only in summation order."""
    rows = _triplet_rows(report_texts, 8)
    # Equivalence groups spanning both ranks' halves (rows 0-3, 4-7): the mask needs the gathered groups.
    for row, group in zip(rows, [0, 1, -1, 2, 0, 1, 0, -1]):
        row["group"] = group
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    out = tmp_path / "distributed.pt"
    # `--cpu` makes accelerate start ONE process (several CPU processes need MPI); `--multi_gpu` is its
    # torchrun launcher, and Accelerator(cpu=True) in the script then joins a gloo group on CPU.
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(Path(__file__).with_name("distributed_contrastive.py")),
        str(saved_tiny_encoder),
        str(tmp_path / "rows.json"),
        str(out),
    ]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, timeout=180, capture_output=True)
    distributed = torch.load(out)
    assert distributed["world_size"] == 2

    model = LLM2Vec4CXRModel.from_pretrained(saved_tiny_encoder).train()
    st_model = sentence_transformer_for(model)
    features = [st_model.preprocess([row[role] for row in rows], prompt="Find similar reports")
                for role in ("anchor", "positive", "negative")]
    losses = distributed_contrastive.losses_on(st_model, st_model, features, [row["group"] for row in rows],
                                               len(rows), False)
    sum(losses).backward()
    assert losses[1] < losses[0]  # the groups masked some negatives
    for distributed_loss, loss in zip(distributed["losses"], losses):
        torch.testing.assert_close(distributed_loss, loss.detach(), rtol=1e-5, atol=1e-5)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert distributed["grads"].keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(distributed["grads"][name], grad, rtol=1e-5, atol=1e-5, msg=name)


def _recipe(*args):
    return [sys.executable, str(RECIPE), *args]


@needs_openi
def test_interrupted_run_resumes_to_the_same_final_step(saved_tiny_encoder, tmp_path):
    output_dir = tmp_path / "run"
    args = [
        "--stage", "mntp", "--model_name_or_path", str(saved_tiny_encoder), "--reports", str(REPORTS_CSV),
        "--output_dir", str(output_dir), "--max_steps", "60", "--save_steps", "2", "--save_total_limit", "2",
        "--per_device_train_batch_size", "4", "--report_to", "none", "--logging_steps", "50", "--disable_tqdm", "true",
    ]
    process = subprocess.Popen(_recipe(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while last_complete_checkpoint(output_dir) is None and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = last_complete_checkpoint(output_dir)
    assert interrupted_at is not None and not (output_dir / "model").exists(), "the run was not interrupted mid-way"
    resumed = subprocess.run(_recipe(*args, "--resume", "true"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = json.loads((Path(last_complete_checkpoint(output_dir)) / "trainer_state.json").read_text())
    assert state["global_step"] == 60
    assert int(Path(interrupted_at).name.split("-")[1]) < 60
    assert LLM2Vec4CXRModel.from_pretrained(output_dir / "model").tokenizer is not None


def test_last_complete_checkpoint_skips_a_save_cut_short(tmp_path):
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    (tmp_path / "checkpoint-6" / "trainer_state.json").write_text('{"global_step": 6, "log_hi')  # killed mid-write
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert (tmp_path / "checkpoint-4").exists()
    assert last_complete_checkpoint(tmp_path, remove_incomplete=True) == str(tmp_path / "checkpoint-2")
    assert not (tmp_path / "checkpoint-4").exists() and not (tmp_path / "checkpoint-6").exists()
    shutil.rmtree(tmp_path / "checkpoint-2")
    assert last_complete_checkpoint(tmp_path) is None


@needs_openi
def test_contrastive_recipe_with_lora_writes_a_loadable_merged_encoder(saved_tiny_encoder, tmp_path):
    train_text_encoder = import_recipe("train_text_encoder")
    final = train_text_encoder.main([
        "--stage", "contrastive", "--model_name_or_path", str(saved_tiny_encoder), "--reports", str(REPORTS_CSV),
        "--validation_fraction", "0.9", "--output_dir", str(tmp_path / "run"), "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--lora", "true", "--report_to", "none", "--save_strategy", "no",
        "--instruction", "Find similar reports", "--disable_tqdm", "true",
    ])
    trained = LLM2Vec4CXRModel.from_pretrained(final)
    initial = LLM2Vec4CXRModel.from_pretrained(saved_tiny_encoder)
    changed = [name for name, p in trained.state_dict().items() if not torch.equal(p, initial.state_dict()[name])]
    assert changed and all(name.startswith("model.layers.") for name in changed)  # LoRA targets only


@needs_openi
def test_contrastive_stage_resumes_to_the_weights_of_an_uninterrupted_run(saved_tiny_encoder, tmp_path):
    train_text_encoder = import_recipe("train_text_encoder")

    def run(output_dir, *extra):
        return train_text_encoder.main([
            "--stage", "contrastive", "--model_name_or_path", str(saved_tiny_encoder), "--reports", str(REPORTS_CSV),
            "--validation_fraction", "0.95", "--output_dir", str(output_dir), "--max_steps", "4", "--save_steps", "2",
            "--per_device_train_batch_size", "8", "--report_to", "none", "--disable_tqdm", "true", "--seed", "3",
            "--instruction", "Find similar reports", "--use_cpu", "true", *extra,
        ])

    uninterrupted = LLM2Vec4CXRModel.from_pretrained(run(tmp_path / "whole"))
    run(tmp_path / "cut", "--stop_after_steps", "2")
    assert last_complete_checkpoint(tmp_path / "cut").endswith("checkpoint-2")
    resumed = LLM2Vec4CXRModel.from_pretrained(run(tmp_path / "cut", "--resume", "true"))
    state = json.loads((Path(last_complete_checkpoint(tmp_path / "cut")) / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    for name, weight in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], weight, msg=name)


def test_simcse_views_differ_only_through_dropout(make_encoder, report_texts):
    encoder = make_encoder()
    batch = encoder.tokenize(report_texts[:2])
    encoder.train()
    with torch.no_grad():
        assert torch.equal(encoder(**batch).pooler_output, encoder(**batch).pooler_output)  # no dropout by default
        set_attention_dropout(encoder, 0.1)
        first, second = encoder(**batch).pooler_output, encoder(**batch).pooler_output
        assert not torch.allclose(first, second)
        encoder.eval()
        torch.testing.assert_close(encoder(**batch).pooler_output, encoder(**batch).pooler_output)
    with pytest.raises(ValueError, match="dropout probability"):
        set_attention_dropout(encoder, 1.5)
