"""A streaming, seekable reader of one S3 object that resumes a broken body."""

from __future__ import annotations

import io
import logging
import time
from contextlib import suppress
from functools import partial
from typing import TYPE_CHECKING, Any

from botocore.exceptions import IncompleteReadError

from pipeline.storage.retry import _short, _storage_error, is_retryable

if TYPE_CHECKING:
    from pipeline.storage.s3 import S3Storage

log = logging.getLogger(__name__)


class _S3Reader(io.RawIOBase):
    """Raw seekable reader over one S3 object.

    Opens eagerly (so a missing object fails at open time, like a local open), streams the
    body, and after a broken body or a seek reopens with ``Range`` + ``IfMatch`` on the
    first ETag, so a resumed stream can never mix two versions of the object.
    """

    def __init__(self, storage: S3Storage, key: str, uri: str) -> None:
        super().__init__()
        self._storage, self._key, self.name = storage, key, uri
        self._pos = 0
        self._etag = ""
        response = self._get()
        self._size = int(response["ContentLength"])
        self._etag = response["ETag"]
        self._body: Any = response["Body"]

    def _get(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"Bucket": self._storage.bucket, "Key": self._key}
        if self._etag:
            kwargs.update(Range=f"bytes={self._pos}-", IfMatch=self._etag)
        get = partial(self._storage.client.get_object, **kwargs)
        return self._storage._call("read", self.name, get)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        if base + offset != self._pos:
            self._drop_body()
            self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._size - self._pos)
        if want <= 0:
            return 0
        policy, failures = self._storage.options.retry, 0
        while True:
            if self._body is None:
                self._body = self._get()["Body"]
            try:
                data = self._body.read(want)
                if not data:
                    raise IncompleteReadError(actual_bytes=self._pos, expected_bytes=self._size)
            except Exception as exc:
                self._drop_body()
                failures += 1
                if not is_retryable(exc):
                    raise
                if failures >= policy.max_attempts:
                    raise _storage_error(exc, "read", self.name, failures) from exc
                delay = policy.delay(failures - 1)
                log.info(
                    "read %s at %d: %s, resuming in %.2fs", self.name, self._pos, _short(exc), delay
                )
                time.sleep(delay)
                continue
            buffer[: len(data)] = data
            self._pos += len(data)
            return len(data)

    def _drop_body(self) -> None:
        body, self._body = getattr(self, "_body", None), None
        if body is not None:
            with suppress(Exception):
                body.close()  # an unfinished body closes its connection instead of reusing it

    def close(self) -> None:
        self._drop_body()
        super().close()
