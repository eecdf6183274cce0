"""Data layer: shard lists, the streaming WebDataset reader, and a shard writer."""

from pipeline.data.shards import SHARD_SUFFIXES, expand_braces, expand_shards, shard_id
from pipeline.data.webdataset import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    SAMPLE_REASONS,
    SHARD_REASONS,
    SKIP_REASONS,
    ImageError,
    ImageTooLargeError,
    ReadStats,
    Sample,
    ShardDigest,
    UndecodableImageError,
    decode_image,
    decode_image_hashed,
    pixel_hash,
    read_shard,
    read_shards,
)
from pipeline.data.writer import write_shards

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "SAMPLE_REASONS",
    "SHARD_REASONS",
    "SHARD_SUFFIXES",
    "SKIP_REASONS",
    "ImageError",
    "ImageTooLargeError",
    "ReadStats",
    "Sample",
    "ShardDigest",
    "UndecodableImageError",
    "decode_image",
    "decode_image_hashed",
    "expand_braces",
    "expand_shards",
    "pixel_hash",
    "read_shard",
    "read_shards",
    "shard_id",
    "write_shards",
]
