"""Random projection matrices, regenerated anywhere from (seed, layer name, side)."""

from __future__ import annotations

import hashlib
import math

import torch

PROJECTION_KINDS = ("gaussian", "rademacher")


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from a stable hash of `parts` (never Python's salted `hash`)."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def projection_matrix(
    seed: int, layer: str, side: str, dim: int, features: int, kind: str = "gaussian"
) -> torch.Tensor | None:
    """A `dim x features` matrix with i.i.d. entries of variance 1/dim, or None for identity.

    None means the side is not projected: `dim >= features` (a projection could only add
    noise) or `dim <= 0`. Generated on the CPU in float32 so every device and worker gets
    bit-identical matrices; callers move them where they are used.
    """
    if dim <= 0 or dim >= features:
        return None
    generator = torch.Generator().manual_seed(stable_seed("projection", seed, layer, side))
    if kind == "gaussian":
        matrix = torch.randn(dim, features, generator=generator)
    elif kind == "rademacher":
        matrix = torch.randint(0, 2, (dim, features), generator=generator).float() * 2 - 1
    else:
        raise ValueError(f"unknown projection kind {kind!r}; choose one of {PROJECTION_KINDS}")
    return matrix / math.sqrt(dim)
