"""Object paths and names: validation of relative paths, sanitising of arbitrary text."""

from __future__ import annotations

import hashlib
import re

_TMP_PREFIX = ".tmp-storage-"  # local temp files; reserved, never listed
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
