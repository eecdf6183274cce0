"""Multipart uploads through s3transfer, each of its requests under `call_with_retries`."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from pipeline.storage.retry import _client_error_code
from pipeline.storage.s3client import S3_MAX_PARTS

if TYPE_CHECKING:
    from pipeline.storage.s3 import S3Storage


class BufferReader(io.RawIOBase):
    """A seekable reader over a bytes-like object (a memoryview, a numpy buffer) that copies
    nothing up front: `io.BytesIO` would copy a 100 MB search shard before uploading it."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(data).cast("B")
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._view[self._position : self._position + len(buffer)]
        buffer[: len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}
        self._position = max(0, base[whence] + offset)
        return self._position

    def tell(self) -> int:
        return self._position


def upload_multipart(
    storage: S3Storage, key: str, uri: str, data: bytes | bytearray | memoryview
) -> None:
    """Parts uploaded concurrently by s3transfer, which aborts the upload if one fails for
    good; the object appears whole at completion or not at all."""
    from s3transfer.futures import NonThreadedExecutor
    from s3transfer.manager import TransferConfig, TransferManager

    options = storage.options
    part = max(options.part_size, -(-memoryview(data).nbytes // S3_MAX_PARTS))
    config = TransferConfig(
        multipart_threshold=options.multipart_threshold,
        multipart_chunksize=part,
        max_request_concurrency=options.max_concurrency,
    )
    executor = None if options.max_concurrency > 1 else NonThreadedExecutor
    with TransferManager(_RetryingClient(storage, uri), config, executor_cls=executor) as manager:
        manager.upload(BufferReader(data), storage.bucket, key).result()


class _RetryingClient:
    """The boto3 client as s3transfer sees it: every request it makes goes through
    ``call_with_retries`` (botocore itself never retries), a part's body rewound first."""

    _WRAPPED = frozenset(
        {"put_object", "create_multipart_upload", "upload_part", "abort_multipart_upload"}
    )

    def __init__(self, storage: S3Storage, uri: str) -> None:
        self._storage, self._uri = storage, uri

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._storage.client, name)
        if name == "complete_multipart_upload":
            return self._complete
        return partial(self._request, name, method) if name in self._WRAPPED else method

    def _request(self, name: str, method: Callable[..., Any], **kwargs: Any) -> Any:
        body = kwargs.get("Body")

        def once() -> Any:
            if hasattr(body, "seek"):
                body.seek(0)  # a failed attempt may have read part of it
            return method(**kwargs)

        return self._storage._call(name, self._uri, once)

    def _complete(self, **kwargs: Any) -> Any:
        """Complete the upload. A retry after a lost response finds it gone (NoSuchUpload):
        then the object is checked to be this upload (by its multipart ETag)."""
        client, tries = self._storage.client, 0

        def once() -> Any:
            nonlocal tries
            tries += 1
            try:
                return client.complete_multipart_upload(**kwargs)
            except ClientError as exc:
                gone = _client_error_code(exc)[0] == "NoSuchUpload"
                if tries > 1 and gone and self._completed(kwargs):
                    return {}
                raise

        return self._storage._call("complete_multipart_upload", self._uri, once)

    def _completed(self, kwargs: dict[str, Any]) -> bool:
        parts = kwargs["MultipartUpload"]["Parts"]
        md5s = b"".join(bytes.fromhex(p["ETag"].strip('"')) for p in parts)
        expected = f'"{hashlib.md5(md5s, usedforsecurity=False).hexdigest()}-{len(parts)}"'
        head = self._storage.client.head_object(Bucket=kwargs["Bucket"], Key=kwargs["Key"])
        return head.get("ETag") == expected
