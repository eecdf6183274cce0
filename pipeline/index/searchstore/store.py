"""`SearchStore`: the search index opened for queries: one plan per query batch (principal map,
coarse lists), every shard scanned and re-ranked (in parallel threads), the results merged."""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from pipeline.index.layout import SEARCH_DIR
from pipeline.index.parts import vectors as column_vectors
from pipeline.index.reader import Index
from pipeline.index.searchstore.blocks import BlockReader
from pipeline.index.searchstore.layout import (
    CANDIDATES_PER_RESULT,
    check_current,
    local_file,
    parts_of,
    read_checked,
    read_search_manifest,
)
from pipeline.index.searchstore.scan import above_floor, floor_terms, scan
from pipeline.search import (
    SearchIndex,
    inner_products_by_index,
    l2_normalize,
    prepared,
    rerank,
)


@dataclass
class Trained:
    """The trained index of a build: principal map (or None), and the empty IVF-PQ whose
    quantiser every shard shares. `owner` keeps the FAISS objects alive."""

    owner: Any
    transform: faiss.LinearTransform | None
    ivf: faiss.IndexIVFPQ

    @classmethod
    def from_bytes(cls, data: bytes) -> Trained:
        try:
            owner = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as e:
            raise ValueError(f"trained search index could not be read: {e}") from e
        transform = None
        if isinstance(owner, faiss.IndexPreTransform):
            transform = faiss.downcast_VectorTransform(owner.chain.at(0))
            ivf = faiss.downcast_index(owner.index)
        else:
            ivf = owner
        if not isinstance(ivf, faiss.IndexIVFPQ) or ivf.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"trained search index is a {type(ivf).__name__}, not an IVF-PQ (IP)")
        return cls(owner, transform, ivf)

    def reduce(self, q: np.ndarray) -> np.ndarray:
        return q if self.transform is None else self.transform.apply(q)


class MappedShard:
    """A shard file memory-mapped (OnDiskInvertedLists over the file) and given the shared
    quantiser for its search; ValueError unless it was encoded with this build's codebooks.

    The shard keeps owning the empty quantiser it was read with and gets it back when this
    object goes, so FAISS frees that one and never the shared one (held via `trained`)."""

    def __init__(self, path: str, entry: dict, trained: Trained) -> None:
        try:
            shard = faiss.read_index(path, faiss.IO_FLAG_MMAP)
        except RuntimeError as e:
            raise ValueError(f"search shard {entry['file']} could not be read: {e}") from e
        check_shard(shard, entry, trained.ivf)
        self.trained = trained
        self.index: faiss.IndexIVFPQ = shard
        self.empty = shard.quantizer
        shard.quantizer = trained.ivf.quantizer

    def __del__(self) -> None:
        if getattr(self, "empty", None) is not None:
            self.index.quantizer = self.empty


def check_shard(shard: faiss.Index, entry: dict, ivf: faiss.IndexIVFPQ) -> None:
    name = entry["file"]
    if not isinstance(shard, faiss.IndexIVFPQ) or shard.nlist != ivf.nlist or shard.d != ivf.d:
        raise ValueError(f"search shard {name} is not an IVF-PQ of this build")
    if shard.ntotal != entry["rows"] or shard.quantizer.ntotal != 0:
        raise ValueError(
            f"search shard {name} holds {shard.ntotal} vectors and a quantiser of "
            f"{shard.quantizer.ntotal}; the manifest says {entry['rows']} and an empty one"
        )
    if not np.array_equal(
        faiss.vector_to_array(shard.pq.centroids), faiss.vector_to_array(ivf.pq.centroids)
    ):
        raise ValueError(f"search shard {name} was encoded with other PQ codebooks")


def default_nprobe(nlist: int) -> int:
    """Lists scanned per query: recall@10 >= 0.99 at 32 probes with 1,265 and 4,000 lists
    (benchmarks/search_latency.py); more lists get proportionally more."""
    return min(nlist, max(32, nlist // 32))


# -- search -----------------------------------------------------------------------------------


class SearchStore:
    """Searches a stored search index (all its shards, or the given shard numbers) and merges
    the top-k. Shards are searched in parallel threads (`threads`, default FAISS's OpenMP
    threads: OMP_NUM_THREADS=1 searches them one after another in the calling thread).
    `resident=False` reopens each shard's memory map per search instead of keeping it."""

    def __init__(
        self,
        index: Index,
        manifest: dict | None = None,
        directory: str = SEARCH_DIR,
        shards: Sequence[int] | None = None,
        threads: int | None = None,
        resident: bool = True,
        gpu: bool | None = None,
    ) -> None:
        manifest = manifest if manifest is not None else read_search_manifest(index, directory)
        if manifest is None:
            raise FileNotFoundError(
                f"no search index under {index.storage.url(directory)}: run `build` "
                "(search.kind != none)"
            )
        check_current(index, manifest)
        self.index, self.manifest, self.directory = index, manifest, directory
        self.kind = manifest["kind"]
        self.normalized = manifest["metric"] == "cosine"
        self.rows = int(manifest["rows"])
        self.dimension = int(manifest["dimension"])
        numbers = range(len(manifest["shards"])) if shards is None else list(shards)
        bad = [n for n in numbers if not 0 <= n < len(manifest["shards"])]
        if bad:
            raise IndexError(f"search shards {bad} out of range [0, {len(manifest['shards'])})")
        self.shards = [manifest["shards"][n] for n in numbers]
        self.threads = max(1, threads or faiss.omp_get_max_threads())
        self.resident = resident
        self.trained: Trained | None = None
        if self.kind == "ivfpq":
            self.trained = Trained.from_bytes(read_checked(index.storage, manifest["trained"]))
        self.nlist = int(self.trained.ivf.nlist) if self.trained else 0
        self._open: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        want_gpu = manifest["config"].get("gpu", True) if gpu is None else gpu
        self.gpu = GpuPlacement.start() if want_gpu else None

    # public

    def search(
        self,
        queries: np.ndarray,
        k: int,
        opponents: bool = False,
        nprobe: int | None = None,
        candidates: int | None = None,
        floor: float | None = None,
        rows: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k global rows by cosine (or inner product) per query, best first; `opponents`
        gives the most negative instead (ascending). IVF-PQ re-ranks `candidates` (default
        300 k) per shard exactly. Returns (scores [Q, k'], rows [Q, k']), k' = min(k, rows
        searched); missing results have row -1 (score -inf, +inf for opponents).

        `floor` (cosine indexes): only hits scoring >= floor are wanted, so candidates whose
        PQ score bounds their cosine below it are not re-ranked (`above_floor`); every hit >=
        floor among the top k is returned as without it, others may be missing.

        `rows`: the queries are these rows' own vectors (dedup): a row is left out of its own
        results (and not read to re-rank it), and IVF-PQ takes their nearest lists from the
        search index (stored by `build`) instead of searching the quantiser, for nprobe <=
        STORED_PROBES."""
        q = self.prepare(queries)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(int(k), sum(s["rows"] for s in self.shards))
        if opponents:
            q = -q
        own = None if rows is None else np.asarray(rows, np.int64)
        if own is not None and len(own) != len(q):
            raise ValueError(f"{len(own)} rows given for {len(q)} queries")
        searched = k + 1 if own is not None and self.kind == "flat" else k  # flat: drop it after
        plan = self.plan(q, nprobe, candidates, searched, None if opponents else own)
        if own is not None:
            plan["own"] = own
        if floor is not None and self.kind == "ivfpq" and self.normalized and not opponents:
            plan["floor"] = floor_terms(q, plan["small"], float(floor))
        found = self.map(functools.partial(self.search_shard, plan), self.shards)
        scores = np.hstack([f[0] for f in found]) if found else np.empty((len(q), 0), np.float32)
        rows = np.hstack([f[1] for f in found]) if found else np.empty((len(q), 0), np.int64)
        if own is not None:
            rows = np.where(rows == own[:, None], -1, rows)
        scores, rows = merge_top_k(scores, rows, k, ascending=False)
        return (-scores, rows) if opponents else (scores, rows)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._open.clear()

    def __enter__(self) -> SearchStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # steps

    def prepare(self, queries: np.ndarray) -> np.ndarray:
        """Queries (any float dtype) as float32, unit rows for cosine (one pass)."""
        q = np.asarray(queries)
        q = q[None, :] if q.ndim == 1 else q
        if q.ndim != 2 or q.shape[1] != self.dimension:
            raise ValueError(
                f"queries must be [Q, {self.dimension}] (the search index's dimension), "
                f"got shape {q.shape}"
            )
        q = prepared(q, self.normalized)
        # A NaN or inf in a row leaves a NaN or inf here; unit rows sum to a finite number
        # unless they hold one (one pass, no [Q, D] temporary).
        if not np.isfinite(q.sum(axis=1) if self.normalized else q).all():
            raise ValueError("queries contain NaN or infinite values")
        return q

    def plan(
        self,
        q: np.ndarray,
        nprobe: int | None,
        candidates: int | None,
        k: int,
        rows: np.ndarray | None = None,
    ) -> dict:
        """What every shard's search shares: the queries, and for IVF-PQ their reduced form
        and coarse assignment (computed once here, not per shard; read for `rows`)."""
        plan = {"q": q, "k": k}
        if self.kind != "ivfpq":
            return plan
        if nprobe is not None and nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        if candidates is not None and candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        probes = min(self.nlist, nprobe or default_nprobe(self.nlist))
        small = np.ascontiguousarray(self.trained.reduce(q), np.float32)
        quantizer = self.trained.ivf.quantizer
        stored = None if rows is None else self.stored_lists(rows, probes)
        if stored is not None:
            coarse_i = stored
            coarse_d = inner_products_by_index(small, self.centroids(), stored)
        elif self.gpu is not None:
            coarse_d, coarse_i = self.gpu.search(quantizer, small, probes)
        else:
            coarse_d, coarse_i = quantizer.search(small, probes)
        plan.update(
            small=small,
            coarse_d=np.ascontiguousarray(coarse_d, np.float32),
            coarse_i=np.ascontiguousarray(coarse_i, np.int64),
            # Re-ranked in the order of their nearest list: queries of one list share many
            # candidates, read once a step (dedup's rows: a third of their pairs are read).
            order=np.argsort(coarse_i[:, 0], kind="stable"),
            nprobe=probes,
            candidates=max(candidates or CANDIDATES_PER_RESULT * k, k),
        )
        return plan

    def stored_lists(self, rows: np.ndarray, probes: int) -> np.ndarray | None:
        """The `probes` nearest lists of global `rows` as `build` stored them (int64
        [n, probes]), or None where it stored fewer (or none: an older search index)."""
        rows = np.asarray(rows, np.int64)
        every = self.manifest["shards"]  # a row's lists live with its shard, searched or not
        if any(s.get("lists") is None for s in every) or len(rows) == 0:
            return None
        out = np.empty((len(rows), probes), np.int64)
        for number, mine, local in self.by_shard(rows):
            entry = every[number]["lists"]
            path = local_file(self.index.storage, entry, verify=True)
            stored = np.load(path, mmap_mode="r", allow_pickle=False)
            if stored.shape != (every[number]["rows"], stored.shape[1]):
                raise ValueError(f"search lists {entry['file']} hold {stored.shape} rows")
            if stored.shape[1] < probes:
                return None
            lo, hi = int(local.min()), int(local.max()) + 1
            out[mine] = np.asarray(stored[lo:hi, :probes])[local - lo]  # a copy: map closed
            del stored
        return out

    def stored_vectors(self, rows: np.ndarray) -> np.ndarray | None:
        """float16 [n, D] copies of sorted global `rows` as the search index holds them (unit
        rows for cosine), read from its vector blocks: dedup's queries, without decoding
        their parts. None for a flat index (its vectors live inside FAISS)."""
        if self.kind != "ivfpq":
            return None
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.dimension), np.float16)
        for number, mine, local in self.by_shard(rows):
            with BlockReader(self, self.manifest["shards"][number]) as blocks:
                blocks.read(local, out=out[mine[0] : mine[-1] + 1])  # a run: `rows` are sorted
        return out

    def by_shard(self, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(shard number, positions in `rows`, rows local to that shard) for every shard of
        the whole index (not only those searched) holding some of the global `rows`."""
        every = self.manifest["shards"]
        offsets = np.array([s["offset"] for s in every] + [self.rows], np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.rows):
            raise IndexError(f"rows out of range [0, {self.rows})")
        which = np.searchsorted(offsets, rows, side="right") - 1
        for number in np.unique(which).tolist():
            mine = np.flatnonzero(which == number)
            yield number, mine, rows[mine] - offsets[number]

    def centroids(self) -> np.ndarray:
        """The coarse quantiser's centroids [nlist, d] (a view of FAISS's memory)."""
        flat = faiss.downcast_index(self.trained.ivf.quantizer)
        return faiss.rev_swig_ptr(flat.get_xb(), self.nlist * flat.d).reshape(self.nlist, flat.d)

    def map(self, fn: Callable[[dict], Any], shards: list[dict]) -> list[Any]:
        """`fn` over the shards: threads when there are several and threads to spare, with
        FAISS's OpenMP threads split between them (a GPU's flat shards: one at a time)."""
        workers = min(self.threads, len(shards))
        if workers <= 1 or (self.gpu is not None and self.kind == "flat"):
            return [fn(shard) for shard in shards]
        if self._pool is None:
            with self._lock:
                self._pool = self._pool or ThreadPoolExecutor(workers, "search-shard")
        per_shard = max(1, self.threads // workers)

        def run(shard: dict) -> Any:
            faiss.omp_set_num_threads(per_shard)  # this pool thread's OpenMP setting only
            return fn(shard)

        return list(self._pool.map(run, shards))

    def search_shard(self, plan: dict, shard: dict) -> tuple[np.ndarray, np.ndarray]:
        """One shard's best min(k, its rows), re-ranked, as global rows."""
        k = min(plan["k"], shard["rows"])
        if self.kind == "flat":
            search = self.load_flat(shard)
            scores, local = search.search(plan["q"], k)
        else:
            ivf = self.load_ivf(shard)
            c = min(plan["candidates"], shard["rows"])
            approx, ids = scan(ivf.index, plan, c)
            if "own" in plan:  # its own row: left out, never read
                ids = np.where(ids == (plan["own"] - shard["offset"])[:, None], -1, ids)
            if "floor" in plan:
                ids = above_floor(approx, ids, plan["floor"], shard, self.load_bounds)
            if not self.resident:
                del ivf
            with BlockReader(self, shard) as blocks:
                scores, local = rerank(
                    plan["q"], ids, blocks.fetch, k, self.normalized, plan["order"]
                )
        return scores, np.where(local >= 0, local + shard["offset"], -1)

    # shard files

    def load_flat(self, shard: dict) -> SearchIndex:
        key = shard["file"]
        if key not in self._open:
            data = read_checked(self.index.storage, shard)
            search = SearchIndex.from_bytes(data)
            if search.n != shard["rows"] or search.kind != "flat":
                raise ValueError(f"search shard {key} does not hold {shard['rows']} flat rows")
            if self.gpu is not None:
                search.index = self.gpu.place(search.index)
            with self._lock:
                self._open.setdefault(key, search)
        return self._open[key]

    def load_bounds(self, shard: dict) -> np.ndarray | None:
        """The shard's per-row floor bounds (`floor_bounds`), memory-mapped; None for a
        search index built before they were stored."""
        entry = shard.get("bounds")
        if entry is None:
            return None
        path = local_file(self.index.storage, entry, verify=True)
        bounds = np.load(path, mmap_mode="r", allow_pickle=False)
        if bounds.shape != (shard["rows"], 2) or bounds.dtype != np.float32:
            raise ValueError(f"search bounds {entry['file']} hold {bounds.dtype} {bounds.shape}")
        return bounds

    def load_ivf(self, shard: dict) -> MappedShard:
        key = shard["file"]
        if key in self._open:
            return self._open[key]
        path = local_file(self.index.storage, shard, verify=True)
        ivf = MappedShard(path, shard, self.trained)
        if self.resident:
            with self._lock:
                self._open.setdefault(key, ivf)
            return self._open[key]
        return ivf


class GpuPlacement:
    """FAISS GPU resources, when FAISS was built with CUDA and sees a GPU; else `start`
    returns None. Untested here (no GPU on the development machine): kept to the coarse
    quantiser and flat shards, searched under a lock (GPU resources are not thread-safe)."""

    def __init__(self) -> None:
        self.resources = faiss.StandardGpuResources()
        self.lock = threading.Lock()
        self.placed: dict[int, Any] = {}

    @classmethod
    def start(cls) -> GpuPlacement | None:
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
            return None
        try:
            return cls()
        except RuntimeError as e:  # a driver or memory problem: search on the CPU instead
            warnings.warn(f"FAISS GPU unavailable, searching on CPU: {e}", RuntimeWarning, 2)
            return None

    def place(self, index: faiss.Index) -> faiss.Index:
        return faiss.index_cpu_to_gpu(self.resources, 0, index)

    def search(self, index: faiss.Index, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            if id(index) not in self.placed:
                self.placed[id(index)] = self.place(index)
            return self.placed[id(index)].search(x, k)


def merge_top_k(
    scores: np.ndarray, rows: np.ndarray, k: int, ascending: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The best k of each query's candidates from all shards (missing ones, id -1, last)."""
    key = np.where(rows >= 0, scores if ascending else -scores, np.inf)
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def brute_force_top_k(
    index: Index,
    queries: np.ndarray,
    k: int,
    normalized: bool,
    opponents: bool = False,
    column: str = "w",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over every part, one part at a time (the reference, and the fallback when
    no stored search index matches the metric asked for)."""
    q = np.atleast_2d(np.asarray(queries, np.float32))
    q = l2_normalize(q) if normalized else q
    sign = -1.0 if opponents else 1.0
    best_scores = np.full((len(q), 0), np.inf, np.float32)
    best_rows = np.full((len(q), 0), -1, np.int64)
    offset = 0
    for part in parts_of(index):
        vectors = column_vectors(index.read_part(part["part"], [column]), column)
        x = prepared(vectors, normalized)
        scores = sign * (q @ x.T)
        rows = np.broadcast_to(np.arange(offset, offset + len(x)), scores.shape)
        best_scores, best_rows = merge_top_k(
            np.hstack([best_scores, scores]), np.hstack([best_rows, rows]), k, ascending=False
        )
        offset += len(x)
    return sign * best_scores, best_rows
