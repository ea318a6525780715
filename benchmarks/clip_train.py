"""LLM2CLIP4CXR training throughput with a frozen text tower: cached text embeddings vs the online tower.

Both runs use the same model (a random Llama-style text tower much larger than a small CLIP vision
tower, as LLM2CLIP is), the same batches (Open-I report captions, random pixels: the cost does not
depend on the pixel values) and the same step (`ClipTrainer.compute_loss`, backward, AdamW). The
online run executes the frozen text tower without autograd every step; the cached run reads its
pooled outputs from `cache_text_embeddings` (computed once beforehand, time reported separately).

    python benchmarks/clip_train.py [--text-hidden 512] [--text-layers 8] [--batch-size 16] [--steps 5]
"""

import argparse
import time
from types import SimpleNamespace

import torch
import transformers
from transformers import CLIPVisionConfig

from llm2clip4cxr import LLM2CLIP4CXRConfig, LLM2CLIP4CXRImageProcessor, LLM2CLIP4CXRModel, LLM2CLIP4CXRProcessor
from llm2clip4cxr.data import read_reports_csv
from llm2clip4cxr.defaults import shared_data_dir
from llm2clip4cxr.training.clip import ClipTrainer, ClipTrainingModel, build_caption, cache_text_embeddings
from llm2clip4cxr.training.factory import build_text_encoder
from llm2clip4cxr.training.tokenization import train_report_tokenizer


def count(module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f}M"


def build_model(args, tokenizer) -> LLM2CLIP4CXRModel:
    """An LLM2CLIP4CXR model of the sizes asked for, randomly initialised."""
    heads = max(1, args.text_hidden // 64)
    encoder = build_text_encoder(
        tokenizer,
        backbone_kwargs={
            "hidden_size": args.text_hidden,
            "num_layers": args.text_layers,
            "num_heads": heads,
            "num_kv_heads": heads,
        },
    )
    vision = CLIPVisionConfig(
        hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden, num_hidden_layers=args.vision_layers,
        num_attention_heads=max(1, args.vision_hidden // 64), image_size=args.image_size, patch_size=16,
    )
    clip = LLM2CLIP4CXRModel(
        LLM2CLIP4CXRConfig(text_config=encoder.config, vision_config=vision, projection_dim=256), text_model=encoder
    )
    return clip


def make_batches(args, num_steps: int, captions: list[str], processor, cache) -> list[tuple[dict, dict]]:
    """Per step, the same random images with the captions as tokens (online) and as cached embeddings."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for step in range(num_steps):
        index = list(range(step * args.batch_size, (step + 1) * args.batch_size))
        pixels = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
        tokens = dict(processor(text=[captions[i] for i in index]))
        batches.append(
            ({"pixel_values": pixels, **tokens}, {"pixel_values": pixels, "text_embeds_cached": cache[index]})
        )
    return batches


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-hidden", type=int, default=512)
    parser.add_argument("--text-layers", type=int, default=8)
    parser.add_argument("--vision-hidden", type=int, default=128)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.set_seed(0)

    rows = read_reports_csv(shared_data_dir() / "openi" / "reports.csv")
    num_steps = args.steps + args.warmup
    rows = rows[: num_steps * args.batch_size]
    captions = [build_caption(row["findings"], row["impression"], seed) for seed, row in enumerate(rows)]
    tokenizer = train_report_tokenizer([row["findings"] + " " + row["impression"] for row in rows], vocab_size=2000)
    clip = build_model(args, tokenizer)
    clip.text_model.requires_grad_(False)
    processor = LLM2CLIP4CXRProcessor(LLM2CLIP4CXRImageProcessor(size=args.image_size), tokenizer)
    model = ClipTrainingModel(clip).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_settings = SimpleNamespace(
        sup_con_weight=0.0, sup_con_temperature=0.07, bce_weight=0.0, gather_across_processes=True
    )

    start = time.perf_counter()
    cache = cache_text_embeddings(clip, captions, batch_size=args.batch_size, processor=processor)
    cache_seconds = time.perf_counter() - start

    batches = make_batches(args, num_steps, captions, processor, cache)
    mean_tokens = sum(int(b[0]["attention_mask"].sum()) for b in batches) / (num_steps * args.batch_size)

    def seconds_per_step(which: int) -> float:
        def step(batch):
            optimizer.zero_grad(set_to_none=True)
            ClipTrainer.compute_loss(loss_settings, model, batch).backward()
            optimizer.step()

        for online, cached in batches[: args.warmup]:
            step((online, cached)[which])
        start = time.perf_counter()
        for online, cached in batches[args.warmup :]:
            step((online, cached)[which])
        return (time.perf_counter() - start) / args.steps

    print(
        f"text tower {count(clip.text_model)} params "
        f"(Llama hidden {args.text_hidden} x {args.text_layers} layers, frozen), "
        f"vision tower {count(clip.vision_model)} (CLIP hidden {args.vision_hidden} x {args.vision_layers} layers, "
        f"{args.image_size}px), heads {count(clip.text_projection)} + {count(clip.visual_projection)}"
    )
    print(
        f"{args.threads} threads, batch {args.batch_size}, {mean_tokens:.0f} tokens/caption, {args.steps} timed steps"
    )
    print(f"caching {len(captions)} captions once: {cache_seconds:.2f} s")
    online, cached = seconds_per_step(0), seconds_per_step(1)
    for name, seconds in (("online frozen text tower", online), ("cached text embeddings", cached)):
        print(f"{name:26s} {1 / seconds:7.2f} steps/s {args.batch_size / seconds:8.1f} samples/s")
    print(f"speed-up of caching: {online / cached:.1f}x")


if __name__ == "__main__":
    main()
