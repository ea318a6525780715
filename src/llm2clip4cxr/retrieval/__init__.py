"""Search: encoders that turn models into embedding callables (`encoders`), resumable chunked embedding of
large collections (`embedding`), the FAISS vector index (`index`), dense + BM25 fusion (`hybrid`), exact
top-k for small collections (`ranking`) and zero-shot image classification (`zero_shot`). Beyond one machine:
embedding on Ray workers into resumable parquet shards (`ray_engine`, the `ray` extra) and a Qdrant collection
as the index (`qdrant_backend`, the `qdrant` extra); both import their engine only when used.

The encoder and ranking functions are importable from here (they import torch only when a model runs).
"""

from .encoders import (
    IMAGE_SUFFIXES,
    Encoder,
    find_images,
    image_encoder,
    llm2vec_encoder,
    load_clip_model,
    report_encoder,
)
from .ranking import rank, top_k

__all__ = [
    "IMAGE_SUFFIXES", "Encoder", "find_images", "image_encoder", "llm2vec_encoder", "load_clip_model", "rank",
    "report_encoder", "top_k",
]
