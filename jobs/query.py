"""Entrypoint: `python -m jobs.query --set index=URI --set 'keys=[k1, k2]'` (no Ray needed)."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["query", *sys.argv[1:]]))
