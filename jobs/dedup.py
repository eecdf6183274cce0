"""Entrypoint: `python -m jobs.dedup --out INDEX_URI [--set key=value ...]` (no Ray needed).

Also submittable as a Ray job (`ray job submit --working-dir . -- python -m jobs.dedup ...`)
to run next to the data on a cluster node.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["dedup", *sys.argv[1:]]))
