"""Execution: the per-shard worker (no Ray) and the thin Ray layer that distributes it."""
