"""Training throughput of the contrastive stage on CPU: samples/s of ContrastiveTrainer steps.

One sample is an (anchor, positive, hard negative) triplet built from Open-I reports, so each step
runs 3 x batch-size texts through one forward and backward pass. Reported next to the same steps
with mean and latent-attention pooling, and next to an MNTP step (1 text per sample) as a reference.

    python benchmarks/train_throughput.py [--hidden-size 256] [--layers 4] [--batch-size 32] [--steps 10]
"""

import argparse
import time
from types import SimpleNamespace

import torch
import transformers

from llm2clip4cxr.data import openi_report_texts
from llm2clip4cxr.factory import build_text_encoder
from llm2clip4cxr.report_variants import build_triplets
from llm2clip4cxr.text_training import ContrastiveCollator, ContrastiveTrainer, mntp_collator, mntp_model_for
from llm2clip4cxr.tokenization import train_report_tokenizer


def time_steps(step, batches, warmup: int = 2) -> float:
    """Seconds per step, averaged after `warmup` steps."""
    for batch in batches[:warmup]:
        step(batch)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    return (time.perf_counter() - start) / len(batches[warmup:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()

    texts = openi_report_texts()
    tokenizer = train_report_tokenizer(texts, vocab_size=4096)
    needed = (args.steps + 2) * args.batch_size
    triplets = [{k: t[k] for k in ("anchor", "positive", "negative")} for t in build_triplets(texts[: needed], seed=0)][:needed]
    print(f"{args.threads} threads, Llama-style hidden {args.hidden_size} x {args.layers} layers, batch {args.batch_size}, "
          f"{args.steps} timed steps")
    loss_settings = SimpleNamespace(scale=20.0, gather_across_processes=True)
    for pooling_mode in ("mean", "latent_attention"):
        transformers.set_seed(0)
        model = build_text_encoder(
            tokenizer, pooling_mode=pooling_mode,
            backbone_kwargs={"hidden_size": args.hidden_size, "num_layers": args.layers, "num_heads": 4, "num_kv_heads": 4},
        ).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        collate = ContrastiveCollator(model, instruction="Retrieve reports with the same clinical findings")
        batches = [collate(triplets[i : i + args.batch_size]) for i in range(0, len(triplets), args.batch_size)]

        def contrastive_step(batch):
            loss = ContrastiveTrainer.compute_loss(loss_settings, model, dict(batch))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        seconds = time_steps(contrastive_step, batches)
        print(f"contrastive, {pooling_mode:>16} pooling: {args.batch_size / seconds:7.1f} triplets/s "
              f"({3 * args.batch_size / seconds:7.1f} texts/s, {seconds:.2f} s/step)")
        if pooling_mode == "mean":
            lm = mntp_model_for(model).train()
            mask_collate = mntp_collator(tokenizer, seed=0)
            lm_optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-4)
            mntp_batches = [
                mask_collate([tokenizer(t["anchor"], truncation=True, max_length=512) for t in triplets[i : i + args.batch_size]])
                for i in range(0, len(triplets), args.batch_size)
            ]

            def mntp_step(batch):
                lm(**batch).loss.backward()
                lm_optimizer.step()
                lm_optimizer.zero_grad()

            mntp_seconds = time_steps(mntp_step, mntp_batches)
            print(f"MNTP (reference)                  : {args.batch_size / mntp_seconds:7.1f} reports/s ({mntp_seconds:.2f} s/step)")


if __name__ == "__main__":
    main()
