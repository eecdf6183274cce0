"""The one retry layer of S3 requests: which errors are retried, how long to wait, and the
typed `StorageError` an error becomes."""

from __future__ import annotations

import http.client
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import urllib3.exceptions
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from pipeline.storage.errors import (
    AccessDeniedError,
    ObjectNotFoundError,
    StorageError,
    StoreUnreachableError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


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
    if isinstance(exc, BotoConnectionError):  # no connection made at all
        return StoreUnreachableError(f"{op} {uri} failed{tries}: store unreachable: {exc}", uri)
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
