"""GPU scale of LLM2Vec4CXR / LLM2CLIP4CXR: encode, image tower and contrastive training rates with MFU.

    python benchmarks/gpu.py [--shape 1b|tiny] [--reports 12384] [--output gpu.json]

On a GPU it measures a Llama-3.2-1B-shaped LLM2Vec4CXR (random weights, bf16, sdpa) and an EVA02-L/14 @448
vision tower; on the CPU it runs a tiny shape so that CI can smoke-test the script. Reports are synthetic
(`llm2clip4cxr.augment.synthetic`): no data is needed on the GPU machine. Rows, all in one run:

    naive loop            file order, batch 64, tokenize + copy + forward + .cpu() per batch (the baseline)
    encode() at 64/256/1024   the package's pipeline (length-sorted batches, tokenization one batch ahead
                          in a thread, pinned non-blocking copies, results kept on the device)
    forward only          the same sorted batches pre-tokenized and already on the device: the ceiling
    compiled              forward only through torch.compile(dynamic=True), widths padded to multiples of 64
    image tower           EVA02 forward, batch 64
    training              triplets/s of sentence-transformers' MultipleNegativesRankingLoss (plain) and
                          CachedMultipleNegativesRankingLoss (GradCache, mini-batch 64) at 32/256/1024 triplets
                          per step, bf16 autocast, gradient checkpointing; peak memory per setting

MFU = achieved FLOP/s / --peak-tflops, counting 2 x non-embedding parameters x useful (non-padding) tokens
per forward (6 x for a training step, 8 x with GradCache's extra forward). Peak defaults to 794 TFLOP/s
(H200 bf16 dense, as measured); on the CPU a float32 matmul is timed instead. Writes JSON to --output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

SHAPES = {
    # Llama-3.2-1B: 16 layers, hidden 2048, 32 heads (8 kv), MLP 8192.
    "1b": {"hidden_size": 2048, "num_layers": 16, "num_heads": 32, "num_kv_heads": 8, "intermediate_size": 8192},
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128},
}
VISION_SHAPES = {
    "1b": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 2730,
           "image_size": 448, "patch_size": 14},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
             "image_size": 56, "patch_size": 14},
}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int = 1) -> float:
    """Seconds per call of `fn` after one warm-up call."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def measured_peak_flops(device) -> float:
    """FLOP/s of a large float32 matmul (the CPU's practical peak)."""
    a = torch.randn(2048, 2048, device=device)
    seconds = timed(lambda: a @ a, device, repeats=5)
    return 2 * 2048**3 / seconds


def non_embedding_parameters(model) -> int:
    embedding = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - embedding


def build_text_model(shape: str, device, dtype):
    from llm2clip4cxr.augment.synthetic import build_synthetic_triplets
    from llm2clip4cxr.training.factory import build_text_encoder
    from llm2clip4cxr.training.tokenization import train_report_tokenizer

    texts = [t["anchor"] for t in build_synthetic_triplets(2000, seed=1)]
    tokenizer = train_report_tokenizer(texts, vocab_size=4096)
    model = build_text_encoder(
        tokenizer, backbone_kwargs={**SHAPES[shape], "max_position_embeddings": 2048}, max_seq_length=512,
        instructions={"retrieval": "Retrieve reports with the same clinical findings"},
        default_instruction_name="retrieval",
    )
    model.config.backbone_config._attn_implementation = "sdpa"
    return model.to(device=device, dtype=dtype).eval()


def encode_rates(model, reports, device, peak, batch_sizes, compile_model: bool) -> dict:
    params = non_embedding_parameters(model)
    rows = {}

    def record(name, seconds, tokens):
        rows[name] = {"reports_per_s": len(reports) / seconds, "mfu": 2 * params * tokens / seconds / peak,
                      "seconds": seconds}
        print(f"{name:<34} {rows[name]['reports_per_s']:10.1f} reports/s   MFU {rows[name]['mfu']:.3f}", flush=True)

    features = model.tokenize(reports)
    useful_tokens = int(features["attention_mask"].sum())

    @torch.inference_mode()
    def naive():
        outputs = []
        for start in range(0, len(reports), 64):
            batch = model.tokenize(reports[start : start + 64])
            batch = {key: value.to(device) for key, value in batch.items()}
            outputs.append(model(**batch).pooler_output.float().cpu())
        return torch.cat(outputs)

    record("naive loop, batch 64", timed(naive, device), useful_tokens)
    for batch_size in batch_sizes:
        record(f"encode(), batch {batch_size}",
               timed(lambda: model.encode(reports, batch_size=batch_size, device=device), device), useful_tokens)

    # Forward only: encode()'s own sorted batches, tokenized and moved beforehand.
    batch_size = batch_sizes[len(batch_sizes) // 2]
    order = sorted(range(len(reports)), key=lambda i: -len(reports[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        batch = model.tokenize([reports[i] for i in order[start : start + batch_size]])
        batches.append({key: value.to(device) for key, value in batch.items()})

    @torch.inference_mode()
    def forward_only(module):
        return [module(**batch).pooler_output for batch in batches]

    record(f"forward only, batch {batch_size}", timed(lambda: forward_only(model), device), useful_tokens)
    if compile_model:
        compiled = torch.compile(model, dynamic=True)
        padded = []
        for batch in batches:  # widths rounded up to 64 bound the number of distinct shapes
            width = -(-batch["input_ids"].shape[1] // 64) * 64
            pad = width - batch["input_ids"].shape[1]
            padded.append({key: torch.nn.functional.pad(value, (0, pad), value=0) for key, value in batch.items()})
        batches = padded
        start = time.perf_counter()
        forward_only(compiled)
        synchronize(device)
        print(f"compile + first pass: {time.perf_counter() - start:.1f} s", flush=True)
        record(f"compiled forward only, batch {batch_size}", timed(lambda: forward_only(compiled), device),
               useful_tokens)
    return rows


def image_rate(shape: str, device, dtype, peak) -> dict:
    from llm2clip4cxr import EVA02VisionConfig, EVA02VisionModel

    config = EVA02VisionConfig(**VISION_SHAPES[shape])
    model = EVA02VisionModel(config).to(device=device, dtype=dtype).eval()
    batch = 64 if device.type == "cuda" else 4
    pixels = torch.randn(batch, 3, config.image_size, config.image_size, device=device, dtype=dtype)
    tokens = batch * ((config.image_size // config.patch_size) ** 2 + 1)
    params = sum(p.numel() for p in model.parameters())
    with torch.inference_mode():
        seconds = timed(lambda: model(pixel_values=pixels), device, repeats=3)
    row = {"images_per_s": batch / seconds, "mfu": 2 * params * tokens / seconds / peak, "batch": batch}
    print(f"{'image tower, batch ' + str(batch):<34} {row['images_per_s']:10.1f} images/s    MFU {row['mfu']:.3f}",
          flush=True)
    return row


def training_rates(model, reports, device, peak, sizes, mini_batch_size: int) -> dict:
    from llm2clip4cxr.training.text import contrastive_loss, sentence_transformer_for

    model.train()
    model.float() if device.type == "cpu" else None
    model.gradient_checkpointing_enable()
    st_model = sentence_transformer_for(model, bucket_rows=mini_batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    params = non_embedding_parameters(model)
    rows = {}
    for size in sizes:
        texts = [reports[(i * 3 + j) % len(reports)] for i in range(size) for j in range(3)]
        features = [st_model.preprocess(texts[j::3]) for j in range(3)]
        features = [{k: v.to(device) for k, v in f.items()} for f in features]
        tokens = sum(int(f["attention_mask"].sum()) for f in features)
        for cached in (False, True):
            loss_fn = contrastive_loss(
                st_model, size, mini_batch_size if cached else None, gather_across_devices=False
            )
            autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else \
                contextlib.nullcontext()

            def step():
                with autocast:
                    loss = loss_fn(features, None)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            name = f"train {size} triplets, {'GradCache mb ' + str(mini_batch_size) if cached else 'plain'}"
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                seconds = timed(step, device)
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                rows[name] = {"error": "CUDA out of memory"}
                print(f"{name:<34} CUDA out of memory", flush=True)
                continue
            flops = (8 if cached else 6) * params * tokens
            rows[name] = {"triplets_per_s": size / seconds, "mfu": flops / seconds / peak,
                          "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30
                          if device.type == "cuda" else None}
            print(f"{name:<34} {rows[name]['triplets_per_s']:10.1f} triplets/s  MFU {rows[name]['mfu']:.3f}"
                  + (f"  peak {rows[name]['peak_memory_gb']:.1f} GB" if rows[name]["peak_memory_gb"] else ""),
                  flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: 1b on CUDA, tiny on CPU")
    parser.add_argument("--reports", type=int, default=None, help="default: 12384 on CUDA, 64 on CPU")
    parser.add_argument("--peak-tflops", type=float, default=None, help="default: 794 on CUDA, measured on CPU")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--output", default="gpu_benchmark.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    shape = args.shape or ("1b" if on_gpu else "tiny")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    peak = (args.peak_tflops * 1e12) if args.peak_tflops else (794e12 if on_gpu else measured_peak_flops(device))
    count = args.reports or (12384 if on_gpu else 64)

    from llm2clip4cxr.augment.synthetic import build_synthetic_triplets

    reports = [t["anchor"] for t in build_synthetic_triplets(count, seed=7)]
    print(f"{device} ({torch.cuda.get_device_name() if on_gpu else 'CPU'}), shape {shape}, {count} reports, "
          f"peak {peak / 1e12:.3g} TFLOP/s", flush=True)
    model = build_text_model(shape, device, dtype)
    results = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "shape": shape, "reports": count,
               "peak_tflops": peak / 1e12, "non_embedding_parameters": non_embedding_parameters(model)}
    batch_sizes = (64, 256, 1024) if on_gpu else (8, 16, 32)
    results["encode"] = encode_rates(
        model, reports, device, peak, batch_sizes, compile_model=on_gpu and not args.no_compile
    )
    results["image"] = image_rate(shape, device, dtype, peak)
    sizes = (32, 256, 1024) if on_gpu else (8, 16)
    results["training"] = training_rates(model, reports, device, peak, sizes, mini_batch_size=64 if on_gpu else 4)
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
