"""Entrypoint: `python -m jobs.validate [--set key=value ...]` (in memory, no Ray needed).

Also submittable as a Ray job (`ray job submit --working-dir . -- python -m jobs.validate ...`)
to run next to the data on a cluster node.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["validate", *sys.argv[1:]]))
