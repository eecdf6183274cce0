"""Entrypoint: `python -m jobs.demo [--config CFG] [--set key=value ...]`."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
