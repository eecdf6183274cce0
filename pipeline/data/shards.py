"""Shard lists from user specs, and stable object names per shard.

A spec element is a local path or folder, a glob (`/data/*.tar`, `**` recursive), a brace
pattern (`shard-{000000..000999}.tar`, `{a,b}`), an object-store prefix
(`s3://bucket/prefix/`: every shard object under it) or an object-store glob. Brace
patterns are expanded first, then each result is resolved as above.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from collections.abc import Iterable

from pipeline.data._io import is_remote, list_remote, local_path

# Names recognised as shards in folder / prefix listings (`tarfile`'s `r|*` reads them all).
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
_GLOB_CHARS = re.compile(r"[*?\[]")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
# A typo such as {0..99999999} must fail, not exhaust memory.
_MAX_RANGE = 10_000_000
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def expand_shards(spec: str | Iterable[str]) -> list[str]:
    """Shard URLs of `spec` (one element or a list of them).

    Each element's matches are sorted and de-duplicated; elements keep their order, and a
    shard named by two elements is listed once (at its first place), so no example is
    indexed twice. Local results are absolute paths. An element matching nothing raises
    FileNotFoundError naming it. Explicit names from a brace pattern are kept even where
    missing (the reader counts them as `missing_shard`) as long as one of them exists; on
    an object store explicit names are not checked at all (no request per shard).
    """
    elements = [spec] if isinstance(spec, str) else list(spec)
    if not elements:
        raise ValueError("empty shard spec")
    urls: dict[str, None] = {}
    for element in elements:
        matches = _expand_element(element)
        if not matches:
            raise FileNotFoundError(f"shard spec {element!r} matches no shard")
        urls.update(dict.fromkeys(matches))
    return list(urls)


def shard_id(url: str) -> str:
    """Stable object-name component for shard `url`: `<safe basename>-<12 hex>`.

    The hash covers the full URL, so same-named shards in different folders differ; the
    same URL always gives the same id (across workers, runs and machines).
    """
    name = url.rstrip("/").rsplit("/", 1)[-1]
    lower = name.lower()
    for suffix in SHARD_SUFFIXES:
        if lower.endswith(suffix):
            name = name[: -len(suffix)]
            break
    safe = _UNSAFE.sub("_", name).strip("._-")[:64] or "shard"
    digest = hashlib.blake2b(url.encode("utf-8"), digest_size=6, person=b"infl-ssl-shard")
    return f"{safe}-{digest.hexdigest()}"


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion: `{0..10}`, zero-padded `{000..010}`, lists `{a,b}`."""
    start = 0
    while match := _BRACE.search(pattern, start):
        choices = _brace_choices(match.group(1))
        if choices is None:  # `{x}` is literal, as in bash
            start = match.start() + 1
            continue
        head, tail = pattern[: match.start()], pattern[match.end() :]
        return [out for choice in choices for out in expand_braces(head + choice + tail)]
    return [pattern]


def _brace_choices(body: str) -> list[str] | None:
    """The alternatives of one brace body, or None when it is not an expansion."""
    if match := _RANGE.fullmatch(body):
        lo_text, hi_text = match.groups()
        lo, hi = int(lo_text), int(hi_text)
        if abs(hi - lo) >= _MAX_RANGE:
            raise ValueError(f"brace range {{{body}}} is too large")
        padded = any(len(t.lstrip("-")) > 1 and t.lstrip("-")[0] == "0" for t in match.groups())
        width = max(len(lo_text), len(hi_text)) if padded else 0
        step = 1 if hi >= lo else -1
        return [str(i).zfill(width) for i in range(lo, hi + step, step)]
    if "," in body:
        return body.split(",")
    return None


def _expand_element(element: str) -> list[str]:
    """Sorted, de-duplicated shard URLs of one spec element (empty when none exist)."""
    candidates = expand_braces(element)
    explicit = len(candidates) > 1
    found: set[str] = set()
    for candidate in candidates:
        found.update(_resolve(candidate, keep_missing=explicit))
    if explicit and not any(_exists_or_remote(url) for url in found):
        return []
    return sorted(found)


def _resolve(candidate: str, keep_missing: bool) -> list[str]:
    """Shards named by one brace-free candidate."""
    if is_remote(candidate):
        return _resolve_remote(candidate)
    path = os.path.abspath(local_path(candidate))
    if _GLOB_CHARS.search(candidate):
        return [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
    if os.path.isdir(path):
        return _local_folder(path)
    if os.path.isfile(path) or keep_missing:
        return [path]
    return []


def _local_folder(path: str) -> list[str]:
    """Every shard file under a local folder, recursively."""
    return [
        os.path.join(root, name)
        for root, _, names in os.walk(path)
        for name in names
        if _is_shard_name(name)
    ]


def _resolve_remote(candidate: str) -> list[str]:
    """Object-store glob, prefix listing, or one explicit object name."""
    glob_at = _GLOB_CHARS.search(candidate)
    if glob_at:
        prefix = candidate[: candidate.rfind("/", 0, glob_at.start()) + 1]
        pattern = _glob_regex(candidate)
        return [url for url in list_remote(prefix) if pattern.fullmatch(url)]
    if _is_shard_name(candidate):
        return [candidate]
    prefix = candidate if candidate.endswith("/") else candidate + "/"
    return [url for url in list_remote(prefix) if _is_shard_name(url)]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Regex of a path glob: `*` and `?` stay within one path segment, `**` crosses them."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append(f"[{body}]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def _is_shard_name(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES)


def _exists_or_remote(url: str) -> bool:
    return is_remote(url) or os.path.isfile(url)
