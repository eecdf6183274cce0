"""`S3Storage`: an S3 bucket/prefix through boto3, every request under `call_with_retries`."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import replace
from functools import partial
from typing import Any, BinaryIO, TypeVar

from botocore.exceptions import ClientError

from pipeline.storage.arrow import _arrow_s3
from pipeline.storage.base import Storage, _check_range
from pipeline.storage.errors import ObjectNotFoundError, StorageError
from pipeline.storage.names import _check_prefix, check_path
from pipeline.storage.reader import _S3Reader
from pipeline.storage.retry import _RETRYABLE_CODES, _client_error_code, call_with_retries
from pipeline.storage.s3client import S3Options, _env_endpoint, _redact, _shared_client
from pipeline.storage.transfer import BufferReader, upload_multipart

T = TypeVar("T")
_READ_BUFFER = 256 * 1024
_LIST_PAGE_SIZE = 1000  # S3's maximum keys per ListObjectsV2 page
_DELETE_BATCH = 1000  # S3's maximum keys per DeleteObjects request


class S3Storage(Storage):
    """An S3 bucket/prefix. Picklable: the client is created lazily in each process."""

    def __init__(self, bucket: str, prefix: str = "", options: S3Options | None = None) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}", bucket):
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        prefix = prefix.rstrip("/")
        if prefix:
            check_path(prefix)
        options = options or S3Options()
        if options.endpoint_url is None:
            options = replace(options, endpoint_url=_env_endpoint())
        self.bucket, self.prefix, self.options = bucket, prefix, options
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._client: Any = None
        self._client_pid = 0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"], state["_client_pid"] = None, 0  # never ship a client (or its keys)
        return state

    def __repr__(self) -> str:
        endpoint = _redact(self.options.endpoint_url)
        return f"S3Storage({self.uri!r}" + (f", endpoint={endpoint!r})" if endpoint else ")")

    @property
    def client(self) -> Any:
        """The boto3 S3 client of this process."""
        if self._client is None or self._client_pid != os.getpid():
            self._client = _shared_client(self.options)
            self._client_pid = os.getpid()
        return self._client

    def _key(self, path: str) -> str:
        check_path(path)
        return f"{self.prefix}/{path}" if self.prefix else path

    def _at(self, key: str) -> dict[str, str]:
        return {"Bucket": self.bucket, "Key": key}

    def url(self, path: str) -> str:
        return f"s3://{self.bucket}/{self._key(path)}" if path else self.uri

    def _call(self, op: str, uri: str, fn: Callable[[], T]) -> T:
        return call_with_retries(fn, op=op, uri=uri, policy=self.options.retry)

    def read_bytes(self, path: str) -> bytes:
        key = self._key(path)

        def get() -> bytes:  # the body read is inside, so a broken body is retried too
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            try:
                return body.read()
            finally:
                body.close()

        return self._call("read", self.url(path), get)

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        _check_range(offset, length)
        key = self._key(path)
        if length == 0:
            return b""
        span = f"bytes={offset}-{offset + length - 1}"

        def get() -> bytes:  # body read inside the retried call, as in read_bytes
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=key, Range=span)
            except ClientError as exc:
                if _client_error_code(exc)[1] == 416:  # starts at or past the end
                    return b""
                raise
            with response["Body"] as body:
                return body.read()

        return self._call("read_range", self.url(path), get)

    def write_bytes(self, path: str, data: bytes | bytearray | memoryview) -> None:
        key, uri = self._key(path), self.url(path)
        size = memoryview(data).nbytes
        if size > self.options.multipart_threshold:  # each request is retried inside
            upload_multipart(self, key, uri, data)
            return

        def put() -> Any:  # a fresh reader each attempt: a failed one may have read part
            body = data if isinstance(data, bytes) else BufferReader(data)
            return self.client.put_object(**self._at(key), Body=body)

        self._call("write", uri, put)

    def open_read(self, path: str) -> BinaryIO:
        raw = _S3Reader(self, self._key(path), self.url(path))
        return io.BufferedReader(raw, buffer_size=_READ_BUFFER)  # type: ignore[return-value]

    def _head(self, path: str) -> dict[str, Any]:
        head = partial(self.client.head_object, **self._at(self._key(path)))
        return self._call("head", self.url(path), head)

    def exists(self, path: str) -> bool:
        try:
            self._head(path)
        except ObjectNotFoundError:
            return False
        return True

    def size(self, path: str) -> int:
        return int(self._head(path)["ContentLength"])

    def list(self, prefix: str = "") -> list[str]:
        _check_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        keys: list[str] = []
        token: str | None = None
        while True:  # page by page, so a failure retries one page, not the whole listing
            page = self._call("list", f"{self.uri}/{prefix}", partial(self._page, prefix, token))
            keys += [o["Key"][len(root) :] for o in page.get("Contents", [])]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                break
        return sorted(k for k in keys if k and not k.endswith("/"))  # no folder markers

    def _page(self, prefix: str, token: str | None) -> dict[str, Any]:
        root = f"{self.prefix}/" if self.prefix else ""
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": root + prefix,
            "MaxKeys": _LIST_PAGE_SIZE,
        }
        if token:
            kwargs["ContinuationToken"] = token
        return self.client.list_objects_v2(**kwargs)

    def delete(self, path: str) -> None:
        delete = partial(self.client.delete_object, **self._at(self._key(path)))
        self._call("delete", self.url(path), delete)

    def delete_many(self, paths: Iterable[str]) -> None:
        keys = [self._key(path) for path in paths]
        failed: list[str] = []
        for start in range(0, len(keys), _DELETE_BATCH):
            failed += self._delete_batch(keys[start : start + _DELETE_BATCH])
        if failed:
            shown = "; ".join(failed[:5]) + (f"; {len(failed) - 5} more" if len(failed) > 5 else "")
            raise StorageError(
                f"delete: {len(failed)} of {len(keys)} objects under {self.uri} failed: {shown}",
                self.uri,
            )

    def _delete_batch(self, keys: list[str]) -> list[str]:
        """One DeleteObjects request; keys refused with a retryable code (SlowDown, ...) are
        sent again under the same policy as a failed request. Returns the keys refused for
        good, as "uri: Code"."""
        pending, failed = keys, []

        def request() -> None:
            nonlocal pending
            delete = {"Objects": [{"Key": k} for k in pending], "Quiet": True}
            response = self.client.delete_objects(Bucket=self.bucket, Delete=delete)
            errors = response.get("Errors", [])
            again = [e for e in errors if e.get("Code") in _RETRYABLE_CODES]
            failed.extend(
                f"s3://{self.bucket}/{e['Key']}: {e.get('Code')}" for e in errors if e not in again
            )
            pending = [e["Key"] for e in again]
            if again:  # as if the request had failed: is_retryable sees the code
                message = f"{len(again)} key(s) refused, e.g. {again[0]['Key']}"
                error = {"Code": again[0]["Code"], "Message": message}
                raise ClientError({"Error": error}, "DeleteObjects")  # type: ignore[arg-type]

        self._call("delete", self.uri, request)
        return failed

    def arrow_filesystem(self) -> tuple[Any, str]:
        root = f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket
        return _arrow_s3(self.options), root

    def create(self, path: str, data: bytes) -> bool:
        key = self._key(path)
        put = partial(self.client.put_object, **self._at(key), Body=data, IfNoneMatch="*")
        return self._call("create", self.url(path), partial(_conditional, put))

    def replace_if(self, path: str, expected: bytes, data: bytes | None) -> bool:
        key, uri = self._key(path), self.url(path)

        def swap() -> bool:
            try:
                response = self.client.get_object(**self._at(key))
            except ClientError as exc:
                if _client_error_code(exc)[1] == 404:
                    return False
                raise
            with response["Body"] as body:
                current = body.read()
            if current != expected:
                return False
            if data is None:  # S3 and moto accept If-Match on DELETE
                return _conditional(
                    partial(self.client.delete_object, **self._at(key), IfMatch=response["ETag"])
                )
            put = partial(self.client.put_object, **self._at(key), Body=data)
            return _conditional(partial(put, IfMatch=response["ETag"]))

        return self._call("replace_if", uri, swap)

    def child(self, path: str) -> S3Storage:
        sub = S3Storage(self.bucket, self._key(path), self.options)
        sub._client, sub._client_pid = self._client, self._client_pid
        return sub


def _conditional(request: Callable[[], Any]) -> bool:
    """Run a conditional request: False when its precondition failed (412), or when a
    concurrent conditional write won (409 ConditionalRequestConflict)."""
    try:
        request()
    except ClientError as exc:
        code, status = _client_error_code(exc)
        if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        raise
    return True
