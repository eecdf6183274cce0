"""Ray job entrypoint: `python -m jobs.build --config CFG [--set key=value ...]`.

Submitted with `ray job submit --address http://HEAD:8265 --working-dir . -- python -m
jobs.build ...` it joins that cluster (Ray sets RAY_ADDRESS); run plainly it starts an
embedded local Ray.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["build", *sys.argv[1:]]))
