"""Exact (flat) vs approximate (HNSW, IVF or PQ + exact re-ranking) top-10 search with EmbeddingIndex, in one run.

Corpus: N unit vectors of dimension 512 (float32, generated in chunks from a fixed seed). Queries:
1000 corpus vectors plus Gaussian noise (`--noise` is the noise norm relative to the unit vector),
re-normalised. The approximate index is swept over its search knob (HNSW `ef_search`, IVF `nprobe`,
PQ `k_factor`)
until its recall@10 against the exact top-10 reaches `--target-recall`; every setting tried is printed.

Two corpora (`--data`):
  uniform  isotropic random unit vectors. The worst case for any approximate index: in 512-d the true
           10 nearest neighbours are barely closer than the rest of the corpus.
  lowdim   unit vectors near a random `--latent-dim`-dimensional subspace, plus isotropic noise: a
           stand-in for real embeddings, whose intrinsic dimension is far below 512.

The summary times exact and approximate search alternately `--repeats` times and reports medians
(the CPU speed of a small VM drifts by several x within minutes). Peak memory is the process's
ru_maxrss: the corpus, both indexes (FAISS float32 copies plus EmbeddingIndex's float16 stores) and
the interpreter with torch/transformers, which importing the package loads.

    python benchmarks/index.py                       # 1M x 512, uniform, HNSW
    python benchmarks/index.py --kind pq             # 1M x 512, uniform, 4-bit PQ fast scan + re-ranking
    python benchmarks/index.py --n 100000 --data lowdim
    python benchmarks/index.py --kind ivf --nlist 4096
"""

import argparse
import resource
import time

import faiss
import numpy as np

from llm2clip4cxr.retrieval.index import EmbeddingIndex

GENERATION_CHUNK = 100_000


def peak_memory_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def unit_rows(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def make_corpus(n: int, dim: int, data: str, latent_dim: int, rng: np.random.Generator) -> np.ndarray:
    """(n, dim) float32 unit vectors, generated chunk by chunk so no float64 copy of the corpus exists."""
    corpus = np.empty((n, dim), dtype=np.float32)
    basis = rng.standard_normal((latent_dim, dim), dtype=np.float32) / np.sqrt(latent_dim)
    for start in range(0, n, GENERATION_CHUNK):
        rows = min(GENERATION_CHUNK, n - start)
        if data == "uniform":
            chunk = rng.standard_normal((rows, dim), dtype=np.float32)
        else:  # lowdim: subspace signal with 30% isotropic noise (by norm)
            chunk = rng.standard_normal((rows, latent_dim), dtype=np.float32) @ basis
            chunk += 0.3 * rng.standard_normal((rows, dim), dtype=np.float32) / np.sqrt(dim)
        corpus[start : start + rows] = unit_rows(chunk)
    return corpus


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def search_in_batches(index, queries: np.ndarray, k: int, batch: int | None) -> np.ndarray:
    """Top-k positions, searching `batch` queries per call (all at once when None)."""
    batch = batch or len(queries)
    return np.concatenate(
        [index.search_raw(queries[start : start + batch], k)[1] for start in range(0, len(queries), batch)]
    )


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean |approximate top-k ∩ exact top-k| / k."""
    k = exact.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found.tolist(), exact.tolist())]))


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="corpus size")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--data", choices=("uniform", "lowdim"), default="uniform")
    parser.add_argument("--latent-dim", type=int, default=16, help="subspace dimension for --data lowdim")
    parser.add_argument("--noise", type=float, default=0.1, help="query noise norm (corpus vectors have norm 1)")
    parser.add_argument("--kind", choices=("hnsw", "ivf", "pq"), default="hnsw")
    parser.add_argument("--hnsw-m", type=int, default=16)
    parser.add_argument("--ef-construction", type=int, default=40)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512, 1024, 2048, 4096])
    parser.add_argument("--nlist", type=int, default=4096)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024])
    parser.add_argument("--pq-m", type=int, default=None, help="PQ sub-quantizers (default: dim / 2)")
    parser.add_argument("--k-factor", type=int, nargs="+", default=[5, 10, 20, 50, 100, 200])
    parser.add_argument(
        "--batch", type=int, default=None,
        help="queries per search call (default: all at once). Exact search turns into one large matrix product "
        "for big batches, which is where it is fastest per query; 1 measures one-query-at-a-time serving",
    )
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="alternating timings behind the summary")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def approximate_index(args) -> tuple[EmbeddingIndex, str, list[int], str]:
    """(empty index of --kind, its search-time knob, the knob values to sweep, a label)."""
    if args.kind == "hnsw":
        approx = EmbeddingIndex(args.dim, kind="hnsw", hnsw_m=args.hnsw_m, ef_construction=args.ef_construction)
        knob, settings = "ef_search", args.ef_search
        label = f"HNSW M={args.hnsw_m} efConstruction={args.ef_construction}"
    elif args.kind == "pq":
        approx = EmbeddingIndex(args.dim, kind="pq", pq_m=args.pq_m)
        knob, settings = "k_factor", args.k_factor
        label = f"PQ {approx.pq_m}x4-bit fast scan + exact re-ranking"
    else:
        approx = EmbeddingIndex(args.dim, kind="ivf", nlist=args.nlist)
        knob, settings = "nprobe", [p for p in args.nprobe if p <= args.nlist]
        label = f"IVF nlist={args.nlist}"
    return approx, knob, settings, label


def sweep(approx, knob: str, settings, queries, exact, sources, flat_search: float, args):
    """Raise the knob until the target recall is reached (or the index is slower than exact search): (the last
    value, its recall, whether the target was reached, why the sweep stopped otherwise)."""
    reached, stop_reason = False, f"swept up to {knob}={settings[-1]}"
    for value in settings:
        setattr(approx, knob, value)
        found, seconds = timed(lambda: search_in_batches(approx, queries, args.k, args.batch))
        recall = recall_at_k(found, exact)
        speedup = flat_search / seconds
        print(f"  {value:>9}  {args.queries / seconds:>10,.1f}  {speedup:>7.1f}x  {recall:>9.3f}  "
              f"{np.mean(found[:, 0] == sources):>8.1%}")
        if recall >= args.target_recall:
            reached = True
            break
        if speedup < 1:  # slower than exact search already: larger settings only get slower
            stop_reason = f"stopped at {knob}={value}, already slower than exact search"
            break
    return value, recall, reached, stop_reason


def summary(args, exact_index, approx, label, knob, value, recall, reached, stop_reason, queries, builds, baseline):
    """Alternating exact and approximate timings, and the summary lines."""
    flat_build, approx_build = builds
    # CPU speed on small VMs drifts by several x over minutes (burst credits, neighbours), so the
    # reported numbers alternate exact and approximate searches and take medians of each and of the ratios.
    exact_times, approx_times = [], []
    for _ in range(args.repeats):
        exact_times.append(timed(lambda: search_in_batches(exact_index, queries, args.k, args.batch))[1])
        approx_times.append(timed(lambda: search_in_batches(approx, queries, args.k, args.batch))[1])
    exact_qps = args.queries / float(np.median(exact_times))
    approx_qps = args.queries / float(np.median(approx_times))
    speedup = float(np.median(np.array(exact_times) / np.array(approx_times)))

    print(f"\nsummary ({args.repeats} alternating exact/approximate timings, medians)")
    print(f"  n = {args.n:,}, dim = {args.dim}, data = {args.data}, {args.threads} threads, "
          f"{args.batch or args.queries} queries per search call")
    print(f"  exact top-{args.k}:  {exact_qps:,.1f} queries/s (range {args.queries / max(exact_times):,.1f}-"
          f"{args.queries / min(exact_times):,.1f}), build {flat_build:.1f} s")
    print(
        f"  approximate ({label}, {knob}={value}): {approx_qps:,.1f} queries/s (range "
        f"{args.queries / max(approx_times):,.1f}-{args.queries / min(approx_times):,.1f}), build {approx_build:.1f} s"
    )
    print(f"  recall@{args.k} vs exact: {recall:.3f} (target {args.target_recall}: "
          f"{'reached' if reached else 'NOT reached, ' + stop_reason})")
    print(f"  speed-up: {speedup:.1f}x")
    print(f"  peak memory (ru_maxrss): {peak_memory_gib():.2f} GiB ({baseline:.2f} GiB of it after imports)")


def main():
    args = parse_arguments()

    faiss.omp_set_num_threads(args.threads)
    baseline = peak_memory_gib()  # interpreter + imports (the package imports torch and transformers)
    rng = np.random.default_rng(args.seed)
    ids = [str(i) for i in range(args.n)]
    corpus, seconds = timed(lambda: make_corpus(args.n, args.dim, args.data, args.latent_dim, rng))
    sources = rng.choice(args.n, size=args.queries, replace=False)
    noise = rng.standard_normal((args.queries, args.dim), dtype=np.float32) * (args.noise / np.sqrt(args.dim))
    queries = unit_rows(corpus[sources] + noise).astype(np.float32)
    print(f"corpus: {args.n:,} x {args.dim} float32 unit vectors ({args.data}), {args.queries} queries "
          f"(noise norm {args.noise}) searched {args.batch or args.queries} per call, top-{args.k}, "
          f"{args.threads} threads, faiss {faiss.__version__}")
    print(f"peak memory after imports {baseline:.2f} GiB; corpus generated in {seconds:.1f} s, "
          f"peak memory {peak_memory_gib():.2f} GiB")

    exact_index = EmbeddingIndex(args.dim, kind="flat")
    _, flat_build = timed(lambda: exact_index.add(corpus, ids))
    exact, flat_search = timed(lambda: search_in_batches(exact_index, queries, args.k, args.batch))
    print(f"\nexact (flat): build {flat_build:.1f} s, {args.queries / flat_search:,.1f} queries/s "
          f"({flat_search:.2f} s), finds the perturbed source at rank 1 for {np.mean(exact[:, 0] == sources):.1%}; "
          f"peak memory {peak_memory_gib():.2f} GiB")

    approx, knob, settings, label = approximate_index(args)
    _, approx_build = timed(lambda: approx.add(corpus, ids))
    print(f"\napproximate ({label}): build {approx_build:.1f} s; peak memory {peak_memory_gib():.2f} GiB")
    print("  sweep (one timing each, speed-up against the single exact timing above)")
    print(f"  {knob:>9}  {'queries/s':>10}  {'speed-up':>8}  recall@{args.k}  source@1")

    value, recall, reached, stop_reason = sweep(approx, knob, settings, queries, exact, sources, flat_search, args)
    summary(args, exact_index, approx, label, knob, value, recall, reached, stop_reason, queries,
            (flat_build, approx_build), baseline)


if __name__ == "__main__":
    main()
