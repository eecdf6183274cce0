"""What an index is on storage: manifest, factors, per-shard Parquet parts and markers."""
