"""Streaming WebDataset shard reader with bounded, fail-soft image decoding.

A shard is read once, front to back, through `tarfile`'s stream mode (`r|*`, so plain or
gz/bz2/xz compressed): only the current member is ever in memory, never the shard. Members
are grouped into samples by WebDataset's convention: the key is the member path up to the
first '.' of its basename (directory prefix included), the rest is the extension, and
consecutive members with the same key form one sample.

Bad input never raises out of `read_shard`: every problem is counted by reason in a
`ReadStats` and the reader moves on (to the next sample, or out of a damaged shard keeping
what it already yielded). The shard's sha256 and size are computed from the bytes as they
stream past, for the manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image

from pipeline.data._io import open_stream

# Preference order of the image field when a sample has several.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")
# Formats PIL may sniff (content wins over a wrong extension); nothing exotic is parsed.
_PIL_FORMATS = ("JPEG", "PNG", "WEBP", "PPM", "BMP", "GIF", "TIFF")
DEFAULT_MAX_PIXELS = 64_000_000
# Shard-level reasons: the shard (or its rest) is lost; not counted in `seen`.
SHARD_REASONS = ("missing_shard", "empty_shard", "truncated_shard", "corrupt_tar", "read_error")
# Sample-level reasons: `seen == decoded + sum of these`.
SAMPLE_REASONS = (
    "duplicate_key",
    "missing_image",
    "bad_metadata",
    "image_too_large",
    "undecodable_image",
)
SKIP_REASONS = SHARD_REASONS + SAMPLE_REASONS
# Metadata members above this are refused unread (bad_metadata).
_MAX_METADATA_BYTES = 1 << 20
# tarfile's read chunk: larger means fewer Python calls, but each header read copies the rest.
_TAR_BUFSIZE = 1 << 16
# PIL reduces by an integer factor first when downscaling more than this (fast, near-exact).
_REDUCING_GAP = 3.0
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class ImageError(ValueError):
    """An image that cannot be used; `reason` is its skip reason."""

    reason = "undecodable_image"


class ImageTooLargeError(ImageError):
    """Header size above the pixel bound: refused before decoding (decompression bombs)."""

    reason = "image_too_large"


class UndecodableImageError(ImageError):
    """Not an image, truncated, or in a format/mode that cannot be read."""

    reason = "undecodable_image"


@dataclass
class Sample:
    """One decoded example: `image` is [channels, side, side] float32 in [0, 1]."""

    key: str
    image: torch.Tensor
    metadata: dict[str, Any]
    cls: int | None
    pixel_hash: str = ""  # of the full decoded pixels: equal only for exact duplicates
    # Where the sample sits in an uncompressed tar (None for compressed shards): its first
    # member's header and the bytes up to its last member's padded data end, so a ranged
    # read of [tar_offset, tar_offset + tar_size) is a little tar of exactly its members.
    tar_offset: int | None = None
    tar_size: int | None = None


@dataclass
class ShardDigest:
    """What the manifest records of one shard read.

    `complete` is True when every byte of the file went through the hash (also for a
    damaged shard, which is drained after the damage); False when the consumer stopped
    early or the stream failed, in which case sha256/size cover only a prefix.
    """

    sha256: str
    size: int
    samples: int
    complete: bool
    error: str | None = None


@dataclass
class ReadStats:
    """Counts of one or many shard reads; merge with `+` (or `sum(parts, ReadStats())`).

    `seen` counts samples (key groups) met, `decoded` those yielded, and
    `seen == decoded + sum(skipped[r] for r in SAMPLE_REASONS)`; shard-level reasons count
    shards. `shards` maps each URL read to its ShardDigest (merge: union, right side wins).
    """

    seen: int = 0
    decoded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    shards: dict[str, ShardDigest] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def __iadd__(self, other: ReadStats) -> ReadStats:
        """Merge in place: linear in `other`, however many shards this one holds."""
        self.seen += other.seen
        self.decoded += other.decoded
        for reason, count in other.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count
        self.shards.update(other.shards)
        return self

    def __add__(self, other: ReadStats) -> ReadStats:
        merged = ReadStats(self.seen, self.decoded, dict(self.skipped), dict(self.shards))
        merged += other
        return merged

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {
            "seen": self.seen,
            "decoded": self.decoded,
            "skipped": dict(sorted(self.skipped.items())),
            "shards": {url: vars(d).copy() for url, d in self.shards.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReadStats:
        return cls(
            seen=int(data.get("seen", 0)),
            decoded=int(data.get("decoded", 0)),
            skipped={str(k): int(v) for k, v in data.get("skipped", {}).items()},
            shards={url: ShardDigest(**d) for url, d in data.get("shards", {}).items()},
        )


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_image(
    data: bytes, side: int, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """Decode encoded image bytes to [channels, side, side] float32 in [0, 1].

    The shorter side is resized to `side` (antialiased) and the centre square kept. Raises
    ImageTooLargeError when the header's width * height exceeds `max_pixels` (checked
    before any pixel is decoded) and UndecodableImageError for anything else that fails.
    """
    return decode_image_hashed(data, side, channels, max_pixels)[0]


def decode_image_hashed(
    data: bytes, side: int, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[torch.Tensor, str]:
    """`decode_image` plus a hash of the decoded pixels before resizing.

    The hash covers mode, size and every pixel, so two files are equal under it exactly when
    they decode to the same image (a PNG and a lossless re-encode of it match; a resized or
    re-compressed copy does not).
    """
    _check_shape_args(side, channels)
    try:
        with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as im:
            _check_pixels(im.size, max_pixels)
            _draft(im, side, channels)
            converted = _convert(im, channels)
            return _to_tensor(_fit(converted, side), channels), pixel_hash(converted)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(str(exc)) from exc
    except Exception as exc:  # PIL raises many types on hostile input; all mean "unusable"
        raise UndecodableImageError(f"{type(exc).__name__}: {exc}") from exc


def pixel_hash(im: Image.Image) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{im.mode}:{im.size[0]}x{im.size[1]}:".encode())
    digest.update(im.tobytes())
    return digest.hexdigest()


def _check_shape_args(side: int, channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if side < 1:
        raise ValueError(f"side must be positive, got {side}")


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise UndecodableImageError(f"empty image {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLargeError(f"{width}x{height} exceeds {max_pixels} pixels")


def _draft(im: Image.Image, side: int, channels: int) -> None:
    """Let JPEG decode at 1/2, 1/4 or 1/8 scale when that still covers `side` (much faster)."""
    if im.format not in ("JPEG", "MPO"):
        return
    width, height = im.size
    shorter = min(width, height)
    if shorter < 2 * side:
        return
    want = (math.ceil(width * side / shorter), math.ceil(height * side / shorter))
    im.draft("L" if channels == 1 else "RGB", want)


def _convert(im: Image.Image, channels: int) -> Image.Image:
    """To "L" / "RGB" (8 bit) or, for 16-bit and float images, "F" in [0, 1]."""
    if im.mode in _HIGH_BIT_MODES:
        return _to_unit_float(im)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # PIL warns when dropping palette transparency directly
    target = "L" if channels == 1 else "RGB"
    if im.mode == target:
        return im
    try:
        return im.convert(target)
    except ValueError:  # no direct conversion (e.g. LAB -> L, La): go through RGB(A)
        return im.convert("RGBA").convert(target)


def _to_unit_float(im: Image.Image) -> Image.Image:
    """16-bit integer images scaled by 1/65535; float images clipped to [0, 1]."""
    arr = np.asarray(im, dtype=np.float32)
    arr = arr if im.mode == "F" else arr / 65535.0
    return Image.fromarray(np.clip(arr, 0.0, 1.0).astype(np.float32))


def _fit(im: Image.Image, side: int) -> Image.Image:
    """Resize the shorter side to `side` and keep the centre square, in one PIL call."""
    width, height = im.size
    shorter = min(width, height)
    if shorter == side:  # pure crop: exact pixels, no resampling
        left, top = (width - side) // 2, (height - side) // 2
        return im if width == height else im.crop((left, top, left + side, top + side))
    left, top = (width - shorter) / 2, (height - shorter) / 2
    gap = _REDUCING_GAP if shorter >= _REDUCING_GAP * side else None
    return im.resize(
        (side, side),
        Image.Resampling.BILINEAR,
        box=(left, top, left + shorter, top + shorter),
        reducing_gap=gap,
    )


def _to_tensor(im: Image.Image, channels: int) -> torch.Tensor:
    arr = np.array(im)  # a writable copy, so torch shares it safely
    tensor = torch.from_numpy(arr)
    tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()
    if tensor.dtype == torch.uint8:
        tensor = tensor.to(torch.float32).div_(255.0)
    if tensor.shape[0] != channels:  # only "F" images reach here with 1 channel
        tensor = tensor.expand(channels, -1, -1).contiguous()
    return tensor


# ---------------------------------------------------------------------------------------------
# Streaming


class _HashingReader:
    """Pass-through reader that hashes and counts every byte read from `raw`."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.data_end = 0  # offset just past the last non-zero byte

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.sha256.update(data)
        if nonzero := len(data.rstrip(b"\0")):
            self.data_end = self.size + nonzero
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


@dataclass
class _Member:
    """One wanted member of the current sample: its bytes, or None when over the limit."""

    data: bytes | None


@dataclass
class _Group:
    key: str
    members: dict[str, _Member] = field(default_factory=dict)
    extensions: set[str] = field(default_factory=set)
    offset: int | None = None  # tar offset of the first member's header (plain tar only)
    end: int = 0  # tar offset just past the last member's data blocks

    @property
    def span(self) -> tuple[int, int] | None:
        """(offset, size) of the sample's bytes in the tar, None when not addressable."""
        return None if self.offset is None else (self.offset, self.end - self.offset)


@dataclass
class _ShardState:
    """Per-shard bookkeeping: the last tar header error, the shard's reason, counts."""

    header_error: Exception | None = None
    reason: str | None = None
    groups: int = 0
    samples: int = 0
    keys: set[str] = field(default_factory=set)
    end_offset: int | None = None  # uncompressed tar: where its end-of-archive block is


def read_shard(
    url: str,
    side: int,
    channels: int,
    stats: ReadStats,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    decode_threads: int = 1,
) -> Iterator[Sample]:
    """Yield the decodable samples of one shard, in order, counting the rest in `stats`.

    With `decode_threads > 1`, images decode on a thread pool, a bounded window ahead of the
    consumer, and still come out in stream order.

    Once the generator is exhausted (or closed), `stats.shards[url]` holds the shard's
    sha256, size, sample count and shard-level reason, if any.
    """
    _check_shape_args(side, channels)
    state = _ShardState()
    try:
        raw = open_stream(url)
    except OSError as exc:
        state.reason = "missing_shard" if isinstance(exc, FileNotFoundError) else "read_error"
        stats.skip(state.reason)
        stats.shards[url] = ShardDigest("", 0, 0, complete=False, error=state.reason)
        return
    reader = _HashingReader(raw)
    complete = False
    try:
        ahead = 2 * decode_threads if decode_threads > 1 else 0
        with _decoder(side, channels, max_pixels, decode_threads) as decode:
            window: deque[_Pending] = deque()  # decodes in flight, in stream order
            for group in _groups(reader, state, max_pixels):
                pending = _prepare(group, state, stats, decode)
                if pending is not None:
                    window.append(pending)
                while len(window) > ahead:
                    if (sample := _finish(window.popleft(), state, stats)) is not None:
                        yield sample
            while window:
                if (sample := _finish(window.popleft(), state, stats)) is not None:
                    yield sample
        complete = _drain(reader, state)
        state.reason = state.reason or _tail_reason(reader, state)
        if state.reason is not None:
            stats.skip(state.reason)
    finally:
        raw.close()
        digest = reader.sha256.hexdigest()
        stats.shards[url] = ShardDigest(digest, reader.size, state.samples, complete, state.reason)


def read_shards(
    urls: Iterable[str],
    side: int,
    channels: int,
    stats: ReadStats,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[Sample]:
    """`read_shard` over several shards in turn."""
    for url in urls:
        yield from read_shard(url, side, channels, stats, max_pixels)


def _drain(reader: _HashingReader, state: _ShardState) -> bool:
    """Read the rest of the stream (tar padding, or what follows damage) into the hash."""
    try:
        reader.drain()
    except Exception:  # the stream failed after the samples: the digest stays partial
        state.reason = state.reason or "read_error"
        return False
    return True


def _tail_reason(reader: _HashingReader, state: _ShardState) -> str | None:
    """Reason found at a clean-looking end: no sample at all, or data after the end marker
    (a zeroed header block reads as end-of-archive; what follows it is lost)."""
    if state.end_offset is not None and reader.data_end > state.end_offset + tarfile.BLOCKSIZE:
        return "corrupt_tar"
    if state.groups == 0:
        return "empty_shard"
    return None


def _tarinfo_class(state: _ShardState) -> type[tarfile.TarInfo]:
    """A TarInfo that records header errors: tarfile ends iteration silently on a corrupt
    or truncated header after the first member, and this is how that is told from a clean
    end of archive."""

    class TrackedTarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
            try:
                return super().fromtarfile(tf)
            except tarfile.HeaderError as exc:
                state.header_error = exc
                raise

    return TrackedTarInfo


def _groups(reader: _HashingReader, state: _ShardState, max_pixels: int) -> Iterator[_Group]:
    """Samples' raw members, grouped by key; stops (recording why) at shard damage.

    The group in progress when damage is met between members is still yielded: its
    members were read intact (trailing ones beyond the damage, e.g. a later `.json`, are
    missing). A group whose member data is cut off is dropped.
    """
    group: _Group | None = None
    in_member = False
    try:
        with tarfile.open(
            fileobj=reader, mode="r|*", tarinfo=_tarinfo_class(state), bufsize=_TAR_BUFSIZE
        ) as tf:
            # Stream offsets are file offsets only without compression.
            plain = getattr(tf.fileobj, "comptype", None) == "tar"
            while (info := tf.next()) is not None:
                tf.members = []  # stream mode otherwise keeps every TarInfo of the shard
                key, ext = _split_name(info.name) if info.isfile() else (None, "")
                if key is None:
                    continue
                if group is not None and (key != group.key or ext in group.extensions):
                    yield group
                    group = None
                if group is None:
                    # info.offset is that of the member's first header (pax / GNU long
                    # name headers included), so the span covers them too.
                    group = _Group(key, offset=info.offset if plain else None)
                    state.groups += 1
                group.extensions.add(ext)
                group.end = info.offset_data + _blocks(info.size)
                if limit := _member_limit(ext, max_pixels):
                    in_member = True
                    group.members[ext] = _Member(_read_member(tf, info, limit))
                    in_member = False
            state.reason = _end_reason(state.header_error)
            if state.reason is None and getattr(tf.fileobj, "comptype", None) == "tar":
                state.end_offset = tf.offset  # checked against trailing data after the drain
    except Exception as exc:  # tarfile / decompressors / the stream: all end this shard
        state.reason = _error_reason(exc, state, reader.size)
        if in_member:
            group = None
    if group is not None:
        yield group


def _blocks(size: int) -> int:
    """`size` rounded up to whole tar blocks (member data is padded to them)."""
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _split_name(name: str) -> tuple[str | None, str]:
    """WebDataset key and extension of a member path (key None: not a sample member)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:  # no extension, or a hidden / AppleDouble file
        return None, ""
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _member_limit(ext: str, max_pixels: int) -> int:
    """Byte limit of a wanted member (0: not wanted, never read)."""
    if ext in IMAGE_EXTENSIONS:
        return 8 * max_pixels + (1 << 20)  # beyond any sane encoding of max_pixels
    if ext in ("json", "cls"):
        return _MAX_METADATA_BYTES
    return 0


def _read_member(tf: tarfile.TarFile, info: tarfile.TarInfo, limit: int) -> bytes | None:
    """The member's bytes, or None when over `limit` (left unread; tarfile skips it)."""
    if info.size > limit:
        return None
    handle = tf.extractfile(info)
    if handle is None:
        return b""
    data = handle.read()
    if len(data) != info.size:
        raise tarfile.ReadError("unexpected end of data")
    return data


def _end_reason(header_error: Exception | None) -> str | None:
    """Reason of a silent end of iteration: None for a clean end-of-archive block."""
    if header_error is None or isinstance(header_error, tarfile.EOFHeaderError):
        return None
    if isinstance(header_error, tarfile.EmptyHeaderError | tarfile.TruncatedHeaderError):
        return "truncated_shard"
    return "corrupt_tar"


def _data_cut(exc: Exception) -> bool:
    return "unexpected end of data" in str(exc)


def _error_reason(exc: Exception, state: _ShardState, size: int) -> str:
    """Skip reason of an exception that ended a shard."""
    if isinstance(exc, FileNotFoundError) and size == 0:
        return "missing_shard"  # stores that open lazily fail on the first read
    if isinstance(exc, EOFError) or _data_cut(exc):
        return "truncated_shard"
    if isinstance(exc, tarfile.ReadError) and isinstance(
        state.header_error, tarfile.EmptyHeaderError | tarfile.TruncatedHeaderError
    ):
        return "empty_shard" if size == 0 else "truncated_shard"
    if isinstance(exc, OSError):
        return "read_error"  # the stream itself failed (tarfile wraps decompressor errors)
    return "corrupt_tar"  # tarfile.ReadError, malformed pax headers, ...


@dataclass
class _Pending:
    """A sample whose cheap checks passed; its image is decoding (maybe in another thread)."""

    key: str
    metadata: dict[str, Any]
    cls: int | None
    image: Future
    span: tuple[int, int] | None = None


def _prepare(
    group: _Group, state: _ShardState, stats: ReadStats, decode: Callable[[bytes], Future]
) -> _Pending | None:
    """Cheap checks in stream order (keys, image member, metadata), then start the decode."""
    stats.seen += 1
    if group.key in state.keys:
        stats.skip("duplicate_key")
        return None
    state.keys.add(group.key)
    ext = next((e for e in IMAGE_EXTENSIONS if e in group.members), None)
    if ext is None:
        stats.skip("missing_image")
        return None
    try:
        metadata, cls = _metadata(group)
    except (ValueError, TypeError, RecursionError):
        stats.skip("bad_metadata")
        return None
    data = group.members[ext].data
    if data is None:
        stats.skip("image_too_large")
        return None
    return _Pending(group.key, metadata, cls, decode(data), group.span)


def _finish(pending: _Pending, state: _ShardState, stats: ReadStats) -> Sample | None:
    """The decoded sample, or None with the decode failure counted."""
    try:
        image, digest = pending.image.result()
    except ImageError as exc:
        stats.skip(exc.reason)
        return None
    stats.decoded += 1
    state.samples += 1
    offset, size = pending.span or (None, None)
    return Sample(pending.key, image, pending.metadata, pending.cls, digest, offset, size)


@contextmanager
def _decoder(side: int, channels: int, max_pixels: int, threads: int):
    """`decode(bytes) -> Future[tensor]`: inline for one thread, else on a thread pool
    (PIL releases the GIL while decoding, so threads decode in parallel)."""

    def work(data: bytes) -> tuple[torch.Tensor, str]:
        return decode_image_hashed(data, side, channels, max_pixels)

    if threads <= 1:

        def inline(data: bytes) -> Future:
            future: Future = Future()
            try:
                future.set_result(work(data))
            except ImageError as exc:
                future.set_exception(exc)
            return future

        yield inline
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:
        yield lambda data: pool.submit(work, data)


def _metadata(group: _Group) -> tuple[dict[str, Any], int | None]:
    """Parsed `.json` (must be an object) and `.cls` (integer text); ValueError if bad."""
    metadata: dict[str, Any] = {}
    cls = None
    if "json" in group.members:
        data = group.members["json"].data
        if data is None:
            raise ValueError("metadata too large")
        metadata = json.loads(data)
        if not isinstance(metadata, dict):
            raise ValueError("metadata is not a JSON object")
    if "cls" in group.members:
        data = group.members["cls"].data
        if data is None:
            raise ValueError("class too large")
        cls = int(data.decode("ascii").strip())
    return metadata, cls
