"""The `Storage` interface both backends implement."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, BinaryIO

from pipeline.storage.errors import ObjectNotFoundError
from pipeline.storage.names import check_path


class Storage(ABC):
    """Objects under a root (a local folder or an S3 bucket/prefix), by relative path."""

    uri: str

    @abstractmethod
    def url(self, path: str) -> str:
        """Full URI of ``path`` under the root ('' gives the root itself)."""

    def local_path(self, path: str) -> str | None:
        """A filesystem path of the object when it is a local file (memory-mappable)."""
        return None

    @abstractmethod
    def read_bytes(self, path: str) -> bytes:
        """The whole object; FileNotFoundError if missing."""

    @abstractmethod
    def read_range(self, path: str, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of the object (fewer only past its end, none at or
        beyond it); FileNotFoundError if missing."""

    @abstractmethod
    def write_bytes(self, path: str, data: bytes | bytearray | memoryview) -> None:
        """Publish ``data`` (any bytes-like object, written without a copy) atomically:
        readers see the old object or the whole new one."""

    @abstractmethod
    def open_read(self, path: str) -> BinaryIO:
        """A streaming, seekable, closeable binary reader (a context manager)."""

    @abstractmethod
    def exists(self, path: str) -> bool:
        """Whether an object (not a directory) exists at ``path``."""

    @abstractmethod
    def size(self, path: str) -> int:
        """Size in bytes; FileNotFoundError if missing."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted paths (relative to the root) of all objects whose path starts with ``prefix``.

        A string prefix, as on S3: "shards/part-" matches "shards/part-0001.tar"; end it with
        '/' to mean a folder ("a/" does not match "ab/x"). Recursive; no directories.
        """

    @abstractmethod
    def delete(self, path: str) -> None:
        """Remove the object; a missing one is fine."""

    def delete_many(self, paths: Iterable[str]) -> None:
        """Remove many objects (missing ones are fine); S3 batches them, 1,000 a request."""
        for path in paths:
            self.delete(path)

    @abstractmethod
    def arrow_filesystem(self) -> tuple[Any, str]:
        """(pyarrow.fs.FileSystem, the root's path in it), for ranged reads by pyarrow."""

    def open_arrow(self, path: str) -> Any:
        """A pyarrow random-access file of the object: Parquet readers fetch the footer and
        the column chunks they need by byte range, never the whole object."""
        filesystem, root = self.arrow_filesystem()
        try:
            return filesystem.open_input_file(f"{root}/{check_path(path)}")
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"read {self.url(path)}: not found", self.url(path)) from exc

    @abstractmethod
    def child(self, path: str) -> Storage:
        """Storage rooted at root/path."""

    @abstractmethod
    def create(self, path: str, data: bytes) -> bool:
        """Publish ``data`` only if no object exists at ``path``, atomically; False if one did.

        After a lost response the object may be ours although this says False: a caller that
        must know reads it back (the lease puts a unique owner id in the data for that).
        """

    @abstractmethod
    def replace_if(self, path: str, expected: bytes, data: bytes | None) -> bool:
        """Compare-and-swap: replace the object with ``data`` (None: delete it) only if it
        still holds exactly ``expected``; False if it is missing or changed."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def _check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise ValueError(f"invalid byte range: offset {offset}, length {length}")
