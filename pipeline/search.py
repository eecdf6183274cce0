"""Nearest-neighbour search over influence index vectors (FAISS).

Each training example t has an index vector w_t in R^D; influence is I(q, t) = <w_q, w_t>
and normalised influence is the cosine. Row ids are 0..N-1, the row order of the index's
Parquet parts.

Kinds:
- ``flat``: ``faiss.IndexFlatIP``, exact maximum inner product.
- ``ivfpq``: ``faiss.IndexIVFPQ`` (inner product, 8-bit codes). ``m`` defaults to the largest
  divisor of D that is <= 64 with D / m >= 2 (no zero padding; 1 when D < 2). Results can be
  re-ranked exactly against the full vectors (``exact_vectors``).
- ``auto``: flat for N <= 100_000, else ivfpq.

Opponents (most negative influence) are a search with ``-queries``: see ``search_opponents``.

Serialized layout (``to_bytes``): ``MAGIC`` (8 bytes) | header length (uint64 LE) | JSON header
| FAISS bytes (``faiss.serialize_index``). Never pickled.

The stored, sharded index (`pipeline.index.searchstore`) reuses the pieces: `second_moment`
and `principal_map` (chunked, float16 input), `reduced`, `train_ivfpq`, and `rerank` over rows
from any `fetch` (its float16 blocks, read with pread), each distinct candidate of a step once.
"""

from __future__ import annotations

import functools
import json
import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

MAGIC = b"ISSLIDX1"
FORMAT_VERSION = 1
AUTO_FLAT_MAX_N = 100_000
MAX_PQ_M = 64
PQ_BITS = 8
_MAX_HEADER = 1 << 16
# (query, candidate) pairs re-ranked a step: their distinct rows (about a third of them
# for dedup's queries, ordered by nearest list) are a few MiB.
RERANK_PAIRS = 4096
NORMALIZE_ROWS = 4096
# PQ codes of high-dimensional whitened vectors rank neighbours coarsely: re-ranking 100 k
# candidates exactly brings recall@10 to ~1 at a few ms per query (benchmarks/search_latency.py).
CANDIDATES_PER_RESULT = 100


@dataclass
class SearchIndex:
    """A FAISS index over N index vectors, plus the metadata needed to search it."""

    index: faiss.Index
    kind: str
    normalized: bool
    n: int
    d: int

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        kind: str = "auto",
        normalized: bool = False,
        nlist: int | None = None,
        m: int | None = None,
        seed: int = 0,
        reduce_dim: int = 0,
    ) -> SearchIndex:
        """Build an index over ``vectors`` [N, D]; ``normalized`` stores unit vectors (cosine).

        For ivfpq, ``reduce_dim`` (0: off) first maps vectors to their top principal
        directions (uncentred, so inner products are preserved as far as the directions
        kept): k-means and PQ then work in that space, and re-ranking restores exactness.
        """
        x = _as_matrix(vectors, "vectors")
        n, d = x.shape
        if n == 0:
            raise ValueError("cannot build a search index over zero vectors (N=0)")
        if not np.isfinite(x).all():
            raise ValueError("vectors contain NaN or infinite values")
        if kind == "auto":
            kind = "flat" if n <= AUTO_FLAT_MAX_N else "ivfpq"
        if normalized:
            x = l2_normalize(x)
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "ivfpq":
            index = _train_ivfpq(x, nlist, m, seed, reduce_dim)
        else:
            raise ValueError(f"unknown index kind {kind!r}; expected 'auto', 'flat' or 'ivfpq'")
        index.add(x)
        return cls(index=index, kind=kind, normalized=normalized, n=n, d=d)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exact_vectors: np.ndarray | None = None,
        candidates: int | None = None,
        nprobe: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by inner product (cosine if normalized), best first.

        Returns ``(scores [Q, k'], ids [Q, k'])`` with ``k' = min(k, N)`` (k > N is clipped).
        For ivfpq, ``candidates`` (default 100*k) rows are fetched approximately and, when
        ``exact_vectors`` [N, D] is given, re-ranked exactly; otherwise the approximate scores
        are returned. Missing results (rare, ivfpq only) have id -1 and score -inf.
        """
        q = self._prepare_queries(queries)
        k = self._clip_k(k)
        if self.kind == "flat":
            return _finish(*self.index.search(q, k))
        c = min(max(candidates if candidates is not None else CANDIDATES_PER_RESULT * k, k), self.n)
        params = faiss.SearchParametersIVF(nprobe=self._nprobe(nprobe))
        scores, ids = self.index.search(q, c, params=params)
        if exact_vectors is None:
            return _finish(scores[:, :k], ids[:, :k])
        return _rerank(q, ids, self._check_exact(exact_vectors), k, self.normalized)

    def search_opponents(
        self,
        queries: np.ndarray,
        k: int,
        exact_vectors: np.ndarray | None = None,
        candidates: int | None = None,
        nprobe: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Bottom-k rows (most negative influence): a search with ``-queries``.

        Returns the true inner products (cosines if normalized) in ascending order, with ids.
        """
        q = -self._prepare_queries(queries)
        scores, ids = self.search(q, k, exact_vectors, candidates, nprobe)
        return -scores, ids

    def to_bytes(self) -> np.ndarray:
        """Serialize to a uint8 array: magic | uint64 header length | JSON header | FAISS bytes."""
        payload = faiss.serialize_index(self.index)
        header = {
            "format": FORMAT_VERSION,
            "kind": self.kind,
            "normalized": self.normalized,
            "n": self.n,
            "d": self.d,
            "faiss_nbytes": int(payload.size),
            "faiss_crc32": zlib.crc32(payload.tobytes()),
        }
        head = json.dumps(header, sort_keys=True).encode()
        prefix = MAGIC + struct.pack("<Q", len(head)) + head
        return np.concatenate([np.frombuffer(prefix, dtype=np.uint8), payload])

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview | np.ndarray) -> SearchIndex:
        """Load ``to_bytes`` output; raises ValueError on any corruption or mismatch."""
        raw = np.asarray(data).tobytes() if isinstance(data, np.ndarray) else bytes(data)
        header, payload = _split(raw)
        try:
            index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
        except RuntimeError as e:
            raise ValueError(f"search index: FAISS payload could not be read: {e}") from e
        _check_loaded(index, header)
        return cls(index, header["kind"], header["normalized"], header["n"], header["d"])

    def _prepare_queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        q = _as_matrix(q, "queries")
        if q.shape[1] != self.d:
            raise ValueError(
                f"query dimension {q.shape[1]} does not match index dimension {self.d}"
            )
        return l2_normalize(q) if self.normalized else q

    def _clip_k(self, k: int) -> int:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return min(int(k), self.n)

    def _nprobe(self, nprobe: int | None) -> int:
        nlist = faiss.extract_index_ivf(self.index).nlist
        if nprobe is None:
            # recall@10 reached 0.999 at 32 probes with 1,265 and 4,000 lists (10^5, 10^6
            # vectors, benchmarks/search_latency.py); more lists get proportionally more.
            return min(nlist, max(32, nlist // 32))
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        return min(int(nprobe), nlist)

    def _check_exact(self, exact: np.ndarray) -> np.ndarray:
        if exact.ndim != 2 or exact.shape != (self.n, self.d):
            raise ValueError(f"exact_vectors must have shape {(self.n, self.d)}, got {exact.shape}")
        return exact


def l2_normalize(x: np.ndarray, as_float32: bool = False) -> np.ndarray:
    """Row-wise L2 normalisation (float32); zero rows stay zero. float16 and float32 rows are
    normalised in float32 (FAISS's SIMD conversion and norms); others in their own dtype
    unless `as_float32`. In steps of NORMALIZE_ROWS rows: the values of one whole-array pass,
    with one step's temporaries."""
    x = np.asarray(x)
    out = np.empty(x.shape, np.float32)
    native = x.ndim == 2 and x.dtype in (np.float16, np.float32)
    for lo in range(0, len(x), NORMALIZE_ROWS):
        rows, target = x[lo : lo + NORMALIZE_ROWS], out[lo : lo + NORMALIZE_ROWS]
        if native:
            to_float32(rows, out=target)
            faiss.normalize_L2(target)
            continue
        rows = rows.astype(np.float32) if as_float32 else rows
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        np.divide(rows, np.where(norms > 0, norms, 1), out=target, casting="unsafe")
    return out


def to_float32(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows [n, d] as contiguous float32 (into `out` when given); float16 through FAISS's
    decoder, 1.6x numpy's conversion. (torch's is 5-10x faster still, but importing it costs
    a process 1.5 s and ~180 MiB: measured slower for a dedup batch.)"""
    x = np.asarray(x)
    if x.dtype != np.float16 or x.ndim != 2 or x.size == 0:
        if out is None:
            return np.ascontiguousarray(x, dtype=np.float32)
        out[...] = x
        return out
    x = np.ascontiguousarray(x)
    out = np.empty(x.shape, np.float32) if out is None else out
    codec = _float16_codec(x.shape[1])
    codec.sa_decode_c(len(x), faiss.swig_ptr(x.view(np.uint8)), faiss.swig_ptr(out))
    return out


@functools.lru_cache(maxsize=8)
def _float16_codec(dimension: int) -> faiss.IndexScalarQuantizer:
    return faiss.IndexScalarQuantizer(dimension, faiss.ScalarQuantizer.QT_fp16)


def default_nlist(n: int) -> int:
    """About 4*sqrt(N) lists, but at least 39 training points per list (FAISS's minimum)."""
    return max(1, min(round(4 * math.sqrt(n)), n // 39))


def default_m(d: int, max_m: int = MAX_PQ_M) -> int:
    """Largest divisor of D that is <= `max_m` with D / m >= 2 (1 when none exists)."""
    return next((m for m in range(min(max_m, d // 2), 0, -1) if d % m == 0), 1)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of |approx ∩ exact| / |exact| (ids of -1 are ignored)."""
    a, e = np.atleast_2d(approx_ids), np.atleast_2d(exact_ids)
    if a.shape[0] != e.shape[0]:
        raise ValueError(f"query counts differ: {a.shape[0]} vs {e.shape[0]}")
    hits = [
        len(set(ra[ra >= 0]) & set(re[re >= 0])) / max(1, (re >= 0).sum())
        for ra, re in zip(a, e, strict=True)
    ]
    return float(np.mean(hits)) if hits else 0.0


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [rows, D], got shape {x.shape}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} must have dimension D >= 1")
    return np.ascontiguousarray(x, dtype=np.float32)


def _train_ivfpq(
    x: np.ndarray, nlist: int | None, m: int | None, seed: int, reduce_dim: int = 0
) -> faiss.Index:
    n, d_in = x.shape
    rng = np.random.default_rng(seed)
    n_train = min(n, 256 * (nlist or default_nlist(n)))
    sample = x[np.sort(rng.choice(n, size=n_train, replace=False))] if n_train < n else x
    reduce = _principal_map(sample, reduce_dim) if 0 < reduce_dim < d_in else None
    if reduce is not None:
        sample = reduce.apply(sample)
    d = sample.shape[1]
    nlist = default_nlist(n) if nlist is None else nlist
    m = default_m(d) if m is None else m
    if not 1 <= nlist <= n:
        raise ValueError(f"nlist must be in [1, N={n}], got {nlist}")
    if n < 1 << PQ_BITS:
        raise ValueError(f"ivfpq needs at least {1 << PQ_BITS} vectors to train, got {n}")
    index = train_ivfpq(sample, nlist, m, seed)
    if reduce is None:
        return index
    wrapped = faiss.IndexPreTransform(reduce, index)
    wrapped.own_fields = True
    reduce.this.disown()
    index.this.disown()
    return wrapped


def _principal_map(x: np.ndarray, dim: int) -> faiss.LinearTransform:
    """y = U^T x with U the top `dim` eigenvectors of the uncentred second moment of x."""
    return principal_map(second_moment(x, normalized=False), dim)


def prepared(x: np.ndarray, normalized: bool) -> np.ndarray:
    """Rows as contiguous float32, unit length when `normalized` (float16 input is fine)."""
    if normalized:
        return l2_normalize(x, as_float32=True)
    return np.ascontiguousarray(x, dtype=np.float32)


def second_moment(x: np.ndarray, normalized: bool, chunk: int = 8192) -> np.ndarray:
    """(1/N) sum x x^T of the (optionally normalised) rows of `x` [N, D], in float64; the rows
    are converted a chunk at a time, so a float16 `x` is never copied whole to float32."""
    moment = np.zeros((x.shape[1], x.shape[1]), np.float64)
    for lo in range(0, len(x), chunk):  # float32 products, float64 sums: bounded memory
        rows = prepared(x[lo : lo + chunk], normalized)
        moment += rows.T @ rows
    return moment / max(1, len(x))


def principal_map(moment: np.ndarray, dim: int) -> faiss.LinearTransform:
    """y = U^T x, U the top `dim` eigenvectors of a second moment [D, D]."""
    _, vectors = np.linalg.eigh(moment)
    top = np.ascontiguousarray(vectors[:, ::-1][:, :dim].T, dtype=np.float32)  # [dim, D]
    transform = faiss.LinearTransform(moment.shape[0], dim, False)
    faiss.copy_array_to_vector(top.ravel(), transform.A)
    transform.is_trained = True
    return transform


def reduced(
    x: np.ndarray, normalized: bool, transform: faiss.LinearTransform | None, chunk: int = 8192
) -> np.ndarray:
    """Rows prepared (`prepared`) and mapped by `transform` (None: as they are), a chunk at
    a time: float32 [N, transform's output dimension]."""
    if transform is None:
        return prepared(x, normalized)
    out = np.empty((len(x), transform.d_out), np.float32)
    for lo in range(0, len(x), chunk):
        out[lo : lo + chunk] = transform.apply(prepared(x[lo : lo + chunk], normalized))
    return out


def train_ivfpq(x: np.ndarray, nlist: int, m: int, seed: int) -> faiss.IndexIVFPQ:
    """An empty IVF-PQ index (inner product, 8-bit codes) trained on float32 rows `x`."""
    n, d = x.shape
    if n < 1 << PQ_BITS:
        raise ValueError(f"ivfpq needs at least {1 << PQ_BITS} vectors to train, got {n}")
    if not 1 <= nlist <= n:
        raise ValueError(f"nlist must be in [1, N={n}], got {nlist}")
    if m < 1 or d % m:
        raise ValueError(f"m={m} must be a positive divisor of D={d}")
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, m, PQ_BITS, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.pq.cp.seed = seed
    index.train(x)
    return index


def _finish(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = ids.astype(np.int64)
    scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
    return scores, ids


def _rerank(
    q: np.ndarray, ids: np.ndarray, exact: np.ndarray, k: int, normalized: bool
) -> tuple[np.ndarray, np.ndarray]:
    return rerank(q, ids, lambda rows: exact[rows].astype(np.float32), k, normalized)


def rerank(
    q: np.ndarray,
    ids: np.ndarray,
    fetch: Callable[[np.ndarray], np.ndarray],
    k: int,
    normalized: bool,
    order: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The best k of each query's candidate `ids` [Q, C] (-1: none) by exact inner product
    (cosine if `normalized`) with the rows `fetch(rows [n]) -> float32 [n, D]` returns.
    Returns (scores [Q, k], ids [Q, k]), best first; missing: id -1, score -inf.

    Queries go in steps of about RERANK_PAIRS candidates, in `order` (default: as given;
    queries that share candidates, e.g. of one coarse list, best adjacent); a step fetches
    each distinct candidate once, `fetch` getting sorted distinct rows."""
    k = min(k, ids.shape[1])
    out_s = np.empty((len(q), k), dtype=np.float32)
    out_i = np.empty((len(q), k), dtype=np.int64)
    order = np.arange(len(q)) if order is None else np.asarray(order)
    step = max(1, RERANK_PAIRS // max(1, ids.shape[1]))
    for lo in range(0, len(q), step):
        chosen = order[lo : lo + step]
        out_s[chosen], out_i[chosen] = _rerank_step(q[chosen], ids[chosen], fetch, k, normalized)
    return out_s, out_i


def _rerank_step(
    q: np.ndarray,
    ids: np.ndarray,
    fetch: Callable[[np.ndarray], np.ndarray],
    k: int,
    normalized: bool,
) -> tuple[np.ndarray, np.ndarray]:
    valid = ids >= 0
    distinct, where = np.unique(ids[valid], return_inverse=True)
    rows = np.ascontiguousarray(fetch(distinct), dtype=np.float32)  # [U, D], each row once
    local = np.full(ids.shape, -1, np.int64)
    local[valid] = where
    scores = inner_products_by_index(np.ascontiguousarray(q, np.float32), rows, local)
    if normalized:  # divide the scores by the U row norms, never the rows
        norms = np.sqrt(np.einsum("ud,ud->u", rows, rows))
        scores[valid] /= np.where(norms > 0, norms, 1)[where]
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_ids = np.where(np.take_along_axis(valid, order, 1), np.take_along_axis(ids, order, 1), -1)
    return np.take_along_axis(scores, order, 1), top_ids


def inner_products_by_index(q: np.ndarray, rows: np.ndarray, local: np.ndarray) -> np.ndarray:
    """[Q, C]: q[i] . rows[local[i, j]], -inf where local is -1 (FAISS's SIMD kernel: the
    candidate rows are never gathered into a [Q, C, D] copy)."""
    n, c = local.shape
    out = np.empty((n, c), np.float32)
    if n and c:
        local = np.ascontiguousarray(local, np.int64)
        faiss.fvec_inner_products_by_idx(
            faiss.swig_ptr(out), faiss.swig_ptr(q), faiss.swig_ptr(rows),
            faiss.swig_ptr(local), q.shape[1], n, c,
        )  # fmt: skip
    return out


def _split(raw: bytes) -> tuple[dict, bytes]:
    prefix = len(MAGIC) + 8
    if len(raw) < prefix or raw[: len(MAGIC)] != MAGIC:
        raise ValueError("not a serialized search index (bad magic or too short)")
    (hlen,) = struct.unpack("<Q", raw[len(MAGIC) : prefix])
    if hlen > _MAX_HEADER or prefix + hlen > len(raw):
        raise ValueError(f"search index header length {hlen} is invalid for {len(raw)} bytes")
    try:
        header = json.loads(raw[prefix : prefix + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"search index header is not valid JSON: {e}") from e
    _check_header(header)
    payload = raw[prefix + hlen :]
    if len(payload) != header["faiss_nbytes"]:
        raise ValueError(
            f"search index truncated or padded: {len(payload)} FAISS bytes, "
            f"header says {header['faiss_nbytes']}"
        )
    if zlib.crc32(payload) != header["faiss_crc32"]:
        raise ValueError("search index FAISS payload is corrupted (CRC32 mismatch)")
    return header, payload


def _check_header(header: object) -> None:
    types = {
        "format": int,
        "kind": str,
        "normalized": bool,
        "n": int,
        "d": int,
        "faiss_nbytes": int,
        "faiss_crc32": int,
    }
    if not isinstance(header, dict):
        raise ValueError("search index header must be a JSON object")
    for key, typ in types.items():
        if not isinstance(header.get(key), typ):
            raise ValueError(f"search index header field {key!r} missing or not {typ.__name__}")
    if header["format"] != FORMAT_VERSION:
        raise ValueError(f"unsupported search index format {header['format']}")
    if header["kind"] not in ("flat", "ivfpq"):
        raise ValueError(f"search index header has unknown kind {header['kind']!r}")
    if header["n"] < 1 or header["d"] < 1:
        raise ValueError(f"search index header has invalid N={header['n']}, D={header['d']}")


def _check_loaded(index: faiss.Index, header: dict) -> None:
    expected = faiss.IndexFlatIP if header["kind"] == "flat" else faiss.IndexIVFPQ
    wrapped = isinstance(index, faiss.IndexPreTransform)
    inner = faiss.downcast_index(index.index) if wrapped else index
    if not isinstance(inner, expected):
        raise ValueError(f"FAISS index is {type(index).__name__}, header says {header['kind']}")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError("FAISS index does not use the inner-product metric")
    if index.ntotal != header["n"] or index.d != header["d"]:
        raise ValueError(
            f"FAISS index has N={index.ntotal}, D={index.d}; "
            f"header says N={header['n']}, D={header['d']}"
        )
