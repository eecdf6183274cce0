"""Byte I/O for shards: plain local files here, remote objects through `pipeline.storage`.

Local paths (and `file://` URIs) are opened directly so the data layer works, and is tested,
without an object store. Anything else with a scheme (`s3://...`) goes through
`pipeline.storage`, imported lazily so this package loads where that module is absent.
"""

from __future__ import annotations

import os
import tempfile
from types import ModuleType
from typing import BinaryIO
from urllib.parse import unquote, urlparse

# Buffer of local shard reads: large sequential reads, few system calls.
_LOCAL_BUFFER = 1 << 20


def is_remote(uri: str) -> bool:
    """True for object-store URIs (`s3://...`); False for local paths and `file://`."""
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    """The filesystem path of a local path or `file://` URI."""
    if uri.startswith("file://"):
        return unquote(urlparse(uri).path)
    return os.path.expanduser(uri)


def storage() -> ModuleType:
    """`pipeline.storage`, or a clear error where it is not available."""
    try:
        from pipeline import storage as module
    except ModuleNotFoundError as exc:
        if exc.name != "pipeline.storage":
            raise  # a missing dependency of storage itself must stay visible
        raise RuntimeError("remote URIs need pipeline.storage, which is not installed") from exc
    return module


def open_stream(uri: str) -> BinaryIO:
    """Streaming binary reader of one shard; FileNotFoundError when it does not exist."""
    if is_remote(uri):
        return storage().open_uri(uri)
    return open(local_path(uri), "rb", buffering=_LOCAL_BUFFER)


def list_remote(prefix: str) -> list[str]:
    """Full URIs of the objects under a remote prefix."""
    return list(storage().list_uri(prefix))


def write_object(out: str, name: str, data: bytes) -> str:
    """Write `data` as `name` under folder or URI `out` atomically; return its URL."""
    if is_remote(out):
        store = storage().open_storage(out)
        store.write_bytes(name, data)
        return store.url(name)
    folder = local_path(out)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return os.path.abspath(path)
