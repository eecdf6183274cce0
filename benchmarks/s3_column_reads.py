"""Bytes the `rank` verb reads from S3, against the size of the index it ranks.

A synthetic index (random w, every column `build` writes, written by the real part writer)
goes to moto's S3 server on loopback; then the real `rank` verb runs against the s3:// index
through a proxy that counts the response bytes. `rank` needs key, shard, self_influence,
loss, cls and metadata, not w or z: with projected, ranged reads it should fetch a few percent
of the index (target <= 10%), where reading whole parts fetched all of it.

    python benchmarks/s3_column_reads.py                      # 50 parts x 2,048 rows, D = 256
    python benchmarks/s3_column_reads.py --parts 100 --rows 4096 --dim 1024
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from collections import Counter
from pathlib import Path

from pipeline.rank import RankConfig, run_rank
from pipeline.storage import S3Storage, open_storage
from pipeline.testing.indexes import write_synthetic_index
from pipeline.testing.s3server import ACCESS_KEY, SECRET_KEY, CountingProxy, start_s3_server

BUCKET = "s3-column-reads"
RESULTS = Path(__file__).resolve().parent / "results" / "s3_column_reads.md"


def point_aws_at(endpoint: str) -> None:
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )


def index_bytes(uri: str) -> tuple[int, int]:
    """(bytes of the parts, bytes of every object of the index)."""
    storage = open_storage(uri)
    sizes = {path: storage.size(path) for path in storage.list()}
    return sum(v for k, v in sizes.items() if k.startswith("parts/")), sum(sizes.values())


def ranked_through(endpoint: str, uri: str) -> tuple[CountingProxy, float]:
    """Run `rank` with every S3 request through a counting proxy; (proxy, seconds)."""
    with CountingProxy(endpoint) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint_url
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # its top/bottom listing
            run_rank(RankConfig(index=uri, top=5))
        seconds = time.perf_counter() - start
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    return proxy, seconds


def report(
    args: argparse.Namespace, sizes: tuple[int, int], proxy: CountingProxy, seconds: float
) -> str:
    parts, total = sizes
    rows = args.parts * args.rows
    kinds = Counter(r.split(" ")[0] for r in proxy.requests)
    part_gets = [r for r in proxy.requests if r.startswith("GET ") and "/parts/" in r]
    ranged = sum("bytes=" in r for r in part_gets)
    command = " ".join(["python benchmarks/s3_column_reads.py", *sys.argv[1:]])
    ratio = proxy.body_bytes / total
    return "\n".join(
        [
            "# S3 column reads: `rank` on an s3:// index",
            "",
            f"`{command}`",
            "",
            f"Index: {args.parts} parts x {args.rows:,} rows = {rows:,} rows, w float32 "
            f"D = {args.dim}, z float16 d = 128, pixel hash, tar spans (synthetic, written by "
            "`part_table` / `publish_part` to moto's S3 server on 127.0.0.1).",
            "",
            "| measure | value |",
            "|---|---|",
            f"| index size (all objects, before `rank`) | {total:,} B |",
            f"| parts | {parts:,} B |",
            f"| bytes read from S3 by `rank` (response bodies) | {proxy.body_bytes:,} B |",
            f"| read / index size | {ratio:.2%} |",
            f"| requests | {len(proxy.requests)} ({dict(sorted(kinds.items()))}) |",
            f"| GETs of parts (ranged) | {len(part_gets)} ({ranged}) |",
            f"| rank wall time (incl. writing rank output) | {seconds:.1f} s |",
            "",
            "`rank` reads key, shard, self_influence, loss, cls and metadata of every part "
            "through `pyarrow.fs.S3FileSystem` (HEAD, footer by range, the column chunks by "
            "range, coalesced), never w or z; before, each part was downloaded whole "
            f"(= {parts / total:.0%} of the index). The PUTs of `rank/` are not counted "
            "(request bodies are uploads). Most of what is read is the footer read: pyarrow "
            "reads the last 64 KiB of each part to find the footer, which is a smaller "
            "share of the larger parts of a real index.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", type=int, default=50)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    server, endpoint = start_s3_server()
    try:
        point_aws_at(endpoint)
        S3Storage(BUCKET).client.create_bucket(Bucket=BUCKET)
        start = time.perf_counter()
        uri = write_synthetic_index(f"s3://{BUCKET}/index", args.parts, args.rows, args.dim)
        print(f"wrote {args.parts * args.rows:,} rows in {time.perf_counter() - start:.1f} s")
        sizes = index_bytes(uri)
        proxy, seconds = ranked_through(endpoint, uri)
        text = report(args, sizes, proxy, seconds)
    finally:
        server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
