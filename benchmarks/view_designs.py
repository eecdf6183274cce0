"""Common random views against stratified (Latin-hypercube) common views, over draws.

For V = 16 and 32 the curvature is fitted with each design, then a fixed sample is embedded
with six independent view blocks; reliability (`pipeline.influence.reliability.measure`) is
averaged over the three disjoint pairs of blocks (mean and sd over the pairs).
`--refine 64 128` instead fits the default (V = 16, common views) once and compares refined
w (R views on those factors) drawn as common views or as one stratified block of R.

    OMP_NUM_THREADS=2 python benchmarks/view_designs.py --setting demo --fit 2000 --steps 200
    OMP_NUM_THREADS=2 python benchmarks/view_designs.py --setting demo --refine 64 128 256
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
from view_reliability import RESULTS, sample_arguments, setting, trained

from pipeline.influence.engine import InfluenceSSL
from pipeline.influence.reliability import measure

FIGURES = ("median_cos", "self_influence_spearman", "top10_overlap")


def compare(encoder, base, fit, sample, views: int, seeding: str, draws: int) -> list[str]:
    loss = dataclasses.replace(base.loss, num_views=views, view_seeding=seeding)
    engine = InfluenceSSL(encoder, dataclasses.replace(base, loss=loss)).fit(fit)
    keys = [f"s{i}" for i in range(len(sample))]
    ws = [engine.use_views(views, b * views).embed(sample, keys) for b in range(2 * draws)]
    ms = [measure(ws[2 * i], ws[2 * i + 1], views) for i in range(draws)]
    return cells(ms)


def cells(ms: list[dict]) -> list[str]:
    return [
        f"{np.mean([m[f] for m in ms]):.3f} ± {np.std([m[f] for m in ms]):.3f}" for f in FIGURES
    ]


def compare_refined(engine, sample, views: int, seeding: str, draws: int) -> list[str]:
    """Refined w of `views` views on the engine's factors, `draws` independent pairs."""
    keys = [f"s{i}" for i in range(len(sample))]
    ws = [engine.use_views(views, b * views, seeding).embed(sample, keys) for b in range(2 * draws)]
    return cells([measure(ws[2 * i], ws[2 * i + 1], views) for i in range(draws)])


def refine_table(
    encoder, base, fit, sample, refine: list[int], draws: int, seedings: list[str]
) -> list[str]:
    engine = InfluenceSSL(encoder, base).fit(fit)  # the default: V = 16, common views
    lines = [
        "| refine views | views | cos(w) median | self-infl. Spearman | top-10 shared |",
        "|---:|---|---:|---:|---:|",
    ]
    for views in refine:
        for seeding in seedings:
            row = compare_refined(engine, sample, views, seeding, draws)
            lines.append(f"| {views} | {seeding} | " + " | ".join(row) + " |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--setting", default="demo")
    sample_arguments(parser, sample=300)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--refine", type=int, nargs="*", help="refined-w views to compare")
    parser.add_argument("--seedings", nargs="+", default=["common", "stratified"])
    args = parser.parse_args()
    base, fit, sample = setting(args.setting, args)
    encoder = trained(base, fit, args.steps)
    if args.refine:
        lines = refine_table(encoder, base, fit, sample, args.refine, args.draws, args.seedings)
        return write_refined(args, lines)
    lines = [
        "| V | views | cos(w) median | self-infl. Spearman | top-10 shared |",
        "|---:|---|---:|---:|---:|",
    ]
    for views in (16, 32):
        for seeding in ("common", "stratified"):
            cells = compare(encoder, base, fit, sample, views, seeding, args.draws)
            lines.append(f"| {views} | {seeding} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    command = (
        f"OMP_NUM_THREADS=2 python benchmarks/view_designs.py --setting {args.setting} "
        f"--fit {args.fit} --sample {args.sample} --steps {args.steps} --draws {args.draws}"
    )
    text = f"# Common against stratified views\n\n`{command}`\n\n" + "\n".join(lines) + "\n"
    (RESULTS / f"view_designs_{args.setting}.md").write_text(text)
    print(text)


def write_refined(args, lines: list[str]) -> None:
    command = (
        f"OMP_NUM_THREADS=2 python benchmarks/view_designs.py --setting {args.setting} "
        f"--fit {args.fit} --sample {args.sample} --steps {args.steps} --draws {args.draws} "
        f"--refine {' '.join(map(str, args.refine))} --seedings {' '.join(args.seedings)}"
    )
    text = f"# Refined w: common against stratified views\n\n`{command}`\n\n" + "\n".join(lines)
    (RESULTS / f"view_designs_refine_{args.setting}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
