"""Training throughput of the contrastive stage on CPU: triplets/s of sentence-transformers loss steps.

One sample is an (anchor, positive, hard negative) triplet built from Open-I reports, so each step
runs 3 x batch-size texts forward and backward. Rows, all in the same run:
    one padded pass (baseline): every text of a column padded to the column's longest;
    length buckets: the encoder's forward in length-sorted buckets of 32 rows (the recipe's default);
    GradCache: CachedMultipleNegativesRankingLoss with mini-batches of 32 (memory of one mini-batch);
with mean and latent-attention pooling, and an MNTP step (1 text per sample) as a reference. Last, the
tokenizing alone (what the data collator does for each step, in the main process unless the trainer has
dataloader workers), as a share of the bucketed step: on a GPU the model's part shrinks and this share is
what is left, which is why make_default_text_encoder.py has --dataloader-workers.

    python benchmarks/train_throughput.py [--hidden-size 256] [--layers 4] [--batch-size 128] [--steps 6]
"""

import argparse
import time

import torch
import transformers

from llm2clip4cxr.augment.triplets import build_triplets
from llm2clip4cxr.data import openi_report_texts
from llm2clip4cxr.training.factory import build_text_encoder
from llm2clip4cxr.training.text import contrastive_loss, mntp_collator, mntp_model_for, sentence_transformer_for
from llm2clip4cxr.training.tokenization import train_report_tokenizer


def time_steps(step, batches, warmup: int = 2) -> float:
    """Seconds per step, averaged after `warmup` steps."""
    for batch in batches[:warmup]:
        step(batch)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    return (time.perf_counter() - start) / len(batches[warmup:])


INSTRUCTION = "Retrieve reports with the same clinical findings"
ROLES = ("anchor", "positive", "negative")


def tokenize_seconds(args, tokenizer, triplets) -> float:
    """Seconds to tokenize one step's three columns, as the collator does before each step."""
    st_model = sentence_transformer_for(build_text_encoder(tokenizer, pooling_mode="mean"))
    batches = [triplets[i : i + args.batch_size] for i in range(0, len(triplets), args.batch_size)]

    def step(rows):
        for role in ROLES:
            st_model.preprocess([t[role] for t in rows], prompt=INSTRUCTION)

    return time_steps(step, batches)


def contrastive_seconds(args, tokenizer, triplets, pooling_mode: str, bucket_rows: int, mini_batch_size):
    """(seconds per contrastive step, the model it trained) for one way of batching the forward pass."""
    transformers.set_seed(0)
    size = dict(hidden_size=args.hidden_size, num_layers=args.layers, num_heads=4, num_kv_heads=4)
    model = build_text_encoder(tokenizer, pooling_mode=pooling_mode, backbone_kwargs=size).train()
    st_model = sentence_transformer_for(model, bucket_rows=bucket_rows)
    loss_fn = contrastive_loss(st_model, args.batch_size, mini_batch_size, gather_across_devices=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = [
        [
            st_model.preprocess([t[role] for t in triplets[i : i + args.batch_size]], prompt=INSTRUCTION)
            for role in ROLES
        ]
        for i in range(0, len(triplets), args.batch_size)
    ]

    def step(features):
        loss_fn(features, None).backward()
        optimizer.step()
        optimizer.zero_grad()

    return time_steps(step, batches), model


def mntp_seconds(model, tokenizer, triplets, batch_size: int) -> float:
    """Seconds per MNTP step on the anchors, for reference."""
    lm = mntp_model_for(model).train()
    mask_collate = mntp_collator(tokenizer, seed=0)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-4)
    batches = [
        mask_collate([tokenizer(t["anchor"], truncation=True, max_length=512) for t in triplets[i : i + batch_size]])
        for i in range(0, len(triplets), batch_size)
    ]

    def step(batch):
        lm(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return time_steps(step, batches)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()

    texts = openi_report_texts()
    tokenizer = train_report_tokenizer(texts, vocab_size=4096)
    needed = (args.steps + 2) * args.batch_size
    triplets = [{role: t[role] for role in ROLES} for t in build_triplets(texts[:needed], seed=0)][:needed]
    print(
        f"{args.threads} threads, Llama-style hidden {args.hidden_size} x {args.layers} layers, "
        f"batch {args.batch_size}, {args.steps} timed steps"
    )
    variants = (
        ("one padded pass", 10**9, None),
        ("length buckets of 32", 32, None),
        ("GradCache, mini-batch 32", 32, 32),
    )
    bucketed = None
    for pooling_mode in ("mean", "latent_attention"):
        baseline = None
        for name, bucket_rows, mini_batch_size in variants:
            seconds, model = contrastive_seconds(args, tokenizer, triplets, pooling_mode, bucket_rows, mini_batch_size)
            baseline = baseline or seconds
            if pooling_mode == "mean" and bucket_rows == 32 and mini_batch_size is None:
                bucketed = seconds
            print(f"contrastive, {pooling_mode:>16} pooling, {name:<26}: {args.batch_size / seconds:7.1f} triplets/s "
                  f"({seconds:.2f} s/step, {baseline / seconds:.2f}x the padded pass)")
        if pooling_mode == "mean":
            seconds = mntp_seconds(model, tokenizer, triplets, args.batch_size)
            rate = args.batch_size / seconds
            print(f"MNTP (reference)                  : {rate:7.1f} reports/s ({seconds:.2f} s/step)")
    seconds = tokenize_seconds(args, tokenizer, triplets)
    print(f"tokenizing one step's texts only  : {seconds:.3f} s/step, {seconds / bucketed:.0%} of the bucketed mean-"
          "pooling step")


if __name__ == "__main__":
    main()
