"""Run under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU): each rank computes
sentence-transformers' MultipleNegativesRankingLoss, gathered across processes, on its half of a fixed
batch through DDP, and the equivalence-aware loss on the same embeddings (each row's `group`, gathered too); rank 0
saves the mean losses and the (DDP-averaged) gradients of their sum for tests/training/test_text.py to compare
with one process on the whole batch."""

import json
import sys

import torch
from accelerate import Accelerator

from llm2clip4cxr import LLM2Vec4CXRModel
from llm2clip4cxr.training.text import contrastive_loss, sentence_transformer_for


def losses_on(model, loss_model, features, groups, batch_size, gather):
    """(plain loss, equivalence-aware loss) of one forward of every column through `model`."""
    from sentence_transformers.base.losses.merged_forward import embed_columns

    embeddings = embed_columns(model, features)
    plain = contrastive_loss(loss_model, batch_size=batch_size, gather_across_devices=gather)
    equivalence = contrastive_loss(loss_model, batch_size=batch_size, gather_across_devices=gather,
                                   equivalence_groups=True)
    return (plain.compute_loss_from_embeddings(embeddings, None),
            equivalence.compute_loss_from_embeddings(embeddings, torch.tensor(groups)))


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
    # Forward through DDP so that its backward averages the gradients.
    plain, equivalence = losses_on(ddp_model, st_model, features, [row["group"] for row in local], per_rank, True)
    accelerator.backward(plain + equivalence)
    mean_losses = [accelerator.reduce(loss.detach(), reduction="mean") for loss in (plain, equivalence)]
    if accelerator.is_main_process:
        grads = {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}
        torch.save({"losses": mean_losses, "grads": grads, "world_size": accelerator.num_processes}, out_file)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
