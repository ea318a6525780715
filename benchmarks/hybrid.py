"""Hybrid (dense + BM25) search latency against dense search alone, on one EmbeddingIndex, in one run.

    python benchmarks/hybrid.py [--reports 10000] [--dim 256] [--queries 100] [--kind flat] [--fusion zscore]

The corpus is report text (the Open-I reports when ../shared/data is there, topped up with synthetic
reports from `llm2clip4cxr.augment.synthetic`) with random unit vectors: search latency does not depend on
what the vectors mean. Query embedding time is left out (it is the same for both). Prints milliseconds
per query for one query per call and for --queries per call, and the hybrid/dense ratio.
"""

import argparse
import time

import numpy as np

from llm2clip4cxr.augment.synthetic import build_synthetic_triplets
from llm2clip4cxr.retrieval.hybrid import DEFAULT_FUSION, FUSION_METHODS
from llm2clip4cxr.retrieval.index import EmbeddingIndex


def corpus_texts(count: int) -> list[str]:
    texts = []
    try:
        from llm2clip4cxr.data import openi_report_texts

        texts = openi_report_texts()
    except (FileNotFoundError, OSError):
        pass
    synthetic = build_synthetic_triplets(max(count - len(texts), 0), seed=3)
    return (texts + [t["anchor"] for t in synthetic])[:count]


def per_query_ms(search, batches) -> float:
    search(batches[0])  # warm-up
    start = time.perf_counter()
    count = 0
    for batch in batches:
        search(batch)
        count += len(batch[1])
    return 1000 * (time.perf_counter() - start) / count


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reports", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--kind", default="flat", choices=("flat", "hnsw", "ivf", "pq"))
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--fusion", default=DEFAULT_FUSION, choices=FUSION_METHODS)
    args = parser.parse_args(argv)

    texts = corpus_texts(args.reports)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((len(texts), args.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = EmbeddingIndex(dim=args.dim, kind=args.kind)
    index.add(vectors, ids=[str(i) for i in range(len(texts))])
    start = time.perf_counter()
    index.set_lexical(texts)
    print(f"{len(texts)} reports, dim {args.dim}, {args.kind} index; BM25 statistics built in "
          f"{time.perf_counter() - start:.2f} s")

    picks = rng.choice(len(texts), args.queries, replace=False)
    query_texts = [texts[i] for i in picks]
    query_vectors = vectors[picks] + 0.05 * rng.standard_normal((args.queries, args.dim)).astype(np.float32)
    for per_call in (1, args.queries):
        batches = [(query_vectors[i : i + per_call], query_texts[i : i + per_call])
                   for i in range(0, args.queries, per_call)]
        dense = per_query_ms(lambda batch: index.search(batch[0], k=args.k), batches)
        hybrid = per_query_ms(
            lambda batch: index.search_hybrid(batch[0], batch[1], k=args.k, method=args.fusion), batches
        )
        print(f"{per_call:>4} queries per call: dense {dense:8.3f} ms/query   hybrid ({args.fusion}) "
              f"{hybrid:8.3f} ms/query   hybrid / dense {hybrid / dense:6.1f}x")


if __name__ == "__main__":
    main()
