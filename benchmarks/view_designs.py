"""Common random views against stratified (Latin-hypercube) common views, over draws.

For V = 16 and 32 the curvature is fitted with each design, then a fixed sample is embedded
with six independent view blocks; reliability (`pipeline.influence.reliability.measure`) is
averaged over the three disjoint pairs of blocks (mean and sd over the pairs).

    OMP_NUM_THREADS=2 python benchmarks/view_designs.py --setting demo --fit 2000 --steps 200
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
from view_reliability import RESULTS, setting, trained

from pipeline.influence.engine import InfluenceSSL
from pipeline.influence.reliability import measure

FIGURES = ("median_cos", "self_influence_spearman", "top10_overlap")


def compare(encoder, base, fit, sample, views: int, seeding: str, draws: int) -> list[str]:
    loss = dataclasses.replace(base.loss, num_views=views, view_seeding=seeding)
    engine = InfluenceSSL(encoder, dataclasses.replace(base, loss=loss)).fit(fit)
    keys = [f"s{i}" for i in range(len(sample))]
    ws = [engine.use_views(views, b * views).embed(sample, keys) for b in range(2 * draws)]
    ms = [measure(ws[2 * i], ws[2 * i + 1], views) for i in range(draws)]
    return [
        f"{np.mean([m[f] for m in ms]):.3f} ± {np.std([m[f] for m in ms]):.3f}" for f in FIGURES
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--setting", default="demo")
    parser.add_argument("--fit", type=int, default=2000)
    parser.add_argument("--sample", type=int, default=300)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--draws", type=int, default=3)
    args = parser.parse_args()
    base, fit, sample = setting(args.setting, args)
    encoder = trained(base, fit, args.steps)
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


if __name__ == "__main__":
    main()
