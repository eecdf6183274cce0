"""Entrypoint: `python -m jobs.train [--config CFG] [--set key=value ...]` (also a Ray job)."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
