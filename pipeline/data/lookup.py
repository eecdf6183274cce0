"""Read examples back from their shards by key: encoded images and PNG thumbnails.

An index stores no pixels, only each example's key, source shard and (since parts carry
`tar_offset` / `tar_size`) where its bytes sit in the shard. A key with such a span is read
with one ranged read (near spans merged into one), parsed with the same tar machinery as
`read_shard` and kept only if the key is found exactly where the span says. Any other key
(an older index, a compressed shard, a shard changed since the build) is found by streaming
its shard once (stream mode, one member in memory at a time, damage ends the shard instead of
raising), stopping as soon as every wanted key was seen. `thumbnails` does this for a table
of (key, shard) rows, shards in parallel, and never raises for bad input: a key that cannot
be shown gets a placeholder tile and its reason.
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from pipeline.data._io import open_stream, read_range
from pipeline.data.webdataset import (
    _PIL_FORMATS,
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageError,
    UndecodableImageError,
    _check_pixels,
    _convert,
    _Group,
    _groups,
    _ShardState,
)
from pipeline.storage.errors import StoreUnreachableError

log = logging.getLogger(__name__)

# Reasons a key has no thumbnail (ThumbnailSet.missing values).
MISSING_SHARD = "missing_shard"  # the shard is gone (or unreadable)
NOT_IN_SHARD = "not_in_shard"  # the shard was read to its end without the key
NO_IMAGE = "missing_image"  # the sample has no image member (or an oversized one)
UNDECODABLE = "undecodable_image"
READ_ERROR = "read_error"  # the shard exists but could not be opened (denied, bad URL, ...)
UNREACHABLE = "store_unreachable"  # no connection to its store (this shard, or one before it)
_PLACEHOLDER_GREY = 225
_GREY_MODES = ("1", "L", "LA", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")
# Part columns locating an example's bytes in its (uncompressed) shard.
SPAN_COLUMNS = ("tar_offset", "tar_size")
# Spans closer than this share one read: the gap costs less than another request's latency.
COALESCE_GAP = 64 * 1024
_MAX_RUN = 16 << 20  # ... but one read stays bounded in memory
_END_OF_ARCHIVE = bytes(2 * tarfile.BLOCKSIZE)

Span = tuple[int, int]  # (tar_offset, tar_size) of one example in its shard


class _CountingReader:
    """Pass-through reader counting bytes (what `_groups` needs; no hashing, unlike build)."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.size += len(data)
        return data


@dataclass
class ShardScan:
    """What one pass over a shard found: encoded image bytes by key, and why it ended early."""

    images: dict[str, bytes] = field(default_factory=dict)
    no_image: set[str] = field(default_factory=set)  # sample found, but no usable image member
    damage: str | None = None  # shard-level reason (truncated_shard, corrupt_tar, ...)
    ranged_reads: int = 0  # ranged reads made, and the bytes they returned
    ranged_bytes: int = 0
    streamed: bool = False  # whether the shard had to be streamed

    def keep(self, group: _Group) -> None:
        ext = next((e for e in IMAGE_EXTENSIONS if e in group.members), None)
        data = group.members[ext].data if ext is not None else None
        if data is None:
            self.no_image.add(group.key)
        else:
            self.images[group.key] = data


def scan_shard(
    shard_url: str,
    keys: Iterable[str],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    spans: Mapping[str, Span] | None = None,
) -> ShardScan:
    """The encoded image of each wanted key of `shard_url`.

    Keys with a span in `spans` are read by range; the rest, and any key not found at its
    span, by streaming the shard once. Raises FileNotFoundError (or another OSError) only
    when the shard cannot be read; damage later in the stream ends the scan with `damage`
    set, keeping what was found. The first sample of a key wins (as in `read_shard`, which
    skips later duplicates, and records the first one's span).
    """
    wanted = set(keys)
    scan = ShardScan()
    ranged = {k: spans[k] for k in wanted if spans and spans.get(k)}
    if ranged:
        _read_spans(shard_url, ranged, max_pixels, scan)
        wanted -= scan.images.keys() | scan.no_image
    if wanted:
        _stream(shard_url, wanted, max_pixels, scan)
    return scan


def _read_spans(url: str, spans: dict[str, Span], max_pixels: int, scan: ShardScan) -> None:
    """Ranged reads of the spans; a key is kept only when found at exactly its offset (a
    shard rewritten since the build cannot pass another example off as it)."""
    for start, end, keys in _runs(spans):
        data = read_range(url, start, end - start)
        scan.ranged_reads += 1
        scan.ranged_bytes += len(data)
        if len(data) != end - start:
            continue  # shorter than when indexed: these keys are streamed instead
        # The end-of-archive blocks make the range a complete tar: a clean end, no damage.
        reader = _CountingReader(io.BytesIO(data + _END_OF_ARCHIVE))
        for group in _groups(reader, _ShardState(), max_pixels):
            if group.key in keys and start + (group.offset or 0) == spans[group.key][0]:
                keys.discard(group.key)
                scan.keep(group)


def _runs(spans: dict[str, Span]) -> Iterator[tuple[int, int, set[str]]]:
    """(start, end, keys) of reads covering the spans in offset order, near ones merged."""
    run: tuple[int, int, set[str]] | None = None
    for key, (offset, size) in sorted(spans.items(), key=lambda item: item[1]):
        end = offset + size
        if run and offset - run[1] <= COALESCE_GAP and max(end, run[1]) - run[0] <= _MAX_RUN:
            run = (run[0], max(end, run[1]), run[2] | {key})
            continue
        if run:
            yield run
        run = (offset, end, {key})
    if run:
        yield run


def spans_by_shard(table: pa.Table) -> dict[str, dict[str, Span]]:
    """shard -> key -> span of the rows of a table with key, shard, tar_offset and tar_size
    (rows without a span, and tables without the columns, give none)."""
    if not {"key", "shard", *SPAN_COLUMNS} <= set(table.column_names):
        return {}
    out: dict[str, dict[str, Span]] = {}
    columns = [table.column(c).to_pylist() for c in ("shard", "key", *SPAN_COLUMNS)]
    for shard, key, offset, size in zip(*columns, strict=True):
        if offset is not None and size is not None:
            out.setdefault(shard, {}).setdefault(key, (int(offset), int(size)))
    return out


def _stream(shard_url: str, wanted: set[str], max_pixels: int, scan: ShardScan) -> None:
    """Stream the shard once (until every wanted key was met), keeping what was wanted."""
    scan.streamed = True
    raw = open_stream(shard_url)
    state = _ShardState()
    try:
        groups = _groups(_CountingReader(raw), state, max_pixels)
        try:
            for group in groups:
                if group.key not in wanted:
                    continue
                wanted.discard(group.key)
                scan.keep(group)
                if not wanted:
                    break  # everything found: stop streaming the rest of the shard
        finally:
            groups.close()
    finally:
        raw.close()
    scan.damage = state.reason


def read_images(
    shard_url: str,
    keys: Iterable[str],
    side: int | None = None,
    spans: Mapping[str, Span] | None = None,
) -> dict[str, Image.Image | bytes]:
    """Images of `keys` found in one shard (absent keys are simply not in the result).

    With `side=None` the encoded bytes as stored; otherwise a PIL image ("L" or "RGB")
    fitted into a `side` x `side` box (aspect kept). Raises FileNotFoundError for a missing
    shard; an undecodable image is left out when `side` is given. `spans` as in scan_shard.
    """
    found = scan_shard(shard_url, keys, spans=spans).images
    if side is None:
        return dict(found)
    out: dict[str, Image.Image | bytes] = {}
    for key, data in found.items():
        try:
            out[key] = fit_image(data, side)
        except ImageError:
            continue
    return out


def fit_image(data: bytes, side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded bytes (bounded, like the reader) and fit them into a `side` square box.

    Upscaling uses nearest neighbour (small images such as 28-pixel digits stay crisp and an
    integer factor reproduces the pixels exactly); downscaling is antialiased.
    """
    if side < 1:
        raise ValueError(f"side must be positive, got {side}")
    try:
        with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as im:
            _check_pixels(im.size, max_pixels)
            im.draft("RGB", (side, side))  # JPEG only: decode at a reduced scale when possible
            converted = _to_8bit(_convert(im, _channels(im)))
            return _resize_into(converted, side)  # inside: `converted` may still be `im`
    except ImageError:
        raise
    except Exception as exc:  # hostile input raises many types; all mean "unusable"
        raise UndecodableImageError(f"{type(exc).__name__}: {exc}") from exc


def _channels(im: Image.Image) -> int:
    """Keep grey images grey (1 channel), everything else RGB."""
    return 1 if im.mode in _GREY_MODES else 3


def _to_8bit(im: Image.Image) -> Image.Image:
    """`_convert` gives "F" in [0, 1] for high-bit images: back to 8-bit grey for PNG."""
    if im.mode != "F":
        return im
    return Image.fromarray(np.round(np.asarray(im, np.float32) * 255.0).astype(np.uint8))


def _resize_into(im: Image.Image, side: int) -> Image.Image:
    width, height = im.size
    scale = side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size == im.size:
        return im.copy()  # loads the pixels, detached from the file
    if scale > 1:
        return im.resize(size, Image.Resampling.NEAREST)
    return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def png_bytes(im: Image.Image) -> bytes:
    out = io.BytesIO()
    im.save(out, format="PNG", optimize=False)
    return out.getvalue()


def placeholder(side: int) -> bytes:
    """A grey tile with a cross: shown where an example's image cannot be read."""
    im = Image.new("L", (side, side), _PLACEHOLDER_GREY)
    draw = ImageDraw.Draw(im)
    draw.line((0, 0, side - 1, side - 1), fill=128, width=max(1, side // 32))
    draw.line((0, side - 1, side - 1, 0), fill=128, width=max(1, side // 32))
    return png_bytes(im)


class ThumbnailSet(dict):
    """key -> PNG bytes for every key asked for; `missing` maps the keys shown as a
    placeholder to their reason (missing_shard, not_in_shard, missing_image, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.missing: dict[str, str] = {}


def thumbnails(table: pa.Table, size: int, max_workers: int = 8) -> ThumbnailSet:
    """PNG thumbnails (fitted into `size` x `size`) of the rows of a table with `key` and
    `shard` columns: rows with `tar_offset` / `tar_size` are read by range, each other shard
    is streamed once, up to `max_workers` shards at a time.

    Never raises for missing shards, missing keys or bad images: those get a placeholder
    tile and a reason in `.missing` (also logged).
    """
    for name in ("key", "shard"):
        if name not in table.column_names:
            raise ValueError(f"thumbnails need a {name!r} column, got {table.column_names}")
    keys, shards = table.column("key").to_pylist(), table.column("shard").to_pylist()
    pairs = zip(shards, keys, strict=True)
    images, missing = shard_thumbnails(pairs, size, max_workers, spans_by_shard(table))
    result = ThumbnailSet()
    tile = placeholder(size)
    for (_, key), reason in missing.items():
        result[key] = tile
        result.missing[key] = reason
    result.update({key: png for (_, key), png in images.items()})
    return result


def shard_thumbnails(
    pairs: Iterable[tuple[str, str]],
    size: int,
    max_workers: int = 8,
    spans: Mapping[str, Mapping[str, Span]] | None = None,
) -> tuple[dict[tuple[str, str], bytes], dict[tuple[str, str], str]]:
    """Thumbnails of (shard, key) pairs: (PNG by pair, reason by pair that has none).

    Keyed by the pair, since a key is unique within its shard, not necessarily across shards.
    `spans` (shard -> key -> span, see `spans_by_shard`) lets those keys be read by range.
    """
    spans = spans or {}
    by_shard: dict[str, set[str]] = {}
    for shard, key in pairs:
        by_shard.setdefault(shard, set()).add(key)
    images: dict[tuple[str, str], bytes] = {}
    missing: dict[tuple[str, str], str] = {}
    if not by_shard:
        return images, missing
    breaker = Breaker()
    with ThreadPoolExecutor(max(1, min(max_workers, len(by_shard)))) as pool:
        jobs = {
            shard: pool.submit(_one_shard, shard, keys, size, spans.get(shard), breaker)
            for shard, keys in by_shard.items()
        }
        for shard, job in jobs.items():
            found, lost = job.result()
            images.update({(shard, key): png for key, png in found.items()})
            missing.update({(shard, key): reason for key, reason in lost.items()})
            if lost:
                reasons = sorted(set(lost.values()))
                log.warning("%d image(s) not readable from %s: %s", len(lost), shard, reasons)
    return images, missing


class Breaker:
    """The stores found unreachable: the shards after the first failure there are not tried
    (each would wait out the whole retry budget, ~10-20 s, to fail the same way)."""

    def __init__(self) -> None:
        self.down: set[str] = set()

    @staticmethod
    def store(shard: str) -> str:
        return shard.split("/", 3)[2] if "://" in shard else ""

    def open(self, shard: str) -> bool:
        return self.store(shard) in self.down

    def trip(self, shard: str) -> None:
        if self.store(shard) not in self.down:
            log.warning("store of %s unreachable: its other shards are not tried", shard)
        self.down.add(self.store(shard))


def _one_shard(
    shard: str,
    keys: set[str],
    size: int,
    spans: Mapping[str, Span] | None = None,
    breaker: Breaker | None = None,
) -> tuple[dict[str, bytes], dict[str, str]]:
    """(PNG by key, reason by missing key) of one shard; never raises."""
    breaker = breaker or Breaker()
    if breaker.open(shard):
        return {}, dict.fromkeys(keys, UNREACHABLE)
    try:
        scan = scan_shard(shard, keys, spans=spans)
    except Exception as exc:  # a vanished shard, a denied read, a bad URL: the report goes on
        if isinstance(exc, StoreUnreachableError):
            breaker.trip(shard)
            return {}, dict.fromkeys(keys, UNREACHABLE)
        reason = MISSING_SHARD if isinstance(exc, FileNotFoundError) else READ_ERROR
        log.debug("cannot open %s: %s", shard, exc)
        return {}, dict.fromkeys(keys, reason)
    images: dict[str, bytes] = {}
    missing: dict[str, str] = dict.fromkeys(scan.no_image, NO_IMAGE)
    for key, data in scan.images.items():
        try:
            images[key] = png_bytes(fit_image(data, size))
        except ImageError as exc:
            missing[key] = exc.reason
    for key in keys - images.keys() - missing.keys():
        missing[key] = scan.damage or NOT_IN_SHARD
    return images, missing
