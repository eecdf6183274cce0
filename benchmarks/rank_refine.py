"""Does `rank --set refine=R` make the top of the self-influence ranking reproducible?

Two users index the same corpus with the same model and factors but independent view draws
(views 0..V-1 and V..2V-1 of the common stream). Each ranks by self-influence ||w||^2 and,
as `rank --set refine=R --set refine_top=T` does, re-embeds its own top T with R views (user
A views 0..R-1, user B R..2R-1) and re-orders them. Figures: the share of the top k that
both users name (k = 10, 20, 50), from the index's V views and after refinement; and how
much of the refined top 20 the stored top 20 already held.

    OMP_NUM_THREADS=2 python benchmarks/rank_refine.py --setting demo --sample 2000
    OMP_NUM_THREADS=2 python benchmarks/rank_refine.py --setting resnet18_32 --fit 1000 \
        --sample 1000

Writes `benchmarks/results/rank_refine_<setting>.md`.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from view_reliability import RESULTS, sample_arguments, setting, trained

from pipeline.influence.engine import InfluenceSSL

TOPS = (10, 20, 50)


def self_influence(engine: InfluenceSSL, images, keys, views: int, offset: int) -> np.ndarray:
    w = engine.use_views(views, offset).embed(images, keys).double()
    return w.pow(2).sum(1).numpy()


def top(values: np.ndarray, k: int, among: np.ndarray | None = None) -> set[int]:
    rows = np.arange(len(values)) if among is None else among
    return set(rows[np.argsort(-values[rows], kind="stable")[:k]].tolist())


def shared(a: set[int], b: set[int], k: int) -> float:
    return len(a & b) / k


def run(args) -> list[str]:
    base, fit, sample = setting(args.setting, args)
    encoder = trained(base, fit, args.steps)
    engine = InfluenceSSL(encoder, base).fit(fit)
    views = base.loss.num_views
    keys = [f"s{i}" for i in range(len(sample))]
    stored = [self_influence(engine, sample, keys, views, u * views) for u in (0, 1)]
    candidates = [np.argsort(-s, kind="stable")[: args.top] for s in stored]
    lines = [
        f"Setting `{args.setting}`: {len(sample)} examples, V = {views} index views, the top "
        f"T = {args.top} refined; encoder trained {args.steps} SimCLR steps, fit on "
        f"{len(fit)}. Shares of the top k both users name.",
        "",
        "| ranking | " + " | ".join(f"top-{k} shared" for k in TOPS) + " | refined top-20 in "
        "the stored top-20 | s per refined example |",
        "|---|" + "---:|" * (len(TOPS) + 2),
    ]
    row = [shared(top(stored[0], k), top(stored[1], k), k) for k in TOPS]
    lines.append(f"| index, V = {views} | " + " | ".join(f"{x:.2f}" for x in row) + " | | |")
    print(lines[-1], flush=True)
    for refine in args.refine:
        refined, seconds = [], 0.0
        for u in (0, 1):
            values = np.full(len(sample), -np.inf)
            chosen = candidates[u]
            tic = time.perf_counter()
            values[chosen] = self_influence(
                engine, sample[chosen], [keys[i] for i in chosen], refine, u * refine
            )
            seconds += time.perf_counter() - tic
            refined.append(values)
        tops = {k: [top(r, k, c) for r, c in zip(refined, candidates, strict=True)] for k in TOPS}
        row = [shared(*tops[k], k) for k in TOPS]
        kept = np.mean([shared(tops[20][u], top(stored[u], 20), 20) for u in (0, 1)])
        per = seconds / (2 * args.top)
        lines.append(
            f"| refined, R = {refine} | "
            + " | ".join(f"{x:.2f}" for x in row)
            + f" | {kept:.2f} | {per:.3f} |"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--setting", default="demo")
    sample_arguments(parser, sample=2000)
    parser.add_argument("--top", type=int, default=200, help="T: rows refined (refine_top)")
    parser.add_argument("--refine", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args()
    lines = run(args)
    command = (
        f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python "
        f"benchmarks/rank_refine.py --setting {args.setting} --fit "
        f"{args.fit} --sample {args.sample} --steps {args.steps} --top {args.top} --refine "
        + " ".join(str(r) for r in args.refine)
        + "`"
    )
    path = RESULTS / f"rank_refine_{args.setting}.md"
    body = "\n".join(["# Refined self-influence ranking", "", command, "", *lines, ""])
    path.write_text(body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
