"""pyarrow's S3 filesystem for ranged Parquet reads, with the boto3 client's settings and
credentials; its SDK's own retries are the one retry layer of those reads."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from pipeline.storage.s3client import (
    _ARROW,
    _CLIENTS_LOCK,
    _CREDENTIALS,
    S3Options,
    _client_key,
    _redact,
    _shared_client,
)


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
