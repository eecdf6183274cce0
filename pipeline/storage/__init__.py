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

The parts: ``errors`` (typed errors), ``names`` (paths, safe names), ``base`` (the
interface), ``local``, ``retry`` (the retry policy and error mapping), ``s3client`` (options,
the shared boto3 client), ``s3`` (S3Storage), ``transfer`` (multipart uploads), ``reader``
(resuming streams), ``arrow`` (pyarrow's S3 filesystem), ``uris`` (storages by URI).
Import from this package; the parts are an implementation detail.
"""

from pipeline.storage.base import Storage
from pipeline.storage.errors import (
    AccessDeniedError,
    ObjectNotFoundError,
    StorageError,
    StoreUnreachableError,
)
from pipeline.storage.local import LocalStorage
from pipeline.storage.names import _TMP_PREFIX, check_path, safe_name
from pipeline.storage.retry import RetryPolicy, call_with_retries, is_retryable
from pipeline.storage.s3 import S3Storage
from pipeline.storage.s3client import S3Options
from pipeline.storage.uris import (
    list_uri,
    open_storage,
    open_uri,
    read_uri,
    read_uri_range,
    split_uri,
)

__all__ = [
    "_TMP_PREFIX",
    "AccessDeniedError",
    "LocalStorage",
    "ObjectNotFoundError",
    "RetryPolicy",
    "S3Options",
    "S3Storage",
    "Storage",
    "StorageError",
    "StoreUnreachableError",
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
