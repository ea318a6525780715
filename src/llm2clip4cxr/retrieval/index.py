"""A FAISS vector index over embeddings, with string ids, JSON metadata and a float16 vector store.

Choosing `kind` (the recall / speed / memory trade-off):

- "flat" (`IndexFlatIP`): exact search; every query scans all N vectors, O(N * dim). Recall is 1 by
  definition. No build cost beyond a copy. Right for evaluation and for up to about 1M vectors.
- "hnsw" (`IndexHNSWFlat`, inner product): a navigable graph, search cost roughly
  O(ef_search * hnsw_m * dim * log N). `ef_search` is the search-time knob: higher means better
  recall and slower queries. `hnsw_m` (links per vector) raises recall at a given `ef_search` at the
  cost of memory (about hnsw_m * 8 bytes per vector on top of the float32 vectors) and build time;
  `ef_construction` raises graph quality and build time. Build is the slow part (minutes per million
  512-d vectors on a few cores); vectors cannot be removed.
- "ivf" (`IndexIVFFlat`, inner product): k-means into `nlist` cells; a query scans the `nprobe`
  nearest cells, about nprobe / nlist of the data. Recall rises with `nprobe`. Needs training (done
  on the first `add`, or by an explicit `train()`); builds much faster than HNSW.
- "pq" (`IndexRefineFlat` over `IndexPQFastScan`): every vector is also coded in `pq_m` 4-bit
  sub-quantizers (`dim / 2` by default: 2 dims per code); a query scans all codes with SIMD lookup
  tables, then re-ranks its `k_factor * k` best candidates exactly on the float32 vectors. Recall rises
  with `k_factor` (the search-time knob). It does not rely on the data having structure, so it is
  the kind that stays fast and accurate on high-dimensional, unstructured embeddings. Needs training
  like "ivf" (k-means per sub-quantizer); memory is the float32 copy plus pq_m / 2 bytes per vector.

HNSW and IVF pay off when the embeddings have structure (real text and image embeddings do). On
uniformly random high-dimensional vectors the true neighbours are barely closer than everything else
and neither reaches high recall much faster than "flat"; "pq" does when queries come one to ten per
call (15-22x at recall@10 0.97 on 1M uniform 512-d vectors, 2 cores), less so for large query batches,
which exact search turns into one fast matrix product (3.5x at 1000 per call). `benchmarks/index.py`
measures all of them.

Vectors are L2-normalised by default, so scores are cosine similarities. FAISS keeps its own float32
copy; the vectors as indexed are also kept as float16 (in memory until `save()`, then as a read-only
memory-mapped `.npy` file), so the index can be retrained or inspected without re-encoding. A
`np.memmap` passed to `add()` is read in chunks and referenced rather than copied until `save()`, so
10M x 512 vectors need not be held in RAM twice.
"""

import json
import os
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import fileio
from ..defaults import DEFAULT_FUSION
from ..errors import CorruptFileError, InputError
from ..fileio import atomic_write_json, fsync_directory, honour_umask, is_partial_write, output_lock, sha256_file

INDEX_KINDS = ("flat", "hnsw", "ivf", "pq")

CONFIG_NAME = "index_config.json"
_FORMAT_VERSION = 2
_GENERATION_PREFIX = "generation-"
_GENERATION = re.compile(r"^generation-[0-9a-f]{12}$")
_FILE_NAMES = {"faiss": "index.faiss", "vectors": "vectors.npy", "metadata": "metadata.jsonl"}
# Optional BM25 statistics (hybrid search): files of one subfolder of the generation, each its own role.
_LEXICAL_DIR = "lexical"
_LEXICAL_ROLE = "lexical:"
# Format 1 kept its data files beside index_config.json; the first format-2 save removes them.
_V1_DATA_FILE = re.compile(r"^(index\.[0-9a-f]{12}\.faiss|vectors\.[0-9a-f]{12}\.npy|metadata\.[0-9a-f]{12}\.jsonl)$")
_LOAD_ATTEMPTS = 5

# Rows converted to float32 at a time when adding or saving: 64k x 512 x 4 B = 128 MiB.
_CHUNK_ROWS = 65536
# k-means gains nothing from more than 256 points per centroid (FAISS subsamples beyond that anyway).
_MAX_TRAIN_POINTS_PER_LIST = 256
_PQ_CENTROIDS = 16  # 2**4: the fast-scan kernels take 4-bit codes
_PQ_MIN_TRAINING = 256
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def _import_faiss():
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            'EmbeddingIndex needs FAISS; install it with `pip install "llm2clip4cxr[index]"` (faiss-cpu).'
        ) from error
    return faiss


class EmbeddingIndex:
    """Search embeddings by inner product (cosine by default), returning string ids and metadata.

    Args:
        dim: vector dimension.
        kind: "flat" (exact), "hnsw", "ivf" or "pq" (approximate); see the module docstring for the trade-off.
        normalize: L2-normalise added vectors and queries (cosine similarity). With False, raw inner
            products are used and vectors must fit float16 (|x| <= 65504) for the vector store.
        hnsw_m: HNSW links per vector (FAISS `M`).
        ef_construction: HNSW build-time beam width (FAISS `efConstruction`).
        ef_search: HNSW search-time beam width (FAISS `efSearch`); can be changed after building.
        nlist: IVF cell count; the first `add` (or `train`) needs at least this many vectors.
        nprobe: IVF cells scanned per query; can be changed after building.
        pq_m: "pq" sub-quantizers (4 bits each); must divide `dim`. Defaults to `dim // 2`.
        k_factor: "pq" candidates re-ranked exactly per result (`k_factor * k`); can be changed after building.

    Example::

        index = EmbeddingIndex(dim=512, kind="hnsw")
        index.add(report_embeddings, ids=report_ids, metadata=[{"split": "test"}] * len(report_ids))
        best_id, score, metadata = index.search(query_embeddings, k=10)[0][0]  # best hit of query 0
        index.save("reports.index")
        index = EmbeddingIndex.load("reports.index")
    """

    config_keys = (
        "dim", "kind", "normalize", "hnsw_m", "ef_construction", "ef_search", "nlist", "nprobe", "pq_m", "k_factor",
    )

    def __init__(
        self,
        dim: int,
        kind: str = "flat",
        normalize: bool = True,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 64,
        nlist: int = 1024,
        nprobe: int = 16,
        pq_m: int | None = None,
        k_factor: int = 50,
    ) -> None:
        if kind not in INDEX_KINDS:
            raise ValueError(f"`kind` must be one of {INDEX_KINDS}, got {kind!r}.")
        for name, value in (
            ("dim", dim), ("hnsw_m", hnsw_m), ("ef_construction", ef_construction),
            ("ef_search", ef_search), ("nlist", nlist), ("nprobe", nprobe), ("k_factor", k_factor),
        ):
            _check_positive_int(name, value)
        pq_m = dim // 2 if pq_m is None and isinstance(dim, (int, np.integer)) and dim > 1 else pq_m
        _check_positive_int("pq_m", pq_m)
        if kind == "pq" and dim % pq_m:
            raise ValueError(
                f"`pq_m` must divide `dim`={dim} (each sub-quantizer codes dim / pq_m values), got {pq_m}."
            )
        self.dim = int(dim)
        self.kind = kind
        self.normalize = bool(normalize)
        self.hnsw_m = int(hnsw_m)
        self.ef_construction = int(ef_construction)
        self._ef_search = int(ef_search)
        self.nlist = int(nlist)
        self._nprobe = int(nprobe)
        self.pq_m = int(pq_m)
        self._k_factor = int(k_factor)
        self._faiss = _import_faiss()
        self._index = self._new_faiss_index()
        self._ids: list[str] = []
        self._positions: dict[str, int] = {}
        self._metadata: list[dict | None] = []
        # Float16 vector store: (array, prepared) segments. prepared=False marks a caller's np.memmap
        # that is referenced as-is and converted (normalised, float16) whenever it is read.
        self._segments: list[tuple[np.ndarray, bool]] = []
        # What `save(info=...)` committed with the index (e.g. the encoder of its vectors).
        self.info: dict = {}
        # BM25 statistics of the indexed texts, in row order (`set_lexical`): saved in the same generation.
        self.lexical = None

    # ------------------------------------------------------------------ properties

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, id_: object) -> bool:
        return id_ in self._positions

    def __repr__(self) -> str:
        return f"EmbeddingIndex(dim={self.dim}, kind={self.kind!r}, size={len(self)}, normalize={self.normalize})"

    @property
    def ids(self) -> list[str]:
        """Ids in insertion order (a copy); position i is what `search_raw` returns as i."""
        return list(self._ids)

    @property
    def is_trained(self) -> bool:
        """False only for an "ivf" or "pq" index that has not seen `train()` or a first `add()` yet."""
        return bool(self._index.is_trained)

    @property
    def ef_search(self) -> int:
        """HNSW search beam width: raise for recall, lower for speed. Takes effect on the next search."""
        return self._ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        _check_positive_int("ef_search", value)
        self._ef_search = int(value)
        if self.kind == "hnsw":
            self._index.hnsw.efSearch = self._ef_search

    @property
    def nprobe(self) -> int:
        """IVF cells scanned per query: raise for recall, lower for speed. Takes effect on the next search."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        _check_positive_int("nprobe", value)
        self._nprobe = int(value)
        if self.kind == "ivf":
            self._index.nprobe = self._nprobe

    @property
    def k_factor(self) -> int:
        """"pq" re-ranking depth (k_factor * k candidates): raise for recall, lower for speed."""
        return self._k_factor

    @k_factor.setter
    def k_factor(self, value: int) -> None:
        _check_positive_int("k_factor", value)
        self._k_factor = int(value)
        if self.kind == "pq":
            self._index.k_factor = float(self._k_factor)

    def get_config_dict(self) -> dict[str, Any]:
        """The constructor arguments, as saved in `index_config.json`."""
        return {key: getattr(self, key) for key in self.config_keys}

    # ------------------------------------------------------------------ building

    def add(self, vectors, ids: Sequence[str], metadata: Sequence[dict] | None = None) -> None:
        """Append vectors with their string ids and optional JSON-serialisable metadata dicts.

        Can be called repeatedly. Inputs are checked in full before anything is added, so a failed
        call leaves the index unchanged. Large inputs (e.g. a `np.memmap` of 10M rows) are processed
        in chunks of 64k rows; a `np.memmap` is referenced, not copied, until `save()`.

        Raises:
            ValueError: wrong shape or dimension, a repeated id (within `ids` or already indexed),
                mismatched lengths, non-finite or zero vectors (with normalisation), metadata that is
                not a JSON-serialisable dict, or a first "ivf" ("pq") add with fewer than `nlist` (256)
                vectors.
            TypeError: an id that is not a string.
        """
        if self.lexical is not None:
            raise InputError("This index has BM25 statistics of its current texts; add() all vectors first, then "
                             "call set_lexical() with every text.")
        vectors = self._check_matrix(vectors, "vectors")
        ids = list(ids)
        if len(ids) != len(vectors):
            raise ValueError(f"Got {len(vectors)} vectors but {len(ids)} ids; pass one id per vector.")
        self._check_new_ids(ids)
        metadata = self._check_metadata(metadata, len(ids))
        if not len(ids):
            return
        for start, chunk in _chunks(vectors):  # validate everything first: FAISS cannot undo a partial add
            self._prepare(chunk, "vectors", row_offset=start)
        if not self._index.is_trained:
            self._train_faiss(self._index, _training_sample(vectors, self._training_cells))

        referenced = isinstance(vectors, np.memmap)
        stored = None if referenced else np.empty(vectors.shape, dtype=np.float16)
        for start, chunk in _chunks(vectors):
            prepared = self._prepare(chunk)
            self._index.add(prepared)
            if stored is not None:
                stored[start : start + len(prepared)] = prepared
        self._segments.append((vectors, False) if referenced else (stored, True))
        for id_ in ids:
            self._positions[id_] = len(self._ids)
            self._ids.append(id_)
        self._metadata.extend(metadata)

    def train(self, vectors=None) -> None:
        """Train an "ivf" or "pq" index: on `vectors` if given, else on a sample of the stored vectors.

        If the index already holds vectors, it is rebuilt: trained afresh, then the stored vectors are
        re-added in chunks (ids and metadata are kept). They come from the float16 store, so scores may
        change in the fourth decimal and near-ties may swap. "flat" and "hnsw" need no training; for
        them this is a no-op.
        """
        if self.kind not in ("ivf", "pq"):
            return
        if vectors is None:
            if not len(self):
                raise ValueError('Nothing to train on: pass `vectors` to train(), or add() vectors first.')
            sample = self.get_vectors(positions=_sample_positions(len(self), self._training_cells)).astype(np.float32)
        else:
            sample = _training_sample(self._check_matrix(vectors, "vectors"), self._training_cells)
        index = self._new_faiss_index()
        self._train_faiss(index, sample)
        for chunk in self._iter_store_chunks():
            index.add(chunk.astype(np.float32))
        self._index = index

    # ------------------------------------------------------------------ searching

    def search_raw(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k as arrays: `(scores, positions)`, both `(num_queries, k)`, best first.

        `positions` index `self.ids`; where fewer than k vectors are found, the position is -1 and the
        score -inf.
        """
        _check_positive_int("k", k)
        if not len(self):
            raise ValueError("The index is empty; add() vectors before searching.")
        queries = self._check_matrix(queries, "queries")
        scores, positions = self._index.search(self._prepare(queries, "queries"), int(k))
        scores[positions < 0] = -np.inf
        return scores, positions

    def search(self, queries, k: int) -> list[list[tuple[str, float, dict]]]:
        """Top-k hits per query as `(id, score, metadata)` tuples, best first.

        `queries` is `(num_queries, dim)` (a single `(dim,)` vector is treated as one query). A query
        gets fewer than k hits when the index holds fewer than k vectors. Metadata dicts are copies.
        """
        scores, positions = self.search_raw(queries, k)
        results = []
        for row_scores, row_positions in zip(scores.tolist(), positions.tolist()):
            results.append(
                [
                    (self._ids[position], score, dict(self._metadata[position] or {}))
                    for score, position in zip(row_scores, row_positions)
                    if position >= 0
                ]
            )
        return results

    def set_lexical(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75) -> None:
        """Keep BM25 statistics (bm25s) of `texts`, one per indexed vector in the same order, for
        `search_hybrid`; `save()` commits them with the vectors."""
        from .hybrid import BM25Index

        texts = list(texts)
        if len(texts) != len(self):
            raise ValueError(f"set_lexical() needs one text per indexed vector: got {len(texts)} for {len(self)}.")
        self.lexical = BM25Index(k1, b).index(texts)

    def search_hybrid(
        self,
        queries,
        query_texts: Sequence[str],
        k: int,
        method: str = DEFAULT_FUSION,
        weights: tuple[float, float] | None = None,
        candidates: int | None = None,
    ) -> list[list[tuple[str, float, dict]]]:
        """Top-k hits per query fusing dense similarity with BM25 (`hybrid.fuse`), as `(id, fused score,
        metadata)` tuples, best first.

        Each query's candidates are the union of its `candidates` best by vector (default max(10 k, 100)) and
        its `candidates` best by BM25; both scores are computed exactly for every candidate (the vectors
        are stored), and the fusion ranks within that union. Needs `set_lexical()` (or a loaded index that
        was saved with it).
        """
        from .hybrid import DEFAULT_WEIGHTS, fuse

        if self.lexical is None:
            raise InputError("This index has no BM25 statistics; build it with lexical statistics (index build "
                             "saves them) or call set_lexical(texts) first.")
        _check_positive_int("k", k)
        queries = self._check_matrix(queries, "queries")
        query_texts = list(query_texts)
        if len(query_texts) != len(queries):
            raise ValueError(f"{len(queries)} query vectors but {len(query_texts)} query texts.")
        candidates = min(len(self), candidates or max(10 * k, 100))
        _, dense_positions = self.search_raw(queries, candidates)
        lexical_scores = self.lexical.scores(query_texts)
        prepared = self._prepare(queries, "queries")
        results = []
        for row, query in enumerate(prepared):
            lexical_top = np.argpartition(-lexical_scores[row], candidates - 1)[:candidates]
            union = np.union1d(dense_positions[row][dense_positions[row] >= 0], lexical_top)
            dense = self.get_vectors(positions=union).astype(np.float32) @ query
            fused = fuse(dense[None, :], lexical_scores[row, union][None, :], method, weights or DEFAULT_WEIGHTS)[0]
            best = np.argsort(-fused, kind="stable")[:k]
            results.append(
                [(self._ids[union[i]], float(fused[i]), dict(self._metadata[union[i]] or {})) for i in best]
            )
        return results

    def get_vectors(self, ids: Sequence[str] | None = None, positions=None) -> np.ndarray:
        """Stored float16 vectors (normalised if `normalize`), by id or position, or all of them.

        All of them after `save()`/`load()` is a read-only memory map (no copy); otherwise a copy.
        """
        if ids is not None and positions is not None:
            raise ValueError("Pass `ids` or `positions` to get_vectors(), not both.")
        if ids is not None:
            missing = [id_ for id_ in ids if id_ not in self._positions]
            if missing:
                raise KeyError(f"Ids not in the index: {missing[:5]}.")
            positions = [self._positions[id_] for id_ in ids]
        if positions is None:
            if len(self._segments) == 1 and self._segments[0][1]:
                return self._segments[0][0]
            return np.concatenate([*self._iter_store_chunks(), np.empty((0, self.dim), np.float16)])
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty((len(positions), self.dim), dtype=np.float16)
        start = 0
        for array, prepared in self._segments:
            selected = np.flatnonzero((positions >= start) & (positions < start + len(array)))
            if selected.size:
                rows = array[positions[selected] - start]
                out[selected] = rows if prepared else self._prepare(rows).astype(np.float16)
            start += len(array)
        return out

    # ------------------------------------------------------------------ persistence

    def save(
        self,
        directory: str | os.PathLike,
        *,
        info: dict | None = None,
        wait: bool = True,
        on_wait: Callable[[Path], None] | None = None,
    ) -> None:
        """Write the index to `directory` as one unit: a reader or a crash sees the old index or the new one.

        Every save writes a new generation folder, `generation-<token>/`, holding `index.faiss` (the FAISS
        index), `vectors.npy` (float16 vectors, filled in chunks through `np.lib.format.open_memmap`) and
        `metadata.jsonl` (one `{"id", "metadata"}` object per vector, in order), each fsynced. Then
        `index_config.json`, which names the generation, the SHA-256 and size of each of its files, the
        index settings and `info`, is replaced through a temp file and one `os.replace`: that rename is the
        commit point. Older generations (and temp files of killed saves) are deleted last. A save killed
        at any point leaves the previous index loadable. Afterwards the in-memory vector store is swapped
        for a memory map of the saved vectors, which releases its RAM.

        Two saves to one folder (threads or processes) take turns through `output_lock(directory)`
        (a `filelock` lock file `directory/.lock`); the last to commit wins, whole.

        Args:
            directory: the index folder (created if missing).
            info: JSON-serialisable dict committed with the index, e.g. the encoder its vectors came from;
                `load()` returns it as `index.info`.
            wait: if another process is saving to `directory`, wait for it (default), else raise
                `OutputLockedError`.
            on_wait: called with the lock file before waiting (e.g. to tell the user).

        Raises:
            OSError: a file could not be written (e.g. the disk is full); the previous index is kept.
        """
        directory = Path(directory)
        info = _check_info(info)
        directory.mkdir(parents=True, exist_ok=True)
        with output_lock(directory, inside=True, wait=wait, on_wait=on_wait):
            generation = directory / f"{_GENERATION_PREFIX}{uuid.uuid4().hex[:12]}"
            generation.mkdir()
            _step("generation-created")
            try:
                files = {}
                for role, write in (("faiss", self._write_faiss), ("vectors", self._write_vectors),
                                    ("metadata", self._write_metadata)):
                    path = generation / _FILE_NAMES[role]
                    _write_data_file(path, write)
                    relative = f"{generation.name}/{path.name}"
                    files[role] = {"path": relative, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
                    _step(f"{role}-written")
                if self.lexical is not None:
                    lexical_dir = generation / _LEXICAL_DIR
                    self.lexical.save(lexical_dir)
                    for path in sorted(lexical_dir.iterdir()):
                        relative = f"{generation.name}/{_LEXICAL_DIR}/{path.name}"
                        files[f"{_LEXICAL_ROLE}{path.name}"] = {
                            "path": relative, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
                    fsync_directory(lexical_dir)
                    _step("lexical-written")
                fsync_directory(generation)
                config = {
                    "format_version": _FORMAT_VERSION, "size": len(self), "files": files,
                    "config": self.get_config_dict(), "info": info,
                }
                atomic_write_json(directory / CONFIG_NAME, config, indent=2)
            except BaseException:
                shutil.rmtree(generation, ignore_errors=True)  # never committed: nothing refers to it
                raise
            _step("committed")
            _remove_stale(directory, keep=generation.name)
        self.info = info
        if len(self):
            self._segments = [(np.load(generation / _FILE_NAMES["vectors"], mmap_mode="r"), True)]

    @classmethod
    def load(cls, directory: str | os.PathLike, *, verify: bool = True) -> "EmbeddingIndex":
        """Load an index written by `save()`; vectors are memory-mapped, the FAISS index is read into RAM.

        With `verify` (the default) every file is checked against the SHA-256 that `index_config.json`
        committed with it (one sequential read of each file), so a truncated, edited, reordered or
        swapped file is refused rather than searched. If a writer commits a new generation while this
        reads, the new one is read.

        Raises:
            FileNotFoundError: `directory` has no `index_config.json`.
            CorruptFileError: a file is missing, unreadable, disagrees with its hash or with the other files.
            InputError: the folder was written by a version whose format this one does not read.
        """
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(
                f"No {CONFIG_NAME} in {directory}; is it a directory written by EmbeddingIndex.save()?"
            )
        for _ in range(_LOAD_ATTEMPTS):
            raw = config_path.read_bytes()
            saved = _parse_config(raw, config_path, verify)
            try:
                return cls._load_committed(directory, saved, verify)
            except FileNotFoundError as error:
                if config_path.read_bytes() != raw:
                    continue  # a writer committed a new generation and removed this one: read the new one
                raise CorruptFileError(
                    f"{error.filename or directory}: missing, but {config_path} refers to it; the index folder was "
                    "damaged (files deleted or moved): rebuild it."
                ) from None
        raise OSError(f"{directory}: the index changed {_LOAD_ATTEMPTS} times while being read; try again.")

    @classmethod
    def _load_committed(cls, directory: Path, saved: dict, verify: bool) -> "EmbeddingIndex":
        config_path = directory / CONFIG_NAME
        try:
            index = cls(**saved["config"])
        except (TypeError, ValueError) as error:
            raise CorruptFileError(f"{config_path}: invalid index settings in \"config\" ({error}).") from None
        size, files = saved["size"], saved["files"]
        paths = {role: directory / entry["path"] for role, entry in files.items()}
        if verify:
            for role, path in paths.items():
                _verify_file(path, files[role], config_path)

        def inconsistent(what: str) -> CorruptFileError:
            return CorruptFileError(f"{directory} is inconsistent: {what}, but {CONFIG_NAME} says {size} vectors.")

        try:
            index._index = index._faiss.read_index(str(paths["faiss"]))
        except RuntimeError as error:
            if not paths["faiss"].is_file():
                raise FileNotFoundError(2, "No such file", str(paths["faiss"])) from None
            raise CorruptFileError(f"{paths['faiss']}: not a readable FAISS index ({_first_line(error)}).") from None
        expected = index._new_faiss_index()
        if type(index._index) is not type(expected) or index._index.metric_type != expected.metric_type:
            raise CorruptFileError(
                f"{paths['faiss']} holds a {type(index._index).__name__}, but {CONFIG_NAME} says kind "
                f"{index.kind!r} ({type(expected).__name__}); the files do not belong together: rebuild the index."
            )
        if index._index.ntotal != size or index._index.d != index.dim:
            raise inconsistent(f"{paths['faiss'].name} holds {index._index.ntotal} vectors of dim {index._index.d}")
        # Search settings are re-applied from the config rather than trusted from the FAISS file.
        index.ef_search = index.ef_search
        index.nprobe = index.nprobe
        index.k_factor = index.k_factor
        if size:
            try:
                vectors = np.load(paths["vectors"], mmap_mode="r")
            except ValueError as error:
                raise CorruptFileError(f"{paths['vectors']}: not a readable .npy file ({error}).") from None
            if vectors.shape != (size, index.dim) or vectors.dtype != np.float16:
                raise inconsistent(f"{paths['vectors'].name} is {vectors.dtype} of shape {vectors.shape}")
            index._segments = [(vectors, True)]
        index._ids, index._metadata = _read_metadata(paths["metadata"])
        if len(index._ids) != size:
            raise inconsistent(f"{paths['metadata'].name} has {len(index._ids)} lines")
        index._positions = {id_: position for position, id_ in enumerate(index._ids)}
        if len(index._positions) != size:
            repeated = next(id_ for id_, count in Counter(index._ids).items() if count > 1)
            raise CorruptFileError(f"{paths['metadata']} repeats the id {repeated!r}; ids must be unique.")
        index.info = saved.get("info") or {}
        lexical = [role for role in files if role.startswith(_LEXICAL_ROLE)]
        if lexical:
            from .hybrid import BM25Index

            try:
                index.lexical = BM25Index.load(paths[lexical[0]].parent)
            except ValueError as error:
                raise CorruptFileError(str(error)) from None
            if index.lexical.size != size:
                raise inconsistent(f"its BM25 statistics cover {index.lexical.size} texts")
        return index

    # ------------------------------------------------------------------ internals

    def _new_faiss_index(self):
        faiss = self._faiss
        if self.kind == "flat":
            return faiss.IndexFlatIP(self.dim)
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.ef_construction
            index.hnsw.efSearch = self._ef_search
            return index
        if self.kind == "pq":
            # 4-bit codes are what the SIMD fast-scan kernels take; the refine stage keeps float32 vectors
            # and re-ranks the k_factor * k best code distances exactly.
            index = faiss.IndexRefineFlat(faiss.IndexPQFastScan(self.dim, self.pq_m, 4, faiss.METRIC_INNER_PRODUCT))
            index.k_factor = float(self._k_factor)
            return index
        # FAISS's Python wrapper keeps the quantizer alive as long as the IVF index.
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = self._nprobe
        # Unit vectors: spherical k-means keeps centroids on the sphere, so cells match cosine neighbourhoods.
        index.cp.spherical = self.normalize
        return index

    @property
    def _training_cells(self) -> int:
        """k-means cells to train: IVF's `nlist`, or the 16 centroids of each 4-bit PQ sub-quantizer."""
        return self.nlist if self.kind == "ivf" else _PQ_CENTROIDS

    def _train_faiss(self, index, sample: np.ndarray) -> None:
        """Train `index` on raw (not yet normalised) sample rows."""
        if self.kind == "pq" and len(sample) < _PQ_MIN_TRAINING:
            raise ValueError(
                f"A 'pq' index needs at least {_PQ_MIN_TRAINING} training vectors (k-means of {_PQ_CENTROIDS} "
                f"centroids per sub-quantizer), got {len(sample)}. Add more vectors at once, or call train() "
                "with a larger sample."
            )
        if self.kind == "ivf" and len(sample) < self.nlist:
            raise ValueError(
                f"An 'ivf' index with nlist={self.nlist} needs at least {self.nlist} training vectors "
                f"(ideally 30-256 per cell), got {len(sample)}. Add more vectors at once, call train() "
                "with a larger sample, or lower `nlist`."
            )
        index.train(np.concatenate([self._prepare(chunk, "vectors", start) for start, chunk in _chunks(sample)]))

    def _check_matrix(self, array, name: str) -> np.ndarray:
        if not isinstance(array, np.ndarray):
            array = np.asarray(array)
        if array.ndim == 1:
            array = array[None, :]
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise ValueError(f"`{name}` must have shape (n, {self.dim}) for this index, got {array.shape}.")
        if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"`{name}` must be numeric, got dtype {array.dtype}.")
        return array

    def _prepare(self, chunk: np.ndarray, name: str = "vectors", row_offset: int = 0) -> np.ndarray:
        """Float32, C-contiguous, finite and (if `normalize`) unit-norm rows; raises on bad rows."""
        chunk = np.array(chunk, dtype=np.float32, order="C", copy=True)
        bad = ~np.isfinite(chunk).all(axis=1)
        if bad.any():
            raise ValueError(f"`{name}` row {row_offset + int(np.flatnonzero(bad)[0])} has NaN or inf values.")
        if self.normalize:
            norms = np.linalg.norm(chunk, axis=1, keepdims=True)
            zero = np.flatnonzero(norms[:, 0] == 0)
            if zero.size:
                raise ValueError(f"`{name}` row {row_offset + int(zero[0])} is all zeros and cannot be normalised.")
            chunk /= norms
        elif name == "vectors" and chunk.size and float(np.abs(chunk).max()) > _FLOAT16_MAX:
            raise ValueError(
                f"With normalize=False, vectors must fit float16 (|x| <= {_FLOAT16_MAX:g}) for the vector store; "
                f"got a value of magnitude {float(np.abs(chunk).max()):g}. Rescale them or use normalize=True."
            )
        return chunk

    def _check_new_ids(self, ids: list) -> None:
        not_str = next((id_ for id_ in ids if not isinstance(id_, str)), None)
        if not_str is not None:
            raise TypeError(f"Ids must be strings, got {not_str!r} of type {type(not_str).__name__}.")
        if len(set(ids)) != len(ids):
            repeated = next(id_ for id_, count in Counter(ids).items() if count > 1)
            raise ValueError(f"Id {repeated!r} appears more than once in this add(); ids must be unique.")
        existing = next((id_ for id_ in ids if id_ in self._positions), None)
        if existing is not None:
            raise ValueError(f"Id {existing!r} is already in the index; ids must be unique across add() calls.")

    @staticmethod
    def _check_metadata(metadata: Sequence[dict] | None, count: int) -> list[dict | None]:
        if metadata is None:
            return [None] * count
        metadata = list(metadata)
        if len(metadata) != count:
            raise ValueError(f"Got {len(metadata)} metadata entries for {count} ids; pass one dict per id (or None).")
        for i, entry in enumerate(metadata):
            if not isinstance(entry, dict):
                raise ValueError(f"metadata[{i}] must be a dict, got {type(entry).__name__}.")
            try:
                json.dumps(entry)
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"metadata[{i}] is not JSON-serialisable ({error}); it is saved as JSON lines."
                ) from error
        return metadata

    def _iter_store_chunks(self) -> Iterator[np.ndarray]:
        for array, prepared in self._segments:
            for _, chunk in _chunks(array):
                yield np.asarray(chunk) if prepared else self._prepare(chunk).astype(np.float16)

    def _write_faiss(self, path: Path) -> None:
        self._faiss.write_index(self._index, str(path))

    def _write_vectors(self, path: Path) -> None:
        if not len(self):  # older numpy cannot memory-map a zero-size array
            with path.open("wb") as handle:
                np.save(handle, np.empty((0, self.dim), dtype=np.float16))
            return
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(len(self), self.dim))
        start = 0
        for chunk in self._iter_store_chunks():
            out[start : start + len(chunk)] = chunk
            start += len(chunk)
        out.flush()
        del out

    def _write_metadata(self, path: Path) -> None:
        with path.open("w", encoding="utf-8") as handle:
            for id_, metadata in zip(self._ids, self._metadata):
                handle.write(json.dumps({"id": id_, "metadata": metadata}, ensure_ascii=False) + "\n")


def _step(name: str) -> None:
    fileio._step(f"index:{name}")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[-1].strip() if lines else type(error).__name__


def _check_info(info) -> dict:
    if info is None:
        return {}
    if not isinstance(info, dict):
        raise ValueError(f"`info` must be a dict, got {type(info).__name__}.")
    try:
        json.dumps(info)
    except (TypeError, ValueError) as error:
        raise ValueError(f"`info` is not JSON-serialisable ({error}); it is saved in {CONFIG_NAME}.") from error
    return info


def _write_data_file(path: Path, write: Callable[[Path], None]) -> None:
    """Write one file of a generation and fsync it. FAISS reports a failed write (e.g. a full disk) as a
    RuntimeError; it becomes the OSError it is."""
    try:
        write(path)
    except RuntimeError as error:
        raise OSError(f"could not write {path}: {_first_line(error)}") from error
    honour_umask(path)
    with path.open("rb+") as handle:
        os.fsync(handle.fileno())


def _remove_stale(directory: Path, keep: str) -> None:
    """Delete what no committed index refers to: older generations, format-1 data files, temp files."""
    for entry in directory.iterdir():
        if entry.name == keep:
            continue
        if entry.is_dir() and _GENERATION.match(entry.name):
            shutil.rmtree(entry, ignore_errors=True)  # an index loaded from it keeps its memory map (POSIX)
        elif entry.is_file() and (_V1_DATA_FILE.match(entry.name) or is_partial_write(entry.name)):
            entry.unlink(missing_ok=True)
    _step("cleaned")


def _parse_config(raw: bytes, config_path: Path, verify: bool) -> dict:
    """index_config.json, checked for the shape `save()` gives it (a tampered file gets a clear error)."""
    try:
        saved = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptFileError(
            f"{config_path}: not valid UTF-8 JSON ({error}); the index folder is damaged."
        ) from None
    if not isinstance(saved, dict):
        raise CorruptFileError(f"{config_path}: expected a JSON object, got {type(saved).__name__}.")
    version = saved.get("format_version")
    if version == 1:
        if verify:
            raise InputError(
                f"{config_path}: format 1, written by an older llm2clip4cxr without content hashes. Load it once "
                "with EmbeddingIndex.load(path, verify=False) and save() it again (or rebuild it) to upgrade."
            )
        files = saved.get("files")
        if isinstance(files, dict):
            saved = {**saved, "files": {role: {"path": name} for role, name in files.items()}}
    elif version != _FORMAT_VERSION:
        raise InputError(f"{config_path} has format_version {version!r}; this version reads {_FORMAT_VERSION}.")
    missing = [key for key in ("size", "files", "config") if key not in saved]
    if missing:
        raise CorruptFileError(f"{config_path} lacks the key(s) {missing}; the index folder is damaged: rebuild it.")
    if isinstance(saved["size"], bool) or not isinstance(saved["size"], int) or saved["size"] < 0:
        raise CorruptFileError(f"{config_path}: \"size\" must be a non-negative integer, got {saved['size']!r}.")
    if not isinstance(saved["config"], dict):
        raise CorruptFileError(f"{config_path}: \"config\" must be an object, got {saved['config']!r}.")
    if not isinstance(saved.get("info", {}) or {}, dict):
        raise CorruptFileError(f"{config_path}: \"info\" must be an object, got {saved['info']!r}.")
    files = saved["files"]
    required = (
        sorted(role for role in files if not role.startswith(_LEXICAL_ROLE)) if isinstance(files, dict) else None
    )
    if not isinstance(files, dict) or required != sorted(_FILE_NAMES):
        raise CorruptFileError(f"{config_path}: \"files\" must name the {sorted(_FILE_NAMES)} files, got {files!r}.")
    for role, entry in files.items():
        path = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(path, str) or Path(path).is_absolute() or ".." in Path(path).parts:
            raise CorruptFileError(
                f"{config_path}: the {role} file must be a path inside the index folder, got {entry!r}."
            )
        if verify and not (isinstance(entry.get("sha256"), str) and isinstance(entry.get("bytes"), int)):
            raise CorruptFileError(f"{config_path}: the {role} file has no sha256/bytes to verify it against.")
    return saved


def _verify_file(path: Path, entry: dict, config_path: Path) -> None:
    size = path.stat().st_size  # FileNotFoundError: the caller re-reads the config (a concurrent commit)
    if size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
        sizes = f"; {size} bytes, {entry['bytes']} when saved" if size != entry["bytes"] else ""
        raise CorruptFileError(
            f"{path} does not match the content hash {config_path.name} committed for it (it was truncated, edited "
            f"or replaced after the index was saved{sizes}); rebuild the index."
        )


def _read_metadata(path: Path) -> tuple[list[str], list[dict | None]]:
    ids, metadata = [], []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise CorruptFileError(f"{path}, line {number}: not valid UTF-8 JSON ({error}).") from None
            if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                raise CorruptFileError(
                    f'{path}, line {number}: expected an object with a string "id", got {raw[:80]!r}.'
                )
            entry = record.get("metadata")
            if entry is not None and not isinstance(entry, dict):
                raise CorruptFileError(f"{path}, line {number}: \"metadata\" must be an object or null.")
            ids.append(record["id"])
            metadata.append(entry)
    return ids, metadata


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


def _chunks(array: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, len(array), _CHUNK_ROWS):
        yield start, array[start : start + _CHUNK_ROWS]


def _sample_positions(size: int, nlist: int) -> np.ndarray:
    """Sorted row positions for k-means (sorted so a memmap is read front to back)."""
    limit = nlist * _MAX_TRAIN_POINTS_PER_LIST
    if size <= limit:
        return np.arange(size)
    return np.sort(np.random.default_rng(0).choice(size, size=limit, replace=False))


def _training_sample(vectors: np.ndarray, nlist: int) -> np.ndarray:
    return np.asarray(vectors[_sample_positions(len(vectors), nlist)], dtype=np.float32)
