"""Write WebDataset tar shards from (key, image, metadata) triples.

For the demo and tests: real, standard shards (`key.png` / `key.jpg`, `key.json`, `key.cls`)
that any WebDataset reader accepts. Shards are byte-reproducible (fixed member order, mtime,
owner and mode), each built in memory (`per_shard` samples) and written atomically.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data._io import write_object

_FORMATS = {"png": ("png", "PNG"), "jpg": ("jpg", "JPEG"), "jpeg": ("jpg", "JPEG")}
_JPEG_QUALITY = 95


def write_shards(
    out_uri_or_dir: str,
    samples: Iterable[tuple[str, np.ndarray | Image.Image, dict[str, Any]]],
    per_shard: int,
    prefix: str = "shard",
    fmt: str = "png",
) -> list[str]:
    """Write `samples` as `{prefix}-{i:06d}.tar` shards under a folder or `s3://` URI.

    Images are uint8 / bool / uint16 arrays ([H, W], [H, W, 1|3|4]), floats in [0, 1], or
    PIL images; `fmt` is "png" (lossless) or "jpg". Metadata must be JSON-serialisable; an
    integer "cls" in it is also written as `key.cls`. Keys must be unique and valid
    WebDataset keys (no '.' in the last path segment). Returns the shard URLs in order.
    """
    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    if fmt.lower() not in _FORMATS:
        raise ValueError(f"fmt must be one of {sorted(_FORMATS)}, got {fmt!r}")
    ext, pil_format = _FORMATS[fmt.lower()]
    urls = []
    for index, chunk in enumerate(_chunks(_checked(samples), per_shard)):
        data = _tar_bytes(chunk, ext, pil_format)
        urls.append(write_object(out_uri_or_dir, f"{prefix}-{index:06d}.tar", data))
    return urls


def _checked(
    samples: Iterable[tuple[str, Any, dict[str, Any]]],
) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """Samples with their keys validated: unique and readable back as the same key."""
    seen: set[str] = set()
    for key, image, metadata in samples:
        _check_key(key)
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen.add(key)
        yield key, image, metadata


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"invalid key {key!r}: need a non-empty string")
    parts = key.split("/")
    if "." in parts[-1]:
        raise ValueError(f"invalid key {key!r}: '.' in its last segment would split it")
    if any(part in ("", "..") for part in parts):
        raise ValueError(f"invalid key {key!r}: empty or '..' path segment")


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _tar_bytes(chunk: list[tuple[str, Any, dict[str, Any]]], ext: str, pil_format: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key, image, metadata in chunk:
            add_member(tf, f"{key}.{ext}", _encode(image, pil_format))
            add_member(tf, f"{key}.json", json.dumps(metadata, sort_keys=True).encode("utf-8"))
            if "cls" in metadata:
                add_member(tf, f"{key}.cls", str(int(metadata["cls"])).encode("ascii"))
    return buffer.getvalue()


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    """A member with fixed metadata, so the same inputs give the same shard bytes."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


def _encode(image: np.ndarray | Image.Image, pil_format: str) -> bytes:
    im = image if isinstance(image, Image.Image) else _from_array(np.asarray(image))
    if pil_format == "JPEG" and im.mode not in ("L", "RGB", "CMYK"):
        im = im.convert("RGB")
    out = io.BytesIO()
    options = {"quality": _JPEG_QUALITY} if pil_format == "JPEG" else {}
    im.save(out, format=pil_format, **options)
    return out.getvalue()


def _from_array(arr: np.ndarray) -> Image.Image:
    """PIL image of an array: floats are taken as [0, 1], [H, W, 1] as grayscale."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"image array must be [H, W] or [H, W, 1|3|4], got {arr.shape}")
    if arr.dtype == np.bool_:
        return Image.fromarray(arr.astype(np.uint8) * 255)
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and not (arr.min() >= 0.0 and arr.max() <= 1.0):  # also refuses NaN
            raise ValueError("float images must lie in [0, 1] (pass uint8 for 0..255 data)")
        arr = np.round(arr * 255.0).astype(np.uint8)
    if arr.dtype == np.uint16 and arr.ndim == 2:
        return Image.fromarray(arr)  # 16-bit grayscale PNG
    if arr.dtype != np.uint8:
        raise ValueError(f"image array dtype must be uint8, uint16, bool or float: {arr.dtype}")
    return Image.fromarray(arr)
