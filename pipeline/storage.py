"""Object storage behind one small interface: a local folder or S3 (through boto3).

Writers publish atomically (a temp file then ``os.replace`` locally; one PUT or one multipart
completion on S3), so readers see the old object or the whole new one, never a partial one.
Paths are relative, '/'-separated and validated, because they come from user data (example
keys); ``safe_name`` turns arbitrary text into one safe path component.

Every S3 request has exactly one retry layer. boto3 calls: botocore's retries are off and
``call_with_retries`` (exponential backoff with full jitter) wraps each request, body read
included; multipart parts go through s3transfer on a client whose calls are wrapped alike.
Parquet reads (``open_arrow``: footer and column chunks by byte range) go through pyarrow's
S3 filesystem, whose SDK retries with the same attempt budget and nothing wraps it. Streaming
reads resume a broken body with a Range GET pinned to the object's ETag.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import io
import logging
import os
import random
import re
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field, fields, replace
from functools import partial
from typing import Any, BinaryIO, TypeVar
from urllib.parse import unquote, urlsplit

import urllib3.exceptions
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

__all__ = [
    "AccessDeniedError",
    "LocalStorage",
    "ObjectNotFoundError",
    "RetryPolicy",
    "S3Options",
    "S3Storage",
    "Storage",
    "StorageError",
    "call_with_retries",
    "check_path",
    "is_retryable",
    "list_uri",
    "open_storage",
    "open_uri",
    "read_uri",
    "read_uri_range",
    "safe_name",
    "split_uri",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
MiB = 1 << 20
S3_MIN_PART = 5 * MiB  # S3 rejects smaller parts (except the last one)
S3_MAX_PARTS = 10_000
S3_MAX_PUT = 5 * 1024 * MiB
_TMP_PREFIX = ".tmp-storage-"  # local temp files; reserved, never listed
_READ_BUFFER = 256 * 1024
_LIST_PAGE_SIZE = 1000  # S3's maximum keys per ListObjectsV2 page
_DELETE_BATCH = 1000  # S3's maximum keys per DeleteObjects request


# ----------------------------------------------------------------------------- errors


class StorageError(OSError):
    """A storage operation failed; the message names the operation and the URI, never secrets."""

    def __init__(self, message: str, uri: str = "") -> None:
        super().__init__(message)
        self.uri = uri


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """The object (or its bucket) does not exist; also a FileNotFoundError, like a local miss."""


class AccessDeniedError(StorageError, PermissionError):
    """The credentials may not do this (403); also a PermissionError."""


# ----------------------------------------------------------------------------- paths


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_HASH_LEN = 16
_HASHED = re.compile(rf"-[0-9a-f]{{{_HASH_LEN}}}$")


def check_path(path: str) -> str:
    """Return ``path`` if it is a safe relative object path, else raise ValueError.

    Rejected: empty, absolute, backslashes, control characters, empty / '.' / '..'
    components, and the reserved temp-file prefix. Both backends then agree on what a path
    means, and a path from user data cannot escape the root.
    """
    if not isinstance(path, str):
        raise TypeError(f"object path must be str, not {type(path).__name__}")
    if not path:
        raise ValueError("object path is empty")
    if path.startswith("/"):
        raise ValueError(f"object path must be relative, got absolute path {path!r}")
    if "\\" in path or _CONTROL.search(path):
        raise ValueError(f"object path {path!r} contains a backslash or a control character")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(
                f"object path {path!r} has an empty, '.' or '..' component "
                "(leading, trailing or doubled '/', or a relative step)"
            )
        if part.startswith(_TMP_PREFIX):
            raise ValueError(f"object path {path!r} uses the reserved prefix {_TMP_PREFIX!r}")
    return path


def _check_prefix(prefix: str) -> str:
    """Validate a listing prefix: '' or a path, optionally ending with '/'."""
    if prefix:
        check_path(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def safe_name(text: str, max_len: int = 100) -> str:
    """Sanitise arbitrary text into one safe object-name component.

    Keeps [A-Za-z0-9._-], replaces anything else with '_' and a leading '.' with '_' (no
    hidden files, no '.' / '..'), caps the length at ``max_len``. When anything changed, a
    16-hex blake2b hash of the original text is appended, so distinct inputs stay distinct;
    text that already ends like such a hash is hashed too, so an untouched name can never
    equal a hashed one.
    """
    if max_len < _HASH_LEN + 8:
        raise ValueError(f"max_len must be at least {_HASH_LEN + 8}, got {max_len}")
    kept = _UNSAFE.sub("_", text)
    if kept.startswith("."):
        kept = "_" + kept[1:]
    if kept == text and 0 < len(text) <= max_len and not _HASHED.search(text):
        return text
    raw = text.encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(raw, digest_size=_HASH_LEN // 2).hexdigest()
    stem = kept[: max_len - _HASH_LEN - 1] or "_"
    return f"{stem}-{digest}"


# ----------------------------------------------------------------------------- interface


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
    def write_bytes(self, path: str, data: bytes) -> None:
        """Publish ``data`` atomically: readers see the old object or the whole new one."""

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


# ----------------------------------------------------------------------------- local


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

    def write_bytes(self, path: str, data: bytes) -> None:
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


def _check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise ValueError(f"invalid byte range: offset {offset}, length {length}")


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


# ----------------------------------------------------------------------------- retries


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded attempts with exponential backoff and full jitter (AWS architecture blog)."""

    max_attempts: int = 8
    base_delay: float = 0.2
    max_delay: float = 10.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.base_delay < 0 or self.max_delay < 0:
            raise ValueError(f"invalid retry policy {self}")

    def delay(self, retry: int) -> float:
        """Sleep before retry number ``retry`` (0-based): uniform in [0, min(cap, base*2^n)]."""
        return random.uniform(0.0, min(self.max_delay, self.base_delay * 2.0**retry))


_RETRYABLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "PriorRequestNotComplete",
        "OperationAborted",
    }
)
_RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NoSuchBucket", "NotFound", "NoSuchUpload"})
_DENIED_CODES = frozenset(
    {"403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
)
_NETWORK_ERRORS = (
    BotoConnectionError,  # EndpointConnectionError, ConnectTimeoutError, ...
    HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
    IncompleteReadError,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.TimeoutError,
    http.client.IncompleteRead,
    ConnectionError,  # builtin: resets, broken pipes
    TimeoutError,
)


def _client_error_code(exc: ClientError) -> tuple[str, int]:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(error.get("Code", "")), int(status or 0)


def is_retryable(exc: BaseException) -> bool:
    """Throttling, 5xx, timeouts and broken connections (also during body reads)."""
    if isinstance(exc, ClientError):
        code, status = _client_error_code(exc)
        return code in _RETRYABLE_CODES or status in _RETRYABLE_STATUS
    if isinstance(exc, SSLError):  # a certificate problem does not heal by waiting
        return False
    return isinstance(exc, _NETWORK_ERRORS)


def _storage_error(exc: BaseException, op: str, uri: str, attempts: int) -> StorageError:
    """A typed error naming the operation and URI (only the server's code and message)."""
    tries = f" (after {attempts} attempts)" if attempts > 1 else ""
    if not isinstance(exc, ClientError):
        return StorageError(f"{op} {uri} failed{tries}: {type(exc).__name__}: {exc}", uri)
    code, status = _client_error_code(exc)
    text = exc.response.get("Error", {}).get("Message", "")
    detail = f"{code} (HTTP {status})" + (f": {text}" if text else "")
    if code in _NOT_FOUND_CODES or status == 404:
        what = "bucket does not exist" if code == "NoSuchBucket" else "not found"
        return ObjectNotFoundError(f"{op} {uri}: {what} [{detail}]", uri)
    if code in _DENIED_CODES or status == 403:
        return AccessDeniedError(f"{op} {uri}: access denied [{detail}]", uri)
    if code == "PreconditionFailed" or status == 412:
        return StorageError(f"{op} {uri}: object changed while being read [{detail}]", uri)
    return StorageError(f"{op} {uri} failed{tries}: {detail}", uri)


def call_with_retries(
    fn: Callable[[], T],
    *,
    op: str,
    uri: str,
    policy: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn``; retry retryable S3/network errors; map boto errors to StorageError.

    Non-retryable boto errors (403, 404, ...) raise at once; other exceptions pass through.
    """
    policy = policy or RetryPolicy()
    for attempt in range(1, policy.max_attempts + 1):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as exc:
            if not is_retryable(exc):
                if isinstance(exc, ClientError | BotoCoreError):
                    raise _storage_error(exc, op, uri, attempt) from exc
                raise
            if attempt == policy.max_attempts:
                raise _storage_error(exc, op, uri, attempt) from exc
            delay = policy.delay(attempt - 1)
            log.info("%s %s: %s, retry %d in %.2fs", op, uri, _short(exc), attempt, delay)
            sleep(delay)
    raise AssertionError("unreachable")


def _short(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        code, status = _client_error_code(exc)
        return f"{code} (HTTP {status})"
    return type(exc).__name__


# ----------------------------------------------------------------------------- S3


_CONNECT_TIMEOUT = "INFLUENCE_SSL_S3_CONNECT_TIMEOUT"
_READ_TIMEOUT = "INFLUENCE_SSL_S3_READ_TIMEOUT"


def _env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment, else ``default``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    value = float(raw)
    if value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


@dataclass(frozen=True)
class S3Options:
    """Client and transfer settings; none of them secret (credentials come from boto3's chain).

    ``endpoint_url`` None: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, read when the
    storage is created (so it travels with a pickled storage), else boto3's own resolution.
    ``addressing_style`` None: "path" with a custom endpoint (MinIO, moto, Ceph), else
    botocore's default. ``retry`` is the one retry policy: the wrapper's around each boto3
    call and body read (botocore's own retries are off), and its attempt budget is that of
    pyarrow's S3 filesystem for Parquet reads.
    """

    endpoint_url: str | None = None
    region: str | None = None
    multipart_threshold: int = 64 * MiB
    part_size: int = 64 * MiB
    max_concurrency: int = 4
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Seconds; the environment can tune them for every process of a job, Ray workers too.
    connect_timeout: float = field(default_factory=lambda: _env_seconds(_CONNECT_TIMEOUT, 10.0))
    read_timeout: float = field(default_factory=lambda: _env_seconds(_READ_TIMEOUT, 60.0))
    addressing_style: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.multipart_threshold <= S3_MAX_PUT:
            raise ValueError(f"multipart_threshold must be in [1, 5 GiB], got {self}")
        if self.part_size < S3_MIN_PART:
            raise ValueError(f"part_size must be at least 5 MiB (S3 minimum), got {self}")

    def __repr__(self) -> str:  # the dataclass repr, with the endpoint's user:password@ dropped
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["endpoint_url"] = _redact(self.endpoint_url)
        return "S3Options(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


def _redact(url: str | None) -> str | None:
    """Drop any user:password@ from an endpoint URL before it is shown."""
    if not url or "@" not in url:
        return url
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _env_endpoint() -> str | None:
    """The endpoint boto3 would take from the environment (service-specific first)."""
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


_CLIENTS: dict[tuple[Any, ...], Any] = {}
_CREDENTIALS: dict[tuple[Any, ...], Any] = {}  # boto3's (refreshable) credentials per client
# (client key, attempts) -> (frozen credentials, pyarrow S3FileSystem). Module-level, never
# on a storage: the filesystem pickles with its secret key.
_ARROW: dict[tuple[Any, ...], tuple[Any, Any]] = {}
_CLIENTS_LOCK = threading.Lock()


def _client_key(options: S3Options) -> tuple[Any, ...]:
    style = options.addressing_style or ("path" if options.endpoint_url else None)
    return (
        os.getpid(),
        options.endpoint_url,
        options.region,
        style,
        options.connect_timeout,
        options.read_timeout,
        options.max_concurrency,
    )


def _shared_client(options: S3Options) -> Any:
    """One boto3 client per process and settings (clients are thread-safe; sessions are not).

    botocore never retries (one attempt per call): ``call_with_retries`` is the only layer.
    """
    key = _client_key(options)
    style = key[3]
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            import boto3  # deferred: a local-only user never pays for it

            for cache in (_CLIENTS, _CREDENTIALS, _ARROW):  # inherited through fork
                for stale in [k for k in cache if k[0] != key[0]]:
                    del cache[stale]
            config = Config(
                retries={"mode": "standard", "total_max_attempts": 1},
                connect_timeout=options.connect_timeout,
                read_timeout=options.read_timeout,
                max_pool_connections=max(10, 2 * options.max_concurrency),
                tcp_keepalive=True,
                s3={"addressing_style": style} if style else None,
            )
            session = boto3.session.Session()
            client = session.client(
                "s3",
                region_name=options.region,
                endpoint_url=options.endpoint_url,
                config=config,
            )
            _CLIENTS[key] = client
            _CREDENTIALS[key] = session.get_credentials()  # the very object the client signs with
    return client


def _arrow_s3(options: S3Options) -> Any:
    """A pyarrow S3FileSystem with the boto3 client's endpoint, region and credentials;
    rebuilt when boto3 refreshes the credentials."""
    client, key = _shared_client(options), _client_key(options)
    credentials = _CREDENTIALS.get(key)
    frozen = credentials.get_frozen_credentials() if credentials is not None else None
    key += (options.retry.max_attempts,)  # the SDK's own attempt budget
    with _CLIENTS_LOCK:
        cached = _ARROW.get(key)
        if cached is None or cached[0] != frozen:
            import pyarrow.fs as pafs

            settings = _arrow_settings(options, client.meta.region_name, frozen)
            cached = _ARROW[key] = (frozen, pafs.S3FileSystem(**settings))
    return cached[1]


def _arrow_settings(options: S3Options, region: str | None, frozen: Any) -> dict[str, Any]:
    """S3FileSystem arguments; its SDK retries (standard strategy) get the policy's budget,
    the one retry layer of its reads."""
    import pyarrow.fs as pafs

    settings: dict[str, Any] = {
        "region": options.region or region or "us-east-1",
        "connect_timeout": options.connect_timeout,
        "request_timeout": options.read_timeout,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(options.retry.max_attempts),
        "force_virtual_addressing": options.addressing_style == "virtual",
    }
    if frozen is None:
        settings["anonymous"] = True  # as boto3 would sign nothing
    else:
        settings.update(
            access_key=frozen.access_key, secret_key=frozen.secret_key, session_token=frozen.token
        )
    if options.endpoint_url:
        parts = urlsplit(options.endpoint_url)
        if parts.path.strip("/"):
            raise ValueError(
                f"pyarrow cannot use an S3 endpoint with a path: {_redact(options.endpoint_url)}"
            )
        host = parts.netloc.rpartition("@")[2]
        settings.update(scheme=parts.scheme or "https", endpoint_override=host)
    return settings


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

    def write_bytes(self, path: str, data: bytes) -> None:
        key, uri = self._key(path), self.url(path)
        if not isinstance(data, bytes | bytearray):
            data = bytes(data)
        if len(data) <= self.options.multipart_threshold:
            self._call("write", uri, partial(self.client.put_object, **self._at(key), Body=data))
        else:  # each request is retried inside, not the whole upload
            self._upload_multipart(key, uri, data)

    def _upload_multipart(self, key: str, uri: str, data: bytes) -> None:
        """Parts uploaded concurrently by s3transfer, which aborts the upload if one fails for
        good; the object appears whole at completion or not at all."""
        from s3transfer.futures import NonThreadedExecutor
        from s3transfer.manager import TransferConfig, TransferManager

        part = max(self.options.part_size, -(-len(data) // S3_MAX_PARTS))
        config = TransferConfig(
            multipart_threshold=self.options.multipart_threshold,
            multipart_chunksize=part,
            max_request_concurrency=self.options.max_concurrency,
        )
        threads = self.options.max_concurrency > 1
        executor = None if threads else NonThreadedExecutor
        with TransferManager(_RetryingClient(self, uri), config, executor_cls=executor) as manager:
            manager.upload(io.BytesIO(data), self.bucket, key).result()

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


# ----------------------------------------------------------------------------- URIs

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
