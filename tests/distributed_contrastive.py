"""Run under `accelerate launch --cpu --num_processes 2`: each rank computes the gathered contrastive
loss on its half of a fixed batch through DDP; rank 0 saves the mean loss and the (DDP-averaged)
gradients for tests/test_text_training.py to compare with one process on the whole batch."""

import json
import sys
from types import SimpleNamespace

import torch
from accelerate import Accelerator

from llm2clip4cxr import LLM2Vec4CXRModel
from llm2clip4cxr.text_training import ContrastiveCollator, ContrastiveTrainer


def main(model_dir, rows_file, out_file):
    accelerator = Accelerator(cpu=True)
    model = LLM2Vec4CXRModel.from_pretrained(model_dir).train()
    rows = json.load(open(rows_file))
    per_rank = len(rows) // accelerator.num_processes
    local = rows[accelerator.process_index * per_rank : (accelerator.process_index + 1) * per_rank]
    batch = ContrastiveCollator(model, instruction="Find similar reports")(local)
    ddp_model = accelerator.prepare(model)
    loss = ContrastiveTrainer.compute_loss(SimpleNamespace(scale=20.0, gather_across_processes=True), ddp_model, batch)
    accelerator.backward(loss)
    mean_loss = accelerator.reduce(loss.detach(), reduction="mean")
    if accelerator.is_main_process:
        grads = {name: p.grad.clone() for name, p in accelerator.unwrap_model(ddp_model).named_parameters() if p.grad is not None}
        torch.save({"loss": mean_loss, "grads": grads, "world_size": accelerator.num_processes}, out_file)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
