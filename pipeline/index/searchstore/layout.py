"""What a search index is on storage: its manifest and files, which parts it covers, and
checked local copies of its files (memory-mappable, S3 ones cached by content hash)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import SearchConfig, drop_ignored, to_dict
from pipeline.index.columnar import read_schema
from pipeline.index.layout import SEARCH_DIR
from pipeline.index.reader import Index

log = logging.getLogger(__name__)

SEARCH_MANIFEST = f"{SEARCH_DIR}/manifest.json"
FORMAT = "influence-ssl/search/2"
OLD_FORMATS = ("influence-ssl/search/1",)  # read only to be found stale
METRICS = ("cosine", "inner_product")
# A float16 vector block per file: what one build worker holds (plus its shard's codes).
VECTOR_BLOCK_BYTES = 128 << 20
BUILD_WORKERS = 4
# PQ of 2 dimensions per sub-quantiser (128 bytes a vector on 256 principal directions), and
# candidates re-ranked per result and shard: recall@10 >= 0.95 at 10^6 vectors on clustered
# data whose neighbours differ by isotropic noise (benchmarks/search_latency.py; docs).
STORED_MAX_M = 128
CANDIDATES_PER_RESULT = 300
# Each row's nearest lists, stored per shard (`<shard>-lists.npy`): a search of the index's own
# rows (dedup) with nprobe up to this many reads them instead of searching the quantiser.
STORED_PROBES = 8

MapFn = Callable[[Callable[[Any], Any], Sequence[Any]], Iterable[Any]]


class StaleSearchIndexError(RuntimeError):
    """The stored search index does not cover the index's current parts (or is too old)."""


# -- what a search index covers ---------------------------------------------------------------


def manifest_path(directory: str = SEARCH_DIR) -> str:
    return f"{directory}/manifest.json"


def parts_of(index: Index) -> list[dict]:
    """The parts of a built index, in row order: what a search index must cover."""
    return [
        {"part": s["part"], "rows": int(s["examples"]), "sha256": s.get("part_sha256")}
        for s in index.manifest["shards"]
    ]


def plan_shards(parts: list[dict], shard_rows: int) -> list[list[int]]:
    """Contiguous runs of part numbers of about `shard_rows` vectors each: a run closes once it
    holds `shard_rows` (a larger part forms its own shard); the last run may be smaller."""
    if shard_rows < 1:
        raise ValueError(f"search.shard_rows must be >= 1, got {shard_rows}")
    runs: list[list[int]] = [[]]
    rows = 0
    for number, part in enumerate(parts):
        if runs[-1] and rows + part["rows"] > shard_rows:
            runs.append([])
            rows = 0
        runs[-1].append(number)
        rows += part["rows"]
    return [run for run in runs if run]


def resolve_kind(config: SearchConfig, rows: int) -> str:
    if config.kind == "auto":
        return "flat" if rows <= config.flat_max_rows else "ivfpq"
    if config.kind not in ("flat", "ivfpq"):
        raise ValueError(f"search.kind must be auto, flat, ivfpq or none, not {config.kind!r}")
    return config.kind


def is_current(stored: dict | None, index: Index, config: SearchConfig, column: str = "w") -> bool:
    """True when the stored search manifest covers exactly the current parts, as configured."""
    return (
        stored is not None
        and stored.get("format") == FORMAT
        and stored.get("column") == column
        and stored["parts_covered"] == parts_of(index)
        and stored["config"] == to_dict(config)
    )


def read_search_manifest(index: Index, directory: str = SEARCH_DIR) -> dict | None:
    """The stored search manifest (None: none); an older format is returned as it is, for
    `build` to replace and `SearchStore` to refuse."""
    path = manifest_path(directory)
    try:
        manifest = json.loads(index.storage.read_bytes(path))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise ValueError(f"{index.storage.url(path)} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT, *OLD_FORMATS):
        raise ValueError(f"{index.storage.url(path)} is not a search manifest")
    return manifest


def check_current(index: Index, manifest: dict) -> None:
    """StaleSearchIndexError unless `manifest` is this version's and covers the current parts."""
    where = index.storage.uri
    if manifest.get("format") != FORMAT:
        raise StaleSearchIndexError(
            f"the search index under {where} has the old format {manifest.get('format')!r} "
            f"(this version reads {FORMAT!r}): rerun `build` to rebuild it"
        )
    if manifest["parts_covered"] != parts_of(index):
        raise StaleSearchIndexError(
            f"the search index under {where} was built from other parts than the index now "
            "has: rerun `build` to refresh it"
        )


def column_dimension(index: Index, column: str) -> int:
    """The vector width of `column` (a fixed-size list), from the first part's footer."""
    schema = read_schema(index.storage, index.manifest["shards"][0]["part"])
    if column not in schema.names:
        raise KeyError(f"the index's parts have no column {column!r} (they have {schema.names})")
    size = getattr(schema.field(column).type, "list_size", -1)
    if size is None or size < 1:
        raise ValueError(f"column {column!r} is not a fixed-size vector column")
    return int(size)


def search_config_of(manifest: dict) -> SearchConfig:
    """The search settings an index was built with (defaults for older indices; settings
    that no longer exist, like `max_shard_bytes`, are ignored with a FutureWarning)."""
    stored = manifest.get("config", {}).get("index", {}).get("search", {})
    stored = drop_ignored(SearchConfig, stored)
    known = {f.name for f in dataclasses.fields(SearchConfig)}
    return SearchConfig(**{k: v for k, v in stored.items() if k in known})


def files_of(manifest: dict) -> list[str]:
    """Every file a search manifest names."""
    files = [manifest["trained"]["file"]] if manifest.get("trained") else []
    for shard in manifest["shards"]:
        files.append(shard["file"])
        files += [block["file"] for block in shard.get("vectors") or []]
        files += [shard[name]["file"] for name in ("lists", "bounds") if shard.get(name)]
    return files


def file_entry(name: str, data: bytes | memoryview) -> dict:
    return {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


class NpyBuffer:
    """An .npy file laid out in one buffer, its header first, so that filling `array` fills
    the file and writing it copies nothing; `file(rows)` is the file of the first rows."""

    def __init__(self, shape: tuple[int, int], dtype: type) -> None:
        self.dtype = np.dtype(dtype)
        self.header = len(npy_header(shape, self.dtype))
        self.data = bytearray(self.header + shape[0] * shape[1] * self.dtype.itemsize)
        self.array = np.frombuffer(self.data, self.dtype, offset=self.header).reshape(shape)

    def file(self, rows: int | None = None) -> memoryview:
        rows = len(self.array) if rows is None else rows
        shape = (rows, self.array.shape[1])
        view = memoryview(self.data)
        view[: self.header] = npy_header(shape, self.dtype, self.header)
        return view[: self.header + rows * self.array.shape[1] * self.dtype.itemsize]


def npy_header(shape: tuple[int, ...], dtype: np.dtype, length: int | None = None) -> bytes:
    """An .npy (version 1.0) header for a C-ordered array: magic, length, the dict, padded
    with spaces to a multiple of 64 bytes, or to `length` (a shorter shape's header fits in
    a longer one's: numpy reads the dict whatever the padding)."""
    text = repr(
        {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )
    prefix = 10  # magic (6), version (2), header length (2)
    total = length or -(-(prefix + len(text) + 1) // 64) * 64
    if prefix + len(text) + 1 > total:
        raise ValueError(f"an .npy header for {shape} does not fit in {total} bytes")
    padded = text + " " * (total - prefix - len(text) - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + (total - prefix).to_bytes(2, "little") + padded.encode("latin1")


# -- files: checked, cached ------------------------------------------------------------------


def cache_path(sha256: str, suffix: str = ".npy") -> Path:
    """Where a remote search file is cached: named by its content hash, so a rebuilt search
    index never meets a stale copy ($INFLUENCE_SSL_CACHE, else ~/.cache)."""
    root = Path(os.environ.get("INFLUENCE_SSL_CACHE", Path.home() / ".cache" / "influence-ssl"))
    return root / "search" / f"{sha256}{suffix}"


def read_checked(storage, entry: dict) -> bytes:
    """A (small) search file's bytes, checked against its manifest sha256."""
    data = storage.read_bytes(entry["file"])
    check_digest(storage.url(entry["file"]), hashlib.sha256(data).hexdigest(), entry)
    return data


def check_digest(where: str, digest: str, entry: dict) -> None:
    if digest != entry["sha256"]:
        raise ValueError(
            f"search file {where} is corrupt or was replaced: sha256 {digest[:12]}..., the "
            f"search manifest says {entry['sha256'][:12]}... (rerun `build` to rebuild it)"
        )


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# Local files already hashed in this process, by path, inode, size, mtime and sha256: a store
# opened per batch (dedup) hashes a shard file once per process, a rewritten one again.
_VERIFIED: set[tuple[str, int, int, int, str]] = set()


def local_file(storage, entry: dict, verify: bool) -> str:
    """A local path of a search file, memory-mappable: the file itself (checked when `verify`,
    once per process) or, on S3, a checked copy in the content-addressed cache (streamed,
    hashed on the way)."""
    path = storage.local_path(entry["file"])
    if path is not None:
        if verify:
            stat = os.stat(path)
            key = (path, stat.st_ino, stat.st_size, stat.st_mtime_ns, entry["sha256"])
            if key not in _VERIFIED:
                check_digest(path, file_sha256(path), entry)
                _VERIFIED.add(key)
        return path
    target = cache_path(entry["sha256"], Path(entry["file"]).suffix)
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{uuid.uuid4().hex}.partial")
    digest = hashlib.sha256()
    try:
        with storage.open_read(entry["file"]) as source, open(partial, "wb") as sink:
            while chunk := source.read(1 << 22):
                digest.update(chunk)
                sink.write(chunk)
        check_digest(storage.url(entry["file"]), digest.hexdigest(), entry)
        partial.replace(target)  # atomic: a concurrent reader sees the whole file or none
    finally:
        partial.unlink(missing_ok=True)
    return str(target)
