"""Run under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU): each rank computes
sentence-transformers' MultipleNegativesRankingLoss, gathered across processes, on its half of a fixed
batch through DDP; rank 0 saves the mean loss and the (DDP-averaged) gradients for
tests/training/test_text.py to compare with one process on the whole batch."""

import json
import sys

import torch
from accelerate import Accelerator

from llm2clip4cxr import LLM2Vec4CXRModel
from llm2clip4cxr.training.text import contrastive_loss, sentence_transformer_for


def main(model_dir, rows_file, out_file):
    accelerator = Accelerator(cpu=True)
    encoder = LLM2Vec4CXRModel.from_pretrained(model_dir).train()
    with open(rows_file) as handle:
        rows = json.load(handle)
    per_rank = len(rows) // accelerator.num_processes
    local = rows[accelerator.process_index * per_rank : (accelerator.process_index + 1) * per_rank]
    st_model = sentence_transformer_for(encoder)
    features = [st_model.preprocess([row[role] for row in local], prompt="Find similar reports")
                for role in ("anchor", "positive", "negative")]
    ddp_model = accelerator.prepare(st_model)
    loss_fn = contrastive_loss(st_model, batch_size=per_rank, gather_across_devices=True)
    loss_fn.model = ddp_model  # forward through DDP so that its backward averages the gradients
    loss = loss_fn(features, None)
    accelerator.backward(loss)
    mean_loss = accelerator.reduce(loss.detach(), reduction="mean")
    if accelerator.is_main_process:
        grads = {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}
        torch.save({"loss": mean_loss, "grads": grads, "world_size": accelerator.num_processes}, out_file)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
