"""Byte I/O for shards, all through `pipeline.storage` (local folders and S3 alike)."""

from __future__ import annotations

import os
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from pipeline import storage


def is_remote(uri: str) -> bool:
    """True for object-store URIs (`s3://...`); False for local paths and `file://`."""
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    """The filesystem path of a local path or `file://` URI."""
    if uri.startswith("file://"):
        return unquote(urlparse(uri).path)
    return os.path.expanduser(uri)


def open_stream(uri: str) -> BinaryIO:
    """Streaming binary reader of one shard; FileNotFoundError when it does not exist."""
    return storage.open_uri(uri)


def read_range(uri: str, offset: int, length: int) -> bytes:
    """Bytes [offset, offset + length) of one shard (one ranged GET on S3)."""
    return storage.read_uri_range(uri, offset, length)


def list_remote(prefix: str) -> list[str]:
    """Full URIs of the objects under a remote prefix."""
    return list(storage.list_uri(prefix))


def write_object(out: str, name: str, data: bytes) -> str:
    """Write `data` as `name` under folder or URI `out` atomically; return its URL."""
    store = storage.open_storage(out)
    store.write_bytes(name, data)
    return store.url(name)
