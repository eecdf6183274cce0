"""Entrypoint: `python -m jobs.rank --set index=URI [--set top=20]` (no Ray needed)."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["rank", *sys.argv[1:]]))
