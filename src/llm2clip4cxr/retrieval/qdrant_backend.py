"""Qdrant as an index backend (qdrant-client): a shared search service instead of a folder of files.

`QdrantIndex` wraps one collection of a Qdrant server (`url=`) or of the client's embedded local mode
(`path=`, a folder; one process at a time, exact search). It mirrors `EmbeddingIndex` where it can:
`add(vectors, ids, metadata)` and `search(queries, k)` with string ids and `(id, score, metadata)` hits,
cosine similarity, and an `info` dict (the encoder and instruction of the vectors) that a search checks.

- The collection is created with the vectors' size and cosine distance, HNSW settings (`hnsw_m`,
  `ef_construct`) and optional scalar int8 quantization (4x less vector memory; the server re-scores the
  candidates with the original vectors). The embedded mode records the settings but searches exactly.
- Points: the id is a UUID derived from the report id (`point_id`), so adding the same report again
  overwrites it instead of duplicating it, and a rerun of a build resumes; the payload is `{"id": id,
  **metadata}`. Upserts go in batches through qdrant-client's `upload_collection`, which retries a failed
  batch (`max_retries`).
- `info` lives in the collection's metadata (Qdrant >= 1.16 keeps a JSON object per collection), so every
  client of the collection knows which encoder its vectors need; `ensure` refuses to add vectors of another
  dimension or encoder to an existing collection.
- `search(..., filter={"view": "PA", "split": ["test", "validation"]})`: payload filters, a value or a list
  of accepted values per key, all keys must match. On a server, the metadata keys given at creation get
  keyword payload indexes, so filtered HNSW search stays fast.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import InputError, OutputLockedError, ServiceUnavailableError

__all__ = ["QUANTIZATIONS", "QdrantIndex", "collection_settings", "payload_filter", "point_id"]

QUANTIZATIONS = ("none", "int8")
_METADATA_KEY = "llm2clip4cxr"
_FORMAT_VERSION = 1
# Namespace of the point UUIDs: uuid5(namespace, report id) is the same on every machine and run.
_POINT_NAMESPACE = uuid.UUID("3f0f5d1e-6f57-4c41-9d0a-2a8c1c5e7b11")


def point_id(id_: str) -> str:
    """The Qdrant point id (a UUID string) of a report id; Qdrant accepts only integers and UUIDs."""
    return str(uuid.uuid5(_POINT_NAMESPACE, id_))


def _import_qdrant():
    try:
        import qdrant_client
    except ImportError as error:
        raise ImportError('The Qdrant backend needs qdrant-client: pip install "llm2clip4cxr[qdrant]".') from error
    return qdrant_client


class QdrantIndex:
    """One Qdrant collection as a report index. Open it with `QdrantIndex.connect`.

    Example::

        with QdrantIndex.connect("reports", url="http://qdrant:6333") as index:
            index.ensure(dim=512, info={"encoder": {"model": None, "instruction": ""}})
            index.add(embeddings, ids=report_ids, metadata=[{"view": "PA"}] * len(report_ids))
            hits = index.search(query_embeddings, k=10, filter={"view": "PA"})
    """

    def __init__(self, client, collection: str, location: str, embedded: bool):
        self.client = client
        self.collection = collection
        self.location = location
        self.embedded = embedded

    @classmethod
    def connect(
        cls,
        collection: str,
        *,
        url: str | None = None,
        path: str | os.PathLike | None = None,
        api_key: str | None = None,
        timeout: int = 30,
        must_exist: bool = False,
    ) -> QdrantIndex:
        """Open the collection `collection` of the server at `url`, or of the embedded store in the folder `path`.

        Args:
            api_key: the server's API key (for `url`), if it has one.
            timeout: seconds per request to the server.
            must_exist: refuse a `path` folder that does not exist (instead of creating an empty store).

        Raises:
            ServiceUnavailableError: the server at `url` cannot be reached (the message names the URL).
            OutputLockedError: another process has the embedded store at `path` open.
        """
        if (url is None) == (path is None):
            raise InputError("give a Qdrant server URL (--qdrant-url) or a folder for embedded Qdrant "
                             "(--qdrant-path), exactly one of them.")
        if not collection or not collection.strip() or "/" in collection:
            raise InputError(f"--collection {collection!r}: give a collection name without '/'.")
        qdrant_client = _import_qdrant()
        if path is not None:
            if must_exist and not Path(path).is_dir():
                raise FileNotFoundError(f"--qdrant-path {path}: no such folder; build the collection first.")
            try:
                client = qdrant_client.QdrantClient(path=str(path))
            except RuntimeError as error:
                if "already accessed" not in str(error):
                    raise
                raise OutputLockedError(
                    f"--qdrant-path {path}: another process has this embedded Qdrant store open (the embedded mode "
                    "allows one at a time); wait for it, or serve the collection from a Qdrant server (--qdrant-url)."
                ) from None
            return cls(client, collection, f"embedded Qdrant at {path}", embedded=True)
        # check_compatibility=False: the version check warns on stderr when the server is down; the probe
        # below turns that case into one error instead.
        client = qdrant_client.QdrantClient(url=url, api_key=api_key, timeout=timeout, check_compatibility=False)
        index = cls(client, collection, f"the Qdrant server at {url}", embedded=False)
        index._call(client.get_collections)
        return index

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> QdrantIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self._call(self.client.count, self.collection, exact=True).count)

    def __repr__(self) -> str:
        return f"QdrantIndex(collection={self.collection!r}, location={self.location!r})"

    # ------------------------------------------------------------------ the collection

    def exists(self) -> bool:
        return bool(self._call(self.client.collection_exists, self.collection))

    @property
    def dim(self) -> int:
        """The vector size of the collection."""
        return int(self._vector_params().size)

    @property
    def info(self) -> dict:
        """What `create(info=...)` recorded with the collection (e.g. `{"encoder": {...}}`)."""
        metadata = self._config().metadata or {}
        saved = metadata.get(_METADATA_KEY)
        if not isinstance(saved, dict) or not isinstance(saved.get("info"), dict):
            raise InputError(f"collection {self.collection!r} of {self.location} was not built by llm2clip4cxr (its "
                             "metadata records no encoder); search it with the tool that built it.")
        return saved["info"]

    def create(
        self,
        dim: int,
        info: dict,
        *,
        hnsw_m: int = 16,
        ef_construct: int = 100,
        quantization: str = "none",
        payload_keys: Sequence[str] = (),
    ) -> None:
        """Create the collection: `dim`-d vectors, cosine distance, HNSW `hnsw_m` / `ef_construct`, scalar int8
        quantization with `quantization="int8"`, `info` in its metadata, keyword payload indexes on
        `payload_keys` (server only: the embedded mode has none)."""
        from qdrant_client import models

        for name, value in (("dim", dim), ("hnsw_m", hnsw_m), ("ef_construct", ef_construct)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise InputError(f"{name} must be a positive int, got {value!r}.")
        if quantization not in QUANTIZATIONS:
            raise InputError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}.")
        self._call(
            self.client.create_collection, self.collection, **collection_settings(
                int(dim), info, hnsw_m=hnsw_m, ef_construct=ef_construct, quantization=quantization),
        )
        if not self.embedded:
            for key in dict.fromkeys(["id", *payload_keys]):
                self._call(self.client.create_payload_index, self.collection, key, models.PayloadSchemaType.KEYWORD)

    def ensure(self, dim: int, info: dict, **settings) -> bool:
        """Create the collection (with `create`'s `settings`) unless it exists; an existing one must hold
        `dim`-d cosine vectors of the same `info`, else `InputError`. Returns whether it was created."""
        if not self.exists():
            self.create(dim, info, **settings)
            return True
        self.check(dim, info)
        return False

    def check(self, dim: int | None = None, info: dict | None = None) -> None:
        """Refuse (`InputError`) a collection whose vector size or recorded info differs from the given ones."""
        from qdrant_client import models

        params = self._vector_params()
        where = f"collection {self.collection!r} of {self.location}"
        if params.distance != models.Distance.COSINE:
            raise InputError(f"{where} uses {params.distance} distance, not cosine; choose another --collection.")
        if dim is not None and int(params.size) != int(dim):
            raise InputError(f"{where} holds {params.size}-d vectors, these are {dim}-d; choose another --collection "
                             "or delete that one.")
        if info is not None and self.info != info:
            raise InputError(f"{where} was built with {self.info}, not {info}; vectors of two encoders cannot be "
                             "searched together: choose another --collection or delete that one.")

    # ------------------------------------------------------------------ points

    def add(
        self,
        vectors,
        ids: Sequence[str],
        metadata: Sequence[Mapping] | None = None,
        *,
        batch_size: int = 256,
        max_retries: int = 3,
    ) -> None:
        """Upsert vectors with their string ids and metadata (payload), `batch_size` points per request, each
        request retried up to `max_retries` times. An id already in the collection is overwritten.

        `vectors` may be a `np.memmap`: it is read batch by batch."""
        vectors = vectors if isinstance(vectors, np.ndarray) else np.asarray(vectors)
        ids = list(ids)
        if vectors.ndim != 2 or vectors.shape[0] != len(ids):
            raise InputError(f"got vectors of shape {vectors.shape} for {len(ids)} ids; pass one row per id.")
        if vectors.shape[1] != self.dim:
            raise InputError(f"collection {self.collection!r} holds {self.dim}-d vectors, got {vectors.shape[1]}-d.")
        not_str = next((id_ for id_ in ids if not isinstance(id_, str)), None)
        if not_str is not None:
            raise TypeError(f"Ids must be strings, got {not_str!r} of type {type(not_str).__name__}.")
        if len(set(ids)) != len(ids):
            raise InputError("ids must be unique: a repeated id would overwrite its first point.")
        metadata = [{}] * len(ids) if metadata is None else list(metadata)
        if len(metadata) != len(ids):
            raise InputError(f"got {len(metadata)} metadata entries for {len(ids)} ids.")
        if any("id" in entry for entry in metadata):
            raise InputError("metadata may not have an 'id' key: the payload's 'id' is the report id.")
        payloads = ({"id": id_, **entry} for id_, entry in zip(ids, metadata))
        self._call(
            self.client.upload_collection, self.collection, vectors=vectors, payload=payloads,
            ids=(point_id(id_) for id_ in ids), batch_size=batch_size, max_retries=max_retries, wait=True,
        )

    def search(
        self, queries, k: int, filter: Mapping[str, str | Sequence[str]] | None = None, hnsw_ef: int | None = None
    ) -> list[list[tuple[str, float, dict]]]:
        """Top-k hits per query as `(id, cosine, metadata)` tuples, best first, among the points whose payload
        matches `filter` (a value, or a list of accepted values, per key). `hnsw_ef`: the server's search beam."""
        from qdrant_client import models

        queries = np.asarray(queries, dtype=np.float32)
        queries = queries[None, :] if queries.ndim == 1 else queries
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InputError(f"collection {self.collection!r} holds {self.dim}-d vectors; got queries of shape "
                             f"{queries.shape}.")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive int, got {k!r}.")
        query_filter = payload_filter(filter)
        params = models.SearchParams(hnsw_ef=hnsw_ef) if hnsw_ef else None
        requests = [models.QueryRequest(query=query.tolist(), limit=k, filter=query_filter, params=params,
                                        with_payload=True) for query in queries]
        responses = self._call(self.client.query_batch_points, self.collection, requests)
        return [[(point.payload["id"], float(point.score), {key: value for key, value in point.payload.items()
                                                               if key != "id"})
                 for point in response.points] for response in responses]

    # ------------------------------------------------------------------ internals

    def _config(self):
        return self._call(self.client.get_collection, self.collection).config

    def _vector_params(self):
        vectors = self._config().params.vectors
        if not hasattr(vectors, "size"):  # named vectors: not a collection this package made
            raise InputError(f"collection {self.collection!r} of {self.location} has named vectors "
                             f"{sorted(vectors or {})}; llm2clip4cxr makes and searches single-vector collections.")
        return vectors

    def _call(self, method, *args, **kwargs):
        """Call the client; a connection failure or an error answer becomes one error naming the location."""
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

        try:
            return method(*args, **kwargs)
        except ResponseHandlingException as error:
            reason = error.source if getattr(error, "source", None) is not None else error
            raise ServiceUnavailableError(
                f"cannot reach {self.location} ({_one_line(reason)}); is it running and is the URL right?"
            ) from None
        except UnexpectedResponse as error:
            if error.status_code in (401, 403):
                raise ServiceUnavailableError(
                    f"{self.location} refused the request ({error.status_code} {error.reason_phrase}); set "
                    "QDRANT_API_KEY to its API key."
                ) from None
            if error.status_code == 404:
                raise InputError(f"{self.location} has no collection {self.collection!r}; build it first "
                                 "(index build --backend qdrant).") from None
            raise InputError(f"{self.location} answered {error.status_code} {error.reason_phrase}: "
                             f"{_one_line(error.content.decode('utf-8', 'replace'))}") from None
        except ValueError as error:  # the embedded mode's "Collection ... not found"
            if "not found" in str(error).lower():
                raise InputError(f"{self.location} has no collection {self.collection!r}; build it first "
                                 "(index build --backend qdrant).") from None
            raise


def collection_settings(dim: int, info: dict, *, hnsw_m: int, ef_construct: int, quantization: str) -> dict:
    """The keyword arguments of `QdrantClient.create_collection` for a report collection."""
    from qdrant_client import models

    settings = {
        "vectors_config": models.VectorParams(size=dim, distance=models.Distance.COSINE),
        "hnsw_config": models.HnswConfigDiff(m=int(hnsw_m), ef_construct=int(ef_construct)),
        "metadata": {_METADATA_KEY: {"format": _FORMAT_VERSION, "info": info}},
    }
    if quantization == "int8":
        # quantile 0.99 clips the 1% extreme values, the usual setting; always_ram keeps the codes in memory.
        settings["quantization_config"] = models.ScalarQuantization(scalar=models.ScalarQuantizationConfig(
            type=models.ScalarType.INT8, quantile=0.99, always_ram=True))
    return settings


def payload_filter(filter: Mapping[str, str | Sequence[str]] | None):
    """`{"key": value or [values]}` -> a Qdrant `Filter` that every key must match (None: no filter)."""
    from qdrant_client import models

    if not filter:
        return None
    conditions = []
    for key, value in filter.items():
        if isinstance(value, (list, tuple)):
            match = models.MatchAny(any=list(value))
        else:
            match = models.MatchValue(value=value)
        conditions.append(models.FieldCondition(key=key, match=match))
    return models.Filter(must=conditions)


def _one_line(error) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
