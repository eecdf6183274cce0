"""Ray job entrypoint: `python -m jobs.train --config CFG [--set key=value ...]`.

Submitted with `ray job submit --address http://HEAD:8265 --working-dir . -- python -m
jobs.train ...` (Ray sets RAY_ADDRESS), the training loop runs in one Ray task on that
cluster, on a GPU where it has one, and this driver writes the checkpoint, loss curve and
job YAML to `output` (use an s3:// URI, or a folder the driver can write). Run plainly,
without a cluster, it trains in this process.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
