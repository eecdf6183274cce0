"""Entrypoint: `python -m jobs.dedup --out INDEX_URI [--set key=value ...]`.

As a Ray job (`ray job submit --working-dir . -- python -m jobs.dedup --out s3://...`) the
edge batches and list parts run as Ray tasks on the cluster: `ray=true` is this entrypoint's
default. A later `--set ray=false` (not a config file's `ray:`) runs them in threads of the
job's own process, as the CLI verb `influence-ssl dedup` does. `--set runtime.num_workers=N`
bounds the tasks in flight, `runtime.cpus_per_worker` the CPUs (FAISS threads) of each.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    # The default first: a `--set ray=...` given on the command line comes later and wins.
    sys.exit(main(["dedup", "--set", "ray=true", *sys.argv[1:]]))
