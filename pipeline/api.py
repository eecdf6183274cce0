"""The Python API: one function per CLI verb, taking the same settings as keyword arguments.

    >>> from pipeline import api
    >>> api.fit("s3://bucket/index", shards=["s3://bucket/shards/"], influence={...})
    >>> api.build("s3://bucket/index", shards=["s3://bucket/shards/"], influence={...})
    >>> hits = api.query("s3://bucket/index", images=["cat.jpg"], top=20)   # pyarrow Table
    >>> summary = api.dedup("s3://bucket/index", tau=0.9)   # dedup.read_keep_list for the list

Nested settings are dicts (`influence={"curvature": {"kind": "dense"}}`), as in the YAML file;
each function returns what its verb writes (a summary dict, or a pyarrow Table).
"""

from __future__ import annotations

from typing import Any

from pipeline.cli import VERBS, resolve
from pipeline.config import from_dict


def _run(verb: str, settings: dict[str, Any]) -> Any:
    spec = VERBS[verb]
    return resolve(spec.run)(from_dict(resolve(spec.config), settings))


def fit(output: str, shards: list[str], **settings: Any) -> dict:
    """Fit the curvature factors on a sample of the shards; writes factors and manifest."""
    inputs = {**settings.pop("input", {}), "shards": list(shards)}
    return _run("fit", {"output": output, "input": inputs, **settings})


def build(output: str, shards: list[str], **settings: Any) -> dict:
    """Index every shard (parts, markers, search index); the run summary."""
    inputs = {**settings.pop("input", {}), "shards": list(shards)}
    return _run("build", {"output": output, "input": inputs, **settings})


def query(index: str, **settings: Any):
    """Top-k proponents and opponents of `keys=[...]` and/or `images=[...]`."""
    return _run("query", {"index": index, **settings})


def rank(index: str, **settings: Any):
    """Every example ordered by self-influence."""
    return _run("rank", {"index": index, **settings})


def dedup(index: str, **settings: Any):
    """Duplicate groups and the keep/remove list (written beside the index); the summary."""
    return _run("dedup", {"index": index, **settings})


def groups(index: str, **settings: Any):
    """Per-group self-influence statistics and the group-by-group influence matrix."""
    return _run("groups", {"index": index, **settings})


def report(index: str, **settings: Any) -> str:
    """The static HTML report; returns its location."""
    return _run("report", {"index": index, **settings})


def validate(**settings: Any) -> dict:
    """Attribution quality (LDS against baselines, removal test) on bundled digits."""
    return _run("validate", settings)
