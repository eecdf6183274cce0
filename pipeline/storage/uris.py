"""Storages and objects by URI: s3://bucket/key, file:///path, or a plain path."""

from __future__ import annotations

import os
import re
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from pipeline.storage.base import Storage
from pipeline.storage.local import LocalStorage
from pipeline.storage.names import check_path
from pipeline.storage.s3 import S3Storage
from pipeline.storage.s3client import S3Options

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _parse(uri: str | os.PathLike[str]) -> tuple[str, str, str]:
    """("s3", bucket, key) or ("file", "", path) with the path as given (not normalised)."""
    uri = os.fspath(uri)
    if not uri:
        raise ValueError("empty storage URI")
    match = _SCHEME.match(uri)
    scheme = match.group(1).lower() if match else ""
    if scheme == "s3":
        bucket, _, key = uri[len("s3://") :].partition("/")
        return "s3", bucket, key
    if scheme == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file URI with a remote host is not supported: {uri!r}")
        return "file", "", unquote(parts.path)
    if scheme:
        raise ValueError(f"unsupported storage scheme {scheme!r} in {uri!r} (use s3:// or a path)")
    return "file", "", os.path.expanduser(uri)


def open_storage(uri: str | os.PathLike[str], s3_options: S3Options | None = None) -> Storage:
    """A storage for a root URI: s3://bucket[/prefix] gives an S3Storage; file:///x, /x,
    relative/x and ~/x give a LocalStorage on the absolute path."""
    kind, bucket, rest = _parse(uri)
    if kind == "s3":
        return S3Storage(bucket, rest, s3_options)
    return LocalStorage(rest)


def split_uri(
    uri: str | os.PathLike[str], s3_options: S3Options | None = None
) -> tuple[Storage, str]:
    """For an object URI: (storage of its parent folder, basename)."""
    kind, bucket, rest = _parse(uri)
    if not rest or rest.endswith("/"):
        raise ValueError(f"not an object URI (no name after the last '/'): {os.fspath(uri)!r}")
    if kind == "s3":
        parent, _, name = check_path(rest).rpartition("/")
        return S3Storage(bucket, parent, s3_options), name
    parent, name = os.path.split(os.path.abspath(rest))
    return LocalStorage(parent), name


def read_uri(uri: str | os.PathLike[str]) -> bytes:
    """The bytes of one object given by its full URI."""
    storage, name = split_uri(uri)
    return storage.read_bytes(name)


def read_uri_range(uri: str | os.PathLike[str], offset: int, length: int) -> bytes:
    """Bytes [offset, offset + length) of one object given by its full URI (one ranged GET)."""
    storage, name = split_uri(uri)
    return storage.read_range(name, offset, length)


def open_uri(uri: str | os.PathLike[str]) -> BinaryIO:
    """A streaming reader of one object given by its full URI."""
    storage, name = split_uri(uri)
    return storage.open_read(name)


def list_uri(uri_prefix: str | os.PathLike[str]) -> list[str]:
    """Full URIs of the objects under a prefix, sorted.

    "s3://bucket/shards/" lists that folder; "s3://bucket/shards/part-" is a string prefix
    (as on S3, "s3://bucket/shards" also matches "s3://bucket/shards-old/x").
    """
    kind, bucket, rest = _parse(uri_prefix)
    if kind == "file":
        rest = os.path.abspath(rest) + ("/" if rest.endswith("/") else "")
    folder, _, name = rest.rpartition("/")
    if kind == "s3":
        storage: Storage = S3Storage(bucket, folder) if folder else S3Storage(bucket)
    else:
        storage = LocalStorage(folder or "/")
    return [storage.url(path) for path in storage.list(name)]
