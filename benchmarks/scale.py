"""Scale-out overheads on one machine: local encode() vs the Ray engine, and Qdrant's embedded mode vs FAISS.

1. reports/s of `model.encode()` in this process (all threads) against `ray_engine.embed_with_ray` with 1
   and 2 CPU workers (one thread each) on the same Open-I reports and the same random encoder, each Ray
   run timed end to end (actor start, model load in the workers, encoding, shard writes). Ray itself is
   started once, before the timings (its start-up is printed separately). The outputs are checked equal.
2. Search latency of the same vectors in Qdrant's embedded local mode (`QdrantIndex(path=...)`) and in
   an exact FAISS `EmbeddingIndex`, one query per call (median) and all queries in one call.

On a 2-core machine this measures overheads, not speed-ups: there is no second machine or GPU to spread
the work to, and a 2-worker pool competes with the driver for the same two cores.

    python benchmarks/scale.py [--reports 2000] [--hidden-size 128] [--layers 2] [--vectors 5000]
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from llm2clip4cxr.data import openi_report_texts
from llm2clip4cxr.training.factory import build_text_encoder
from llm2clip4cxr.training.tokenization import train_report_tokenizer


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def encode_rates(args, work: Path) -> None:
    import datasets
    import ray

    from llm2clip4cxr.retrieval.ray_engine import TextEncoder, embed_with_ray, read_shards

    texts = openi_report_texts()[: args.reports]
    transformers.set_seed(0)
    model = build_text_encoder(
        train_report_tokenizer(texts, vocab_size=2048),
        backbone_kwargs={"hidden_size": args.hidden_size, "num_layers": args.layers, "num_heads": 4,
                         "num_kv_heads": 4},
    ).eval()
    model.save_pretrained(work / "model")
    print(f"{len(texts)} Open-I reports, random Llama-style encoder hidden {args.hidden_size} x {args.layers} layers, "
          f"batch {args.batch_size}, shards of {args.rows_per_shard}; {os.cpu_count()} CPU cores")
    model.encode(texts[:64], batch_size=args.batch_size)  # warm-up
    _, seconds = timed(lambda: ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False))
    print(f"  (ray.init, once: {seconds:.1f} s)")
    dataset = datasets.Dataset.from_dict({"id": [str(i) for i in range(len(texts))], "text": texts})
    threads = torch.get_num_threads()

    def local(count):
        torch.set_num_threads(count)
        try:
            return model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True, show_progress_bar=False)
        finally:
            torch.set_num_threads(threads)

    def on_ray(workers, run):
        output = work / f"ray-{workers}-{run}"
        embed_with_ray(dataset, TextEncoder(str(work / "model"), batch_size=args.batch_size), output,
                       rows_per_shard=args.rows_per_shard, num_workers=workers, progress=False)
        return read_shards(output)[1]

    runs = {"local encode(), 1 thread": lambda run: local(1),
            f"local encode(), {threads} threads": lambda run: local(threads),
            "Ray, 1 worker x 1 thread": lambda run: on_ray(1, run),
            "Ray, 2 workers x 1 thread": lambda run: on_ray(2, run)}
    seconds = {name: [] for name in runs}
    reference, difference = None, 0.0
    try:
        for run in range(args.repeats):  # alternating, so a change in the machine's load hits every setting
            for name, function in runs.items():
                embeddings, elapsed = timed(lambda function=function: function(run))
                seconds[name].append(elapsed)
                reference = embeddings if reference is None else reference
                difference = max(difference, float(np.abs(embeddings - reference).max()))
    finally:
        ray.shutdown()
    for name, values in seconds.items():
        rates = sorted(len(texts) / value for value in values)
        print(f"  {name:<28}: {statistics.median(rates):7.1f} reports/s (median of {len(rates)}, "
              f"range {rates[0]:.1f}-{rates[-1]:.1f})")
    print(f"  Ray runs are end to end (actor start, model load in each worker, shard writes); max |diff| between all "
          f"runs {difference:.1e}")


def search_latency(args, work: Path) -> None:
    from llm2clip4cxr.retrieval.index import EmbeddingIndex
    from llm2clip4cxr.retrieval.qdrant_backend import QdrantIndex

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.vectors, args.dim)).astype(np.float32)
    queries = rng.standard_normal((args.queries, args.dim)).astype(np.float32)
    ids = [str(i) for i in range(len(vectors))]
    print(f"\nsearch: {args.vectors} x {args.dim} random vectors, top 10, {args.queries} queries")
    faiss_index = EmbeddingIndex(dim=args.dim, kind="flat")
    _, faiss_build = timed(lambda: faiss_index.add(vectors, ids=ids))
    with QdrantIndex.connect("bench", path=work / "qdrant") as qdrant:
        qdrant.ensure(args.dim, {"encoder": {"model": None, "instruction": ""}})
        _, qdrant_build = timed(lambda: qdrant.add(vectors, ids, batch_size=1024))
        rows = []
        for name, search in (("FAISS flat (exact)", faiss_index.search), ("Qdrant embedded (exact)", qdrant.search)):
            single = [timed(lambda query=query: search(query[None, :], 10))[1] for query in queries]
            batch, batch_seconds = timed(lambda search=search: search(queries, 10))
            rows.append((name, statistics.median(single), batch_seconds, [[hit[0] for hit in hits] for hits in batch]))
    print(f"  build: FAISS {faiss_build:.2f} s, Qdrant embedded upsert {qdrant_build:.2f} s")
    for name, median, batch_seconds, _ in rows:
        print(f"  {name:<24}: {1000 * median:8.2f} ms per single query (median), "
              f"{1000 * batch_seconds / args.queries:7.2f} ms per query in one call of {args.queries}")
    print(f"  same top-10 ids for every query: {rows[0][3] == rows[1][3]}; "
          f"Qdrant / FAISS single-query latency: {rows[1][1] / rows[0][1]:.1f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reports", type=int, default=2000)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rows-per-shard", type=int, default=250)
    parser.add_argument("--vectors", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="alternating timings of each encode setting")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as work:
        encode_rates(args, Path(work))
        search_latency(args, Path(work))


if __name__ == "__main__":
    main()
