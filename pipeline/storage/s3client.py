"""S3 settings (`S3Options`) and the boto3 client shared per process and settings."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from botocore.config import Config

from pipeline.storage.retry import RetryPolicy

MiB = 1 << 20
S3_MIN_PART = 5 * MiB  # S3 rejects smaller parts (except the last one)
S3_MAX_PARTS = 10_000
S3_MAX_PUT = 5 * 1024 * MiB

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
