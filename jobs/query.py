"""Ray job entrypoint: `python -m jobs.query --set index=URI --set images_from=s3://b/q.txt`.

Submitted with `ray job submit --address http://HEAD:8265 --working-dir . -- python -m
jobs.query ...` (Ray sets RAY_ADDRESS), the query images are embedded in batches on the
cluster's workers and the results written beside the index (and to `out=`). Key queries, and
image queries run plainly without a cluster, need no Ray.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["query", *sys.argv[1:]]))
