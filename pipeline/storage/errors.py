"""The typed errors of storage operations."""

from __future__ import annotations


class StorageError(OSError):
    """A storage operation failed; the message names the operation and the URI, never secrets."""

    def __init__(self, message: str, uri: str = "") -> None:
        super().__init__(message)
        self.uri = uri


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """The object (or its bucket) does not exist; also a FileNotFoundError, like a local miss."""


class AccessDeniedError(StorageError, PermissionError):
    """The credentials may not do this (403); also a PermissionError."""


class StoreUnreachableError(StorageError, ConnectionError):
    """No connection to the store could be made, retries included (a wrong endpoint, a
    server down): the next request to it would wait as long to fail."""
