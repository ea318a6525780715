"""Throughput of LLM2Vec4CXRModel.encode() on the Open-I reports, against a naive baseline in the same run.

Baseline: the bare backbone forward over batches in file order (each batch padded to its longest
report), i.e. what a user gets by looping over the data with a tokenizer and the decoder. encode()
adds length-sorted batching (less padding) and the pooling head; the pooling overhead is timed
separately on the same batches and reported as a fraction of backbone time.

    python benchmarks/encode.py [--hidden-size 256] [--layers 4] [--batch-size 32] [--limit 3096]
"""

import argparse
import time

import torch
import transformers

from llm2clip4cxr.data import openi_report_texts
from llm2clip4cxr.training.factory import build_text_encoder
from llm2clip4cxr.training.tokenization import train_report_tokenizer

INSTRUCTION = "Retrieve reports with the same findings"


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


@torch.inference_mode()
def naive_backbone(model, texts, batch_size):
    for start in range(0, len(texts), batch_size):
        batch = model.tokenize(texts[start : start + batch_size], instruction=INSTRUCTION)
        model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)


@torch.inference_mode()
def backbone_and_pooling_split(model, texts, batch_size):
    """Seconds spent in the backbone and in pooling, over encode()'s own length-sorted batches."""
    features = model.tokenize(texts, instruction=INSTRUCTION)
    lengths = features["attention_mask"].sum(1)
    order = torch.argsort(lengths, descending=True)
    backbone_seconds = pooling_seconds = 0.0
    for start in range(0, len(texts), batch_size):
        rows = order[start : start + batch_size]
        width = int(lengths[rows].max())
        batch = {key: value[rows][:, :width] for key, value in features.items()}  # tokenizer pads on the right
        position_ids = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
        hidden, seconds = timed(
            lambda: model.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=position_ids, use_cache=False,
            ).last_hidden_state
        )
        backbone_seconds += seconds
        _, seconds = timed(lambda: model.pool(hidden, batch["embed_mask"] * batch["attention_mask"]))
        pooling_seconds += seconds
    return backbone_seconds, pooling_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N reports")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    texts = openi_report_texts()[: args.limit]
    tokenizer = train_report_tokenizer(texts, vocab_size=4096)
    print(f"{len(texts)} Open-I reports, batch size {args.batch_size}, {args.threads} threads, "
          f"random Llama-style backbone hidden {args.hidden_size} x {args.layers} layers")
    for pooling_mode in ("mean", "latent_attention"):
        transformers.set_seed(0)
        size = dict(hidden_size=args.hidden_size, num_layers=args.layers, num_heads=4, num_kv_heads=4)
        model = build_text_encoder(tokenizer, pooling_mode=pooling_mode, backbone_kwargs=size).eval()
        model.encode(texts[:64], instruction=INSTRUCTION, batch_size=args.batch_size)  # warm-up
        _, naive_seconds = timed(lambda: naive_backbone(model, texts, args.batch_size))
        _, encode_seconds = timed(
            lambda: model.encode(texts, instruction=INSTRUCTION, batch_size=args.batch_size, show_progress_bar=False)
        )
        backbone_seconds, pooling_seconds = backbone_and_pooling_split(model, texts, args.batch_size)
        print(f"\npooling={pooling_mode}")
        print(f"  naive backbone, file order : {len(texts) / naive_seconds:8.1f} reports/s ({naive_seconds:.2f} s)")
        print(f"  encode(), length-sorted    : {len(texts) / encode_seconds:8.1f} reports/s ({encode_seconds:.2f} s)")
        print(f"  speed-up                   : {naive_seconds / encode_seconds:8.2f}x")
        print(f"  pooling / backbone time    : {100 * pooling_seconds / backbone_seconds:8.2f}% "
              f"({pooling_seconds:.3f} s / {backbone_seconds:.2f} s)")


if __name__ == "__main__":
    main()
