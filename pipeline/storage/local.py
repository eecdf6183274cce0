"""`LocalStorage`: a folder; atomic writes by a temp file and ``os.replace``."""

from __future__ import annotations

import fcntl
import os
import uuid
from contextlib import suppress
from typing import Any, BinaryIO

from pipeline.storage.base import Storage, _check_range
from pipeline.storage.names import _TMP_PREFIX, _check_prefix, check_path


class LocalStorage(Storage):
    """A local folder; writes go to a temp file in the same directory, then ``os.replace``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.uri = self.root

    def _path(self, path: str) -> str:
        return os.path.join(self.root, check_path(path))

    def url(self, path: str) -> str:
        return self._path(path) if path else self.uri

    def local_path(self, path: str) -> str | None:
        return self._path(path)

    def read_bytes(self, path: str) -> bytes:
        with open(self._path(path), "rb") as f:
            return f.read()

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        _check_range(offset, length)
        with open(self._path(path), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def write_bytes(self, path: str, data: bytes | bytearray | memoryview) -> None:
        target = self._path(path)
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f"{_TMP_PREFIX}{uuid.uuid4().hex}")
        # os.open with 0o666 honours the umask (mkstemp would force 0o600 on shared indices).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with suppress(FileNotFoundError):
                os.remove(tmp)
            raise
        _fsync_dir(parent)

    def open_read(self, path: str) -> BinaryIO:
        return open(self._path(path), "rb")

    def exists(self, path: str) -> bool:
        return os.path.isfile(self._path(path))

    def size(self, path: str) -> int:
        return os.path.getsize(self._path(path))

    def list(self, prefix: str = "") -> list[str]:
        _check_prefix(prefix)
        start = prefix.rpartition("/")[0]
        top = os.path.join(self.root, start) if start else self.root
        found = []
        for dirpath, dirnames, filenames in os.walk(top):
            rel_dir = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            rel_dir = "" if rel_dir == "." else rel_dir + "/"
            dirnames[:] = [d for d in dirnames if _may_match(rel_dir + d + "/", prefix)]
            found += [
                rel_dir + name
                for name in filenames
                if not name.startswith(_TMP_PREFIX) and (rel_dir + name).startswith(prefix)
            ]
        return sorted(found)

    def delete(self, path: str) -> None:
        with suppress(FileNotFoundError):
            os.remove(self._path(path))

    def arrow_filesystem(self) -> tuple[Any, str]:
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem(), self.root

    def child(self, path: str) -> LocalStorage:
        return LocalStorage(self._path(path))

    def create(self, path: str, data: bytes) -> bool:
        # os.link never replaces an existing name: O_CREAT|O_EXCL semantics for a whole file.
        target = self._path(path)
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f"{_TMP_PREFIX}{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, target)
        except FileExistsError:
            return False
        finally:
            with suppress(FileNotFoundError):
                os.remove(tmp)
        _fsync_dir(parent)
        return True

    def replace_if(self, path: str, expected: bytes, data: bytes | None) -> bool:
        # An flock on a hidden sibling serialises compare-and-swaps; `create` needs no lock,
        # since the object never disappears here unless deleted on purpose.
        target = self._path(path)
        lock = os.path.join(
            os.path.dirname(target), f"{_TMP_PREFIX}lock-{os.path.basename(target)}"
        )
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(lock, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                current = self.read_bytes(path)
            except FileNotFoundError:
                return False
            if current != expected:
                return False
            if data is None:
                self.delete(path)
            else:
                self.write_bytes(path, data)
            return True


def _may_match(folder: str, prefix: str) -> bool:
    """Whether objects under ``folder`` (ending with '/') can start with ``prefix``."""
    return folder.startswith(prefix) or prefix.startswith(folder)


def _fsync_dir(path: str) -> None:
    """Persist a rename (best effort: not every platform can open a directory)."""
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
