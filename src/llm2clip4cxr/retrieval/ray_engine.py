"""Embedding a collection on a Ray cluster (Ray Data), resumable in parquet shards.

`embed_with_ray` splits a `datasets.Dataset` (from `data.load_text_dataset`, or `data.load_prepared`
for a prepared image folder) into shards of `rows_per_shard` consecutive rows, the same split as
`embedding.embed_in_chunks`. The shards still to do become the blocks of a Ray Dataset; `map_batches` runs
a stateful actor per worker (one per GPU, or per CPU) that builds its encoder once (`TextEncoder` /
`ImageEncoder`: the model is loaded once per worker, images are decoded in the workers) and embeds one
block per call. `LLM2Vec4CXRModel.encode` sorts a block by length into forward batches, so little compute is
spent on padding (length-bucketed batches). The driver writes each shard, once all its rows are back, as
`shards/shard-NNNNNN-of-MMMMMM.parquet` (columns `id`, `text_sha256` of the embedded value, `embedding`)
through a temp file and a rename: a shard file on disk is always whole.

Resuming: a rerun skips the shard files already written. `manifest.json` is the one of
`embed_in_chunks` (row count, column, shard size, encoder, dtype, a hash of the values) plus the format,
so a rerun with another model, instruction, dtype or data is refused rather than mixed in.

Faults: Ray restarts a worker that dies (killed, out of memory) and retries its block; shards are written
only by the driver, so a retried block cannot leave half a file. An exception in the encoder (a bad image
file...) stops the run with one message naming the shard; finished shards are kept.

The rows reach the workers through Ray's object store (put there by the driver, spilled to disk when
large); the model path must be readable on every node, and the workers need not see the output folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CorruptFileError, InputError, LLM2CLIP4CXRError
from ..fileio import atomic_write, output_lock, remove_partial_writes
from .embedding import _MANIFEST_FILE, _check_or_write_manifest, _run_manifest

__all__ = ["ImageEncoder", "RayWorkerError", "SHARDS_DIR", "TextEncoder", "embed_with_ray", "read_shards"]

SHARDS_DIR = "shards"
_FORMAT = "ray-parquet-shards/1"
_SHARD_NAME = re.compile(r"^shard-(\d{6})-of-(\d{6})\.parquet$")
# Put in front of an encoder exception raised in a worker, so the driver can find its message in Ray's
# wrapped traceback (Ray Data does not carry the original exception object back).
_FAILURE_MARK = "llm2clip4cxr-shard-failure: "


class RayWorkerError(LLM2CLIP4CXRError, RuntimeError):
    """The encoder failed in a Ray worker (bad input, a model that cannot load); finished shards are kept."""

    kind = "worker"


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is the `data` extra of ray)
    except ImportError as error:
        raise ImportError('The Ray engine needs Ray Data: pip install "llm2clip4cxr[ray]" (ray[data]).') from error
    return ray


@dataclass(frozen=True)
class TextEncoder:
    """Builds, in each worker, `texts -> (n, dim) float32` from an LLM2Vec4CXR checkpoint (`model` None: the
    shipped default), exactly as `model.encode(texts, instruction=..., batch_size=..., normalize=...)`.

    Picklable (only settings travel to the workers); the model loads when the worker calls it, on the GPU
    Ray gave the worker if any.
    """

    model: str | None = None
    instruction: str | None = None
    batch_size: int = 32
    normalize: bool = False
    trust_remote_code: bool = False

    def __call__(self) -> Callable[[Sequence[str]], np.ndarray]:
        import torch

        from .. import LLM2Vec4CXRModel
        from ..checkpoints import check_model_folder, remote_code_guard
        from ..defaults import default_model_path

        path = check_model_folder(self.model, "model", "LLM2Vec4CXR checkpoint") if self.model else None
        path = path or default_model_path()
        with remote_code_guard(path, self.trust_remote_code) as remote:
            model = LLM2Vec4CXRModel.from_pretrained(path, **remote).eval()
        if torch.cuda.is_available():  # Ray sets CUDA_VISIBLE_DEVICES to the GPUs of this worker only
            model = model.to("cuda")

        def encode(texts: Sequence[str]) -> np.ndarray:
            return model.encode(list(texts), instruction=self.instruction, batch_size=self.batch_size,
                                normalize=self.normalize, convert_to_numpy=True, show_progress_bar=False)

        return encode


@dataclass(frozen=True)
class ImageEncoder:
    """Builds, in each worker, `image paths -> (n, dim)` L2-normalised float32 from an LLM2CLIP4CXR checkpoint
    (`retrieval.encoders.image_encoder`): the images are read and decoded in the workers."""

    model: str
    batch_size: int = 16
    max_pixels: int | None = None
    trust_remote_code: bool = False

    def __call__(self) -> Callable[[Sequence[str]], np.ndarray]:
        import torch

        from .encoders import image_encoder, load_clip_model

        model, processor = load_clip_model(self.model, self.trust_remote_code)
        if torch.cuda.is_available():
            model = model.to("cuda")
        return image_encoder(model, processor, self.batch_size, max_pixels=self.max_pixels)


class _EmbedBlock:
    """The Ray Data actor: builds the encoder once, then embeds one block (one shard) per call.

    The encoder is built on the first call rather than in `__init__`: an error there (a model folder
    missing on a node) then fails the run at once with its message, where a failing constructor would be
    retried by Ray Data as a dying actor and reported without it.
    """

    def __init__(self, encoder: Callable[[], Callable], column: str):
        self._encoder = encoder
        self._encode = None
        self._column = column

    def __call__(self, batch):
        import pyarrow as pa

        values = batch.column(self._column).to_pylist()
        shards = sorted(set(batch.column("shard").to_pylist()))
        try:
            if self._encode is None:
                self._encode = self._encoder()
            vectors = np.asarray(self._encode(values), dtype=np.float32)
            if vectors.ndim != 2 or len(vectors) != len(values):
                raise ValueError(f"the encoder returned shape {vectors.shape} for {len(values)} values; expected "
                                 "(values, dim).")
        except Exception as error:
            raise RuntimeError(f"{_FAILURE_MARK}shard {shards}: {type(error).__name__}: {error}") from error
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
        hashes = [hashlib.sha256(value.encode("utf-8")).hexdigest() for value in values]
        return pa.table({"shard": batch.column("shard"), "row": batch.column("row"), "id": batch.column("id"),
                         "text_sha256": pa.array(hashes, pa.string()), "embedding": embedding})


def _check_arguments(dataset, columns, rows_per_shard, num_workers, num_gpus_per_worker) -> None:
    for name in columns:
        if name not in dataset.column_names:
            raise InputError(f"The dataset has no column {name!r}; its columns are {dataset.column_names}.")
    if isinstance(rows_per_shard, bool) or not isinstance(rows_per_shard, int) or rows_per_shard < 1:
        raise InputError(f"rows_per_shard must be a positive int, got {rows_per_shard!r}.")
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                    or num_workers < 1):
        raise InputError(f"num_workers must be a positive int, got {num_workers!r}.")
    if not num_gpus_per_worker >= 0:
        raise InputError(f"num_gpus_per_worker must be >= 0, got {num_gpus_per_worker!r}.")
    if len(dataset) == 0:
        raise InputError("The dataset is empty: nothing to embed.")


def embed_with_ray(
    dataset,
    encoder: Callable[[], Callable[[Sequence[str]], np.ndarray]],
    output_dir: str | os.PathLike,
    *,
    column: str = "text",
    id_column: str = "id",
    rows_per_shard: int = 10_000,
    encoder_name: str = "",
    dtype: str = "float32",
    num_workers: int | None = None,
    num_gpus_per_worker: float = 0,
    address: str | None = None,
    progress: bool = True,
    wait: bool = True,
    on_wait: Callable[[Path], None] | None = None,
) -> dict:
    """Embed `dataset[column]` on Ray into parquet shards under `output_dir`, skipping shards already written.

    Args:
        dataset (`datasets.Dataset`): the rows, with `column` holding the texts (or image paths for
            `ImageEncoder`) and `id_column` unique ids (stored as strings).
        encoder: a picklable zero-argument callable run once in each worker, returning `values -> (n, dim)`
            (`TextEncoder`, `ImageEncoder`).
        output_dir: where `manifest.json` and `shards/` are written.
        column (`str`, defaults to `"text"`): the column to embed.
        id_column (`str`, defaults to `"id"`): the column of row ids written beside each embedding.
        rows_per_shard (`int`, defaults to 10000): rows per shard file (the unit of work and of resuming).
        encoder_name (`str`): identifies the encoder (model, instruction...); a rerun must give the same one.
        dtype (`str`, defaults to `"float32"`): dtype of the stored embeddings (`"float16"` halves disk).
        num_workers (`int`, *optional*): actors in the pool; default: as many as the cluster's GPUs (CPUs
            without `num_gpus_per_worker`) allow, at most one per shard to do.
        num_gpus_per_worker (`float`, defaults to 0): GPUs per actor (0: CPU workers; 0.5: two per GPU).
        address (`str`, *optional*): the Ray cluster to connect to (`"auto"`, `"ray://head:10001"`) when Ray
            is not initialised yet; None connects to `$RAY_ADDRESS` or starts a local Ray for this call.
        progress (`bool`, defaults to True): a tqdm bar over shards.
        wait, on_wait: as in `embed_in_chunks`: another process writing `output_dir` is waited for (or, with
            `wait=False`, `OutputLockedError`).

    Returns:
        A summary: `output_dir`, `num_rows`, `dim`, `num_shards`, and `written` / `skipped` shard numbers.

    Raises:
        ValueError: bad arguments, or `output_dir` holds a run with other data, shard size, encoder or dtype.
        RayWorkerError: the encoder failed in a worker (finished shards are kept; a rerun resumes).
        ConnectionError: no Ray cluster at `address`.
    """
    from tqdm.auto import tqdm

    _check_arguments(dataset, (id_column, column), rows_per_shard, num_workers, num_gpus_per_worker)
    output_dir = Path(output_dir)
    # The manifest of `embed_in_chunks` (the same rule for a rerun) plus the format of the shards.
    manifest = {**_run_manifest(dataset, column, rows_per_shard, encoder_name, dtype), "format": _FORMAT}
    num_shards = math.ceil(len(dataset) / rows_per_shard)
    with output_lock(output_dir, wait=wait, on_wait=on_wait):
        _check_or_write_manifest(output_dir, manifest)
        shards_dir = output_dir / SHARDS_DIR
        shards_dir.mkdir(exist_ok=True)
        remove_partial_writes(shards_dir)  # defensive: only the driver writes, through temp files
        paths = [shards_dir / _shard_name(i, num_shards) for i in range(num_shards)]
        written = [path.is_file() for path in paths]
        todo = [i for i, is_written in enumerate(written) if not is_written]
        done = [i for i, is_written in enumerate(written) if is_written]
        dim = _shard_dim(paths[done[0]]) if done else None
        if todo:
            with _ray_session(address), tqdm(total=num_shards, initial=len(done), desc="embedding shards",
                                             unit="shard", disable=not progress) as bar:
                for shard, table in _run(dataset, todo, column, id_column, rows_per_shard, encoder, num_workers,
                                         num_gpus_per_worker, progress):
                    width = table.schema.field("embedding").type.list_size
                    dim = dim or width
                    if width != dim:
                        raise RayWorkerError(f"the encoder returned width {width} for shard {shard}; earlier "
                                             f"shards have {dim}.")
                    table = _cast_embeddings(table, dtype)
                    atomic_write(paths[shard], lambda temp, table=table: _write_parquet(table, temp))
                    bar.update(1)
    return {"output_dir": str(output_dir), "num_rows": len(dataset), "dim": dim, "num_shards": num_shards,
            "written": todo, "skipped": done}


def read_shards(output_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> tuple[list[str], np.ndarray]:
    """`(ids, embeddings)` of a finished `embed_with_ray` folder, in the dataset's row order.

    The embeddings are read into RAM, or, with `out` (a `.npy` path), written there shard by shard through a
    memory map and returned memory-mapped read-only (a collection larger than RAM).

    Raises:
        FileNotFoundError: `output_dir` holds no `embed_with_ray` run.
        InputError: shards are missing (the run did not finish: rerun it to resume).
        CorruptFileError: a shard disagrees with the manifest.
    """
    import pyarrow.parquet as pq

    output_dir = Path(output_dir)
    manifest_path = output_dir / _MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{output_dir}: no {_MANIFEST_FILE}; not a folder written by the Ray engine.")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("format") != _FORMAT:
        raise InputError(f"{output_dir}: not a folder of Ray parquet shards (format {manifest.get('format')!r}).")
    rows, size = manifest["num_rows"], manifest["chunk_size"]
    num_shards = math.ceil(rows / size)
    paths = [output_dir / SHARDS_DIR / _shard_name(i, num_shards) for i in range(num_shards)]
    missing = [i for i, path in enumerate(paths) if not path.is_file()]
    if missing:
        raise InputError(f"{output_dir}: {len(missing)} of {num_shards} shards are not written yet (first: "
                         f"{missing[0]}); rerun the same command to finish them.")
    dim = _shard_dim(paths[0])
    shape, dtype = (rows, dim), np.dtype(manifest["dtype"])
    vectors = np.empty(shape, dtype) if out is None else np.lib.format.open_memmap(out, "w+", dtype, shape)
    ids: list[str] = []
    for i, path in enumerate(paths):
        table = pq.read_table(path)
        expected = min(size, rows - i * size)
        width = table.schema.field("embedding").type.list_size
        if table.num_rows != expected or width != dim:
            raise CorruptFileError(f"{path} holds {table.num_rows} x {width} embeddings; {_MANIFEST_FILE} says "
                                   f"{expected} x {dim}: delete it and rerun to rewrite it.")
        ids += table.column("id").to_pylist()
        flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        vectors[i * size : i * size + expected] = flat.reshape(expected, dim)
    if out is None:
        return ids, vectors
    vectors.flush()
    del vectors
    return ids, np.load(out, mmap_mode="r")


def _shard_name(i: int, total: int) -> str:
    return f"shard-{i:06d}-of-{total:06d}.parquet"


def _shard_dim(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return int(pq.read_schema(path).field("embedding").type.list_size)
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise CorruptFileError(f"{path}: not a readable shard ({error}); delete it and rerun.") from None


def _cast_embeddings(table, dtype: str):
    import pyarrow as pa

    if np.dtype(dtype) == np.float32:
        return table
    column = table.column("embedding").combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False).astype(dtype)
    cast = pa.FixedSizeListArray.from_arrays(pa.array(values), column.type.list_size)
    return table.set_column(table.schema.get_field_index("embedding"), "embedding", cast)


def _write_parquet(table, path: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, path)


@contextlib.contextmanager
def _ray_session(address: str | None) -> Iterator[None]:
    """Use the Ray the caller initialised; else connect to `address` (or start a local Ray) for the block."""
    ray = _import_ray()
    if ray.is_initialized():
        yield
        return
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except ConnectionError as error:
        raise ConnectionError(f"no Ray cluster at --address {address} ({error}); start one with `ray start "
                              "--head`, or leave --address out to run on a local Ray.") from None
    try:
        yield
    finally:
        ray.shutdown()


def _run(dataset, todo, column, id_column, rows_per_shard, encoder, num_workers, num_gpus, progress):
    """Yield `(shard, table)` for every shard in `todo` as its rows come back from the workers."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = progress
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # our bar shows progress; keep stderr for problems
    arrow = dataset.select_columns(list(dict.fromkeys([id_column, column]))).with_format("arrow")
    blocks, expected = [], {}
    for shard in todo:
        start = shard * rows_per_shard
        table = arrow[start : start + rows_per_shard]
        if not pa.types.is_string(table.schema.field(column).type) and not pa.types.is_large_string(
                table.schema.field(column).type):
            raise InputError(f"column {column!r} holds {table.schema.field(column).type}; the Ray engine embeds "
                             "text (reports, or image paths).")
        expected[shard] = len(table)
        table = pa.table({"id": pc.cast(table.column(id_column), pa.string()), column: table.column(column)})
        blocks.append(table.append_column("shard", pa.array([shard] * len(table), pa.int64()))
                      .append_column("row", pa.array(range(start, start + len(table)), pa.int64())))
    workers = min(num_workers or _default_workers(ray, num_gpus), len(todo))
    resources = {"num_gpus": num_gpus} if num_gpus else {"num_cpus": 1}
    embedded = ray.data.from_arrow(blocks).map_batches(
        _EmbedBlock, fn_constructor_args=(encoder, column), batch_size=None, batch_format="pyarrow",
        compute=ActorPoolStrategy(size=workers), **resources,
    )
    # Ray may split or merge blocks on the way back: rows are gathered per shard until the shard is complete.
    pending: dict[int, list] = {}
    received: dict[int, int] = {}
    try:
        for batch in embedded.iter_batches(batch_size=None, batch_format="pyarrow"):
            for shard in pc.unique(batch.column("shard")).to_pylist():
                part = batch.filter(pc.equal(batch.column("shard"), shard))
                pending.setdefault(shard, []).append(part)
                received[shard] = received.get(shard, 0) + part.num_rows
                if received[shard] == expected[shard]:
                    table = pa.concat_tables(pending.pop(shard)).sort_by("row")
                    yield shard, table.select(["id", "text_sha256", "embedding"])
    except ray.exceptions.RayError as error:
        found = re.search(re.escape(_FAILURE_MARK) + r"(.*)", str(error))
        if found is None:
            raise
        raise RayWorkerError(f"a Ray worker failed on {found.group(1).strip()}; the finished shards are kept: fix "
                             "the cause and rerun to resume.") from None
    missing = sorted(set(expected) - set(received) | {s for s in received if received[s] != expected[s]})
    if missing:
        raise RayWorkerError(f"Ray returned no complete result for shards {missing[:5]}; rerun to resume.")


def _default_workers(ray, num_gpus: float) -> int:
    resources = ray.cluster_resources()
    if num_gpus:
        workers = int(resources.get("GPU", 0) // num_gpus)
        if workers < 1:
            raise InputError(f"--num-gpus-per-worker {num_gpus:g}: the Ray cluster has {resources.get('GPU', 0):g} "
                             "GPUs; lower it, or run on CPU workers without it.")
        return workers
    return max(1, int(resources.get("CPU", 1)))
