"""Exact top-k over a score matrix, for collections small enough to score whole (the CLI's `similar` and
`retrieve`); `EmbeddingIndex` searches large ones."""

import numpy as np

__all__ = ["rank", "top_k"]


def top_k(scores, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` best columns of each row of a `(queries, candidates)` score matrix, best first: `(indices,
    scores)`, each `(queries, min(k, candidates))`.

    Ties keep the lower column first, so results do not depend on the BLAS build.
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}.")
    scores = np.asarray(scores)
    order = np.argsort(-scores, axis=1, kind="stable")[:, : min(k, scores.shape[1])]
    return order, np.take_along_axis(scores, order, axis=1)


def rank(queries: np.ndarray, corpus: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-`k` corpus rows for each query by inner product: `(indices, scores)`, each `(q, k)` (see `top_k`)."""
    return top_k(np.asarray(queries, dtype=np.float32) @ np.asarray(corpus, dtype=np.float32).T, k)
