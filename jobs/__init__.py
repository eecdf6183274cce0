"""Ray job entrypoints: `python -m jobs.<verb> ...`, one per CLI verb."""
