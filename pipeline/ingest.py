"""`influence-ssl ingest`: images (a folder, an s3:// prefix, or a CSV/Parquet list of URIs with
metadata columns) -> WebDataset shards that `fit` and `build` read.

Each example is `<key>.<ext>` (the original encoded bytes when PIL decodes them in full; GIF,
TIFF and other formats the reader does not take are re-encoded as PNG) and `<key>.json` (its
`source`, a folder's `label`, a list file's columns). Keys come from the relative path,
reduced to safe characters (a short hash of the path is appended when anything changed).

Resumable: the sorted inputs are assigned to shards before any image is read, so shard i
always holds the same inputs. Each shard is written atomically, then its marker
(`_ingest/<shard>.json`, with a fingerprint of its inputs and settings); a rerun keeps every
shard whose marker matches and writes only the rest. Bad inputs are skipped and counted by
reason in the marker and in the summary (`ingest.json`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import posixpath
import re
import tarfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image

from pipeline import storage
from pipeline.data._io import is_remote, local_path
from pipeline.data.webdataset import DEFAULT_MAX_PIXELS
from pipeline.data.writer import add_member
from pipeline.errors import UserError
from pipeline.runtime.progress import Progress

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of the shard layout and fingerprint; a change rewrites every shard
# Files a folder or prefix listing takes as images (others: unsupported_extension).
IMAGE_SUFFIXES = (
    ".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".pbm", ".pnm",
    ".gif", ".tif", ".tiff",
)  # fmt: skip
LIST_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")
# Formats stored as they are (the reader's member extensions); anything else becomes PNG.
KEPT_FORMATS = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "BMP": "bmp",
    "PPM": "ppm",
}
_OPEN_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "PPM", "GIF", "TIFF")  # MPO opens as JPEG
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")
URI_COLUMNS = ("uri", "url", "path", "file", "filename", "filepath", "image", "image_path")
SKIP_REASONS = (
    "hidden_file",
    "unsupported_extension",
    "duplicate_key",
    "missing_file",
    "read_error",
    "image_too_large",
    "undecodable_image",
)
_MAX_LISTED_SKIPS = 1000  # skipped files named in the summary (all are counted)
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_-]+")
_MAX_KEY = 200


@dataclass
class IngestConfig:
    """`influence-ssl ingest`: images -> WebDataset shards with keys and metadata."""

    # A local folder, an s3://bucket/prefix/, or a .csv/.tsv/.parquet list of image URIs.
    source: str = ""
    output: str = "runs/shards"  # folder or s3:// prefix for the shards (CLI --out)
    shard_size: int = 1000  # inputs per shard (fewer examples where some are skipped)
    prefix: str = "shard"  # shard names: <prefix>-000000.tar, ...
    # List files: the column holding the image URIs ("": the first of uri, url, path, ...).
    uri_column: str = ""
    key_column: str = ""  # list files: a column of keys ("": from each URI's path)
    # Folders and prefixes: the metadata field that gets the parent folder's name ("": none).
    label_field: str = "label"
    max_bytes: int = 256 << 20  # files larger than this are skipped (image_too_large)
    max_pixels: int = DEFAULT_MAX_PIXELS  # images with more pixels are skipped, not decoded
    threads: int = 8  # files read and verified at once (I/O and PIL decode in parallel)
    progress: bool = True  # progress on stderr: a tqdm bar on terminals, else a line every 2 s


@dataclass(frozen=True)
class Item:
    """One input: where to read it, its key, its metadata, its size when listed."""

    key: str
    uri: str
    metadata: dict[str, Any]
    size: int | None = None


@dataclass
class Plan:
    """The inputs in shard order, and what was skipped before reading anything."""

    items: list[Item]
    listed: int
    skipped: list[dict[str, str]] = field(default_factory=list)


def run_ingest(config: IngestConfig) -> dict[str, Any]:
    """List, assign to shards, write the missing shards; returns the summary."""
    check_config(config)
    started = time.perf_counter()
    plan = plan_inputs(config)
    if not plan.items:
        reasons = dict(Counter(s["reason"] for s in plan.skipped))
        raise UserError(
            f"no images found in {config.source} ({plan.listed} files listed, skipped: "
            f"{reasons or 'none'}); give a folder or list of .jpg/.png/... files"
        )
    out = storage.open_storage(config.output)
    chunks = [
        plan.items[i : i + config.shard_size] for i in range(0, len(plan.items), config.shard_size)
    ]
    results = write_all(out, chunks, config)
    remove_stale(out, config.prefix, len(chunks))
    summary = summarize(config, out, plan, results, time.perf_counter() - started)
    out.write_bytes("ingest.json", json.dumps(summary, indent=2).encode("utf-8"))
    print_summary(summary)
    if summary["examples"] == 0:
        raise UserError(
            f"none of the {len(plan.items)} images in {config.source} could be used "
            f"(skipped: {summary['skipped']}); see {out.url('ingest.json')}"
        )
    return summary


def check_config(config: IngestConfig) -> None:
    if not config.source:
        raise UserError("ingest needs a source: --set source=FOLDER_OR_S3_PREFIX_OR_LIST.csv")
    if config.shard_size < 1:
        raise UserError(f"shard_size must be at least 1, got {config.shard_size}")
    if not config.prefix or _UNSAFE_KEY.sub("", config.prefix) != config.prefix:
        raise UserError(f"prefix {config.prefix!r} must be letters, digits, '_' or '-'")


# -- listing -----------------------------------------------------------------------------------


def plan_inputs(config: IngestConfig) -> Plan:
    source = config.source
    if source.lower().endswith(LIST_SUFFIXES):
        return plan_list(config)
    if not is_remote(source):
        path = local_path(source)
        if not os.path.exists(path):
            raise UserError(f"source {source} does not exist; give an image folder or list")
        if not os.path.isdir(path):
            raise UserError(
                f"source {source} is a file; give a folder, an s3:// prefix, or a "
                f"list ({', '.join(LIST_SUFFIXES)})"
            )
    return plan_listing(config)


def plan_listing(config: IngestConfig) -> Plan:
    """Every file under a folder or prefix, sorted by key; names decide what is skipped.
    Files under the output (when it lies inside the source) are left out."""
    root = storage.open_storage(config.source.rstrip("/") or config.source)
    output = storage.open_storage(config.output).uri.rstrip("/") + "/"
    listed = [(rel, _url(root, rel)) for rel in list_source(root)]
    listed = [(rel, url) for rel, url in listed if not (url or "").startswith(output)]
    skipped: list[dict[str, str]] = []
    candidates: list[tuple[str, str, Item]] = []
    for rel, url in listed:
        reason = "read_error" if url is None else name_reason(rel)
        if reason:
            skipped.append({"source": url or f"{root.uri}/{rel}", "reason": reason})
            continue
        metadata: dict[str, Any] = {"source": url}
        parent = posixpath.basename(posixpath.dirname(rel))
        if config.label_field and parent:
            metadata[config.label_field] = parent
        key = key_of(rel)
        candidates.append((key, rel, Item(key, url, metadata, _local_size(root, rel))))
    candidates.sort(key=lambda c: (c[0], c[1]))
    return Plan(unique(candidates, skipped), len(listed), skipped)


def _url(root: storage.Storage, rel: str) -> str | None:
    """The object's URI, None for a name the storage layer refuses (`a//b`, control chars)."""
    try:
        return root.url(rel)
    except ValueError:
        return None


def list_source(root: storage.Storage) -> list[str]:
    try:
        return root.list("")
    except FileNotFoundError as exc:
        raise UserError(f"source {root.uri} does not exist: {exc}") from exc
    except storage.StorageError as exc:
        raise UserError(f"cannot list source {root.uri}: {exc}") from exc


def name_reason(rel: str) -> str | None:
    """Why a listed file is skipped by its name alone, or None."""
    if any(part.startswith(".") for part in rel.split("/")):
        return "hidden_file"  # .DS_Store, AppleDouble ._x.jpg, .git/...
    if not rel.lower().endswith(IMAGE_SUFFIXES):
        return "unsupported_extension"
    return None


def _local_size(root: storage.Storage, rel: str) -> int | None:
    path = root.local_path(rel)
    return os.path.getsize(path) if path else None


def unique(candidates: list[tuple[str, str, Item]], skipped: list[dict[str, str]]) -> list[Item]:
    """Items with distinct keys (the first of each key wins), the rest as duplicate_key."""
    seen: set[str] = set()
    items = []
    for key, _, item in candidates:
        if key in seen:
            skipped.append({"source": item.uri, "reason": "duplicate_key"})
            continue
        seen.add(key)
        items.append(item)
    return items


def plan_list(config: IngestConfig) -> Plan:
    """Rows of a CSV/TSV/Parquet list, in file order; every other column becomes metadata."""
    rows = read_list(config.source)
    if not rows:
        raise UserError(f"list {config.source} has no rows")
    uri_column = pick_uri_column(config, list(rows[0]))
    if config.key_column and config.key_column not in rows[0]:
        raise UserError(
            f"key_column {config.key_column!r} is not a column of {config.source} "
            f"(columns: {', '.join(rows[0])})"
        )
    base = posixpath.dirname(config.source) if is_remote(config.source) else None
    folder = base or os.path.dirname(os.path.abspath(local_path(config.source)))
    skipped: list[dict[str, str]] = []
    candidates = []
    for row in rows:
        raw = row.get(uri_column)
        if raw is None or not str(raw).strip():
            skipped.append({"source": json.dumps(row, default=str)[:200], "reason": "missing_file"})
            continue
        uri, rel = resolve_uri(str(raw).strip(), folder)
        key = safe_key(str(row[config.key_column])) if config.key_column else key_of(rel)
        metadata = {"source": uri}
        metadata.update({k: json_value(v) for k, v in row.items() if k != uri_column})
        candidates.append((key, "", Item(key, uri, metadata)))
    return Plan(unique(candidates, skipped), len(rows), skipped)


def read_list(source: str) -> list[dict[str, Any]]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        data = storage.read_uri(source)
    except FileNotFoundError as exc:
        raise UserError(f"source list {source} does not exist") from exc
    lower = source.lower()
    try:
        if lower.endswith((".parquet", ".pq")):
            table = pq.read_table(io.BytesIO(data))
        else:
            delimiter = "\t" if lower.endswith(".tsv") else ","
            table = pacsv.read_csv(
                io.BytesIO(data), parse_options=pacsv.ParseOptions(delimiter=delimiter)
            )
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends on malformed files
        raise UserError(f"cannot read list {source}: {str(exc).splitlines()[0]}") from exc
    return table.to_pylist()


def pick_uri_column(config: IngestConfig, columns: list[str]) -> str:
    if config.uri_column:
        if config.uri_column not in columns:
            raise UserError(
                f"uri_column {config.uri_column!r} is not a column of {config.source} "
                f"(columns: {', '.join(columns)})"
            )
        return config.uri_column
    lower = {c.lower(): c for c in columns}
    for name in URI_COLUMNS:
        if name in lower:
            return lower[name]
    raise UserError(
        f"no image column in {config.source} (columns: {', '.join(columns)}); name it "
        f"one of {', '.join(URI_COLUMNS)} or --set uri_column=NAME"
    )


def resolve_uri(raw: str, folder: str) -> tuple[str, str]:
    """(URI to read, path the key comes from) of one list entry.

    Relative paths are relative to the list's folder; the key path is the entry's path below
    that folder when it lies there, else its path without the scheme.
    """
    if is_remote(raw):
        uri = raw
    elif is_remote(folder):
        uri = raw if raw.startswith("/") else posixpath.join(folder, local_path(raw))
    else:
        uri = os.path.normpath(os.path.join(folder, local_path(raw)))
    prefix = folder.rstrip("/") + "/"
    rel = uri[len(prefix) :] if uri.startswith(prefix) else uri.split("://", 1)[-1]
    return uri, rel.lstrip("/")


def json_value(value: Any) -> Any:
    """A list-file cell as JSON data: NaN becomes null, dates and such their text."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    return str(value)


def key_of(rel: str) -> str:
    """WebDataset key of a relative path: the path without its extension, each segment
    reduced to [A-Za-z0-9_-]; a hash of the path is appended when anything changed, so
    distinct files keep distinct keys (`a/x.jpg` -> `a/x`, `a b/x.1.jpg` -> `a_b/x_1-<hash>`)."""
    stem = posixpath.splitext(rel)[0]
    return safe_key(stem, rel)


def safe_key(text: str, identity: str | None = None) -> str:
    segments = [_UNSAFE_KEY.sub("_", s).strip("_") or "_" for s in text.split("/") if s]
    key = "/".join(segments)[:_MAX_KEY] or "_"
    if key != text:
        digest = hashlib.blake2b((identity or text).encode("utf-8", "surrogatepass"), digest_size=4)
        key = f"{key}-{digest.hexdigest()}"
    return key


# -- writing -----------------------------------------------------------------------------------


@dataclass
class ShardResult:
    url: str | None  # None: no input of the shard could be used, nothing written
    examples: int
    skipped: list[dict[str, str]]
    reused: bool


def write_all(out: storage.Storage, chunks: list[list[Item]], config: IngestConfig):
    total = sum(len(c) for c in chunks)
    bar = Progress("ingest", total, "images", enabled=config.progress)
    results = []
    with bar, ThreadPoolExecutor(max(1, config.threads), thread_name_prefix="ingest") as pool:
        for index, chunk in enumerate(chunks):
            results.append(write_shard(out, index, chunk, config, pool, bar))
    return results


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def marker_name(prefix: str, index: int) -> str:
    return f"_ingest/{prefix}-{index:06d}.json"


def fingerprint(items: list[Item], config: IngestConfig) -> str:
    """Hash of what a shard's bytes depend on: its inputs (key, URI, size, metadata) and
    the settings that decide what is kept."""
    data = {
        "version": FORMAT_VERSION,
        "max_bytes": config.max_bytes,
        "max_pixels": config.max_pixels,
        "items": [asdict(item) for item in items],
    }
    text = json.dumps(data, sort_keys=True, default=str).encode("utf-8")
    return hashlib.blake2b(text, digest_size=16).hexdigest()


def write_shard(out, index: int, items: list[Item], config: IngestConfig, pool, bar) -> ShardResult:
    """Shard `index` of `items`: kept when its marker matches, else written, then marked. A
    shard none of whose inputs could be used is not written (a reader counts an empty tar
    as damage); its marker says so."""
    name, marker = shard_name(config.prefix, index), marker_name(config.prefix, index)
    digest = fingerprint(items, config)
    done = read_marker(out, marker)
    if done and done.get("fingerprint") == digest and _size(out, name) == done.get("bytes"):
        bar.update(done=len(items))
        url = out.url(name) if done["examples"] else None
        return ShardResult(url, done["examples"], done["skipped"], reused=True)
    data, examples, skipped = build_tar(items, config, pool, bar)
    if examples:
        out.write_bytes(name, data)  # atomic: the old shard or the whole new one
    else:
        out.delete(name)
    done = {
        "fingerprint": digest,
        "bytes": len(data) if examples else None,
        "sha256": hashlib.sha256(data).hexdigest() if examples else None,
        "examples": examples,
        "skipped": skipped,
    }
    out.write_bytes(marker, json.dumps(done, indent=1).encode("utf-8"))  # after the shard
    return ShardResult(out.url(name) if examples else None, examples, skipped, reused=False)


def build_tar(items: list[Item], config: IngestConfig, pool, bar):
    """(tar bytes, examples in it, skipped inputs with reasons)."""
    buffer, examples, skipped = io.BytesIO(), 0, []
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for item, (payload, reason) in zip(items, _prepared(items, config, pool), strict=True):
            bar.update()
            if reason:
                skipped.append({"source": item.uri, "reason": reason})
                continue
            data, ext = payload
            add_member(tf, f"{item.key}.{ext}", data)
            add_member(tf, f"{item.key}.json", json.dumps(item.metadata, sort_keys=True).encode())
            examples += 1
    return buffer.getvalue(), examples, skipped


def read_marker(out: storage.Storage, marker: str) -> dict[str, Any] | None:
    try:
        return json.loads(out.read_bytes(marker))
    except FileNotFoundError:
        return None
    except ValueError:  # a damaged marker: the shard is written again
        return None


def _size(out: storage.Storage, name: str) -> int | None:
    try:
        return out.size(name)
    except FileNotFoundError:
        return None


def _prepared(items: list[Item], config: IngestConfig, pool) -> Iterator[tuple[Any, str | None]]:
    """(encoded bytes, extension) or (None, skip reason) per item, in order; a bounded window
    of items is read and verified on the pool ahead of the tar writer."""
    window = max(1, config.threads) * 4
    for start in range(0, len(items), window):
        batch = items[start : start + window]
        yield from pool.map(lambda item: prepare(item, config), batch)


def prepare(item: Item, config: IngestConfig) -> tuple[tuple[bytes, str] | None, str | None]:
    if item.size is not None and item.size > config.max_bytes:
        return None, "image_too_large"
    try:
        data = storage.read_uri(item.uri)
    except FileNotFoundError:
        return None, "missing_file"
    except (OSError, ValueError) as exc:
        log.info("cannot read %s: %s", item.uri, exc)
        return None, "read_error"
    if len(data) > config.max_bytes:
        return None, "image_too_large"
    return verified(data, config.max_pixels)


def verified(data: bytes, max_pixels: int) -> tuple[tuple[bytes, str] | None, str | None]:
    """((bytes, ext), None) for an image PIL decodes in full; (None, reason) otherwise.
    Kept formats keep their bytes, stored under the extension of their real format."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_OPEN_FORMATS) as im:
                width, height = im.size
                if width < 1 or height < 1:
                    return None, "undecodable_image"
                if width * height > max_pixels:
                    return None, "image_too_large"
                im.load()
                if im.format in KEPT_FORMATS:
                    return (data, KEPT_FORMATS[im.format]), None
                return (to_png(im), "png"), None
    except Image.DecompressionBombError:
        return None, "image_too_large"
    except Exception:  # PIL raises many types on hostile input; all mean "unusable"
        return None, "undecodable_image"


def to_png(im: Image.Image) -> bytes:
    """PNG of the first frame (GIF, TIFF, ...), converted to a mode PNG stores."""
    if im.mode not in _PNG_MODES:
        im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
    out = io.BytesIO()
    im.save(out, format="PNG")
    return out.getvalue()


def remove_stale(out: storage.Storage, prefix: str, count: int) -> None:
    """Shards (and markers) of an earlier ingest beyond this one's last shard: the output
    then holds exactly this corpus. Only shards with our marker are touched."""
    pattern = re.compile(rf"_ingest/{re.escape(prefix)}-(\d{{6}})\.json")
    for marker in out.list("_ingest/"):
        match = pattern.fullmatch(marker)
        if match and int(match.group(1)) >= count:
            out.delete(shard_name(prefix, int(match.group(1))))  # the shard first, then
            out.delete(marker)  # its marker, so a crash in between is cleaned up next time


# -- the summary -------------------------------------------------------------------------------


def summarize(config, out, plan: Plan, results: list[ShardResult], seconds: float) -> dict:
    skipped = plan.skipped + [s for r in results for s in r.skipped]
    counts = Counter(s["reason"] for s in skipped)
    return {
        "source": config.source,
        "output": out.uri,
        "shards": [r.url for r in results if r.url],
        "shard_size": config.shard_size,
        "listed": plan.listed,
        "examples": sum(r.examples for r in results),
        "skipped": {reason: counts[reason] for reason in SKIP_REASONS if counts[reason]},
        "shards_written": sum(not r.reused for r in results if r.url),
        "shards_reused": sum(r.reused for r in results if r.url),
        "skipped_files": skipped[:_MAX_LISTED_SKIPS],
        "seconds": round(seconds, 2),
    }


def print_summary(summary: dict) -> None:
    skipped = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items()) or "none"
    print(
        f"ingest: {summary['examples']:,} examples in {len(summary['shards'])} shards "
        f"({summary['shards_written']} written, {summary['shards_reused']} already complete) "
        f"under {summary['output']}; skipped: {skipped}",
        flush=True,
    )
