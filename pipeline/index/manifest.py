"""manifest.json: what produced an index, so it can be read and checked long after the job.

The fingerprint is the part of the manifest that determines the index vectors: the model
identity, the views, the loss, the projection, the tracked layers, the curvature and the
decode resolution. A query, a rerun or an append with another fingerprint is refused.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pipeline import __version__
from pipeline.config import PipelineConfig, to_dict
from pipeline.index.layout import MANIFEST

FORMAT = "influence-ssl/index/1"


class IndexMismatchError(ValueError):
    """The index was built with other settings than the ones asked for."""


def fingerprint(config: PipelineConfig, model: dict[str, Any], layers: list[dict]) -> dict:
    influence = to_dict(config.influence)
    return {
        "model": {
            k: model.get(k)
            for k in (
                "arch",
                "checkpoint_sha256",
                "num_parameters",
                "representation",
                "out_dim",
                "kwargs",
            )
        },
        "augment": influence["augment"],
        "loss": influence["loss"],
        "projection": influence["projection"],
        "curvature": influence["curvature"],
        "layers": layers,
        "side": config.input.side or config.influence.augment.size,
    }


def differences(expected: dict, actual: dict, prefix: str = "") -> list[str]:
    """Dotted paths where two nested dicts disagree."""
    out = []
    for key in sorted(set(expected) | set(actual)):
        a, b = expected.get(key), actual.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, path + ".")
        elif a != b:
            out.append(f"{path}: index has {b!r}, asked for {a!r}")
    return out


def check_compatible(manifest: dict, expected_fingerprint: dict, what: str) -> None:
    """Raise IndexMismatchError naming each setting that differs."""
    found = differences(expected_fingerprint, manifest.get("fingerprint", {}))
    if found:
        raise IndexMismatchError(
            f"cannot {what}: the index was built with other settings:\n  " + "\n  ".join(found)
        )


def new_manifest(config: PipelineConfig, model: dict, layers: list[dict], dimension: int) -> dict:
    return {
        "format": FORMAT,
        "code_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": fingerprint(config, model, layers),
        "model": model,
        "dimension": dimension,
        "vector_dtype": config.index.vector_dtype,
        "config": to_dict(config),
        "factors": None,
        "shards": [],
        "stats": {},
    }


def read_manifest(storage) -> dict | None:
    if not storage.exists(MANIFEST):
        return None
    manifest = json.loads(storage.read_bytes(MANIFEST))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{storage.url(MANIFEST)} is not an influence-ssl index manifest")
    return manifest


def write_manifest(storage, manifest: dict) -> None:
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    storage.write_bytes(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
