"""Entrypoint: `python -m jobs.init [--config CFG] [--set key=value ...]` (also a Ray job)."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["init", *sys.argv[1:]]))
