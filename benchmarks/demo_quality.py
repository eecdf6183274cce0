"""What a user of the demo's index sees: dedup over tau, query label agreement, outliers.

Dedup (pixel hash off):
The demo plants 20 exact copies and 20 near-copies (1-pixel shift, dimmed) under their own
keys. For each mode (embedding z; influence w as stored; influence with refinement: candidate
pairs re-scored with w of `--refine` views, images read back from the shards) and each tau:
planted copies found (grouped with their original), and removals that are not a planted copy
or its original (false removals). Also: for every exact copy, whether its original is its
top proponent (cosine of w, itself excluded).

Queries: 300 held-out digits (not in the corpus) queried as images with the query default
(4x the index's views); the share of their top-10 proponents (cosine) that carry the
query's digit, against the top-10 neighbours by the representation z and chance.

Outliers: AUROC of self-influence (high = outlier) for the 10 planted out-of-domain images
among the rest, against the embedding k-NN distance (1 - mean cosine to the 10 nearest z).

    bash dev.sh demo && OMP_NUM_THREADS=2 python benchmarks/demo_quality.py
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from pipeline.dedup import DedupConfig, dedup_table, read_inputs
from pipeline.demo import DemoConfig, copies_found, load_digits, make_corpus
from pipeline.index.parts import vectors
from pipeline.index.reader import Index
from pipeline.refine import Refiner
from pipeline.search import l2_normalize

RESULTS = Path(__file__).parent / "results"
QUERIES = 300
TAUS = {
    "embedding": (0.95, 0.98, 0.99, 0.995, 0.998),
    "influence": (0.5, 0.6, 0.7, 0.8, 0.85, 0.9),
    "influence, refined": (0.6, 0.7, 0.8, 0.85, 0.9, 0.95),
}


def top_proponent_of_copies(w: np.ndarray, keys: list[str], truth, kinds) -> float:
    u = l2_normalize(w.astype(np.float32))
    position = {k: i for i, k in enumerate(keys)}
    copies = [k for k in truth if kinds[k] == "exact_copy"]
    hits = 0
    for key in copies:
        cos = u @ u[position[key]]
        cos[position[key]] = -np.inf
        hits += keys[int(np.argmax(cos))] == truth[key]
    return hits / len(copies)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half."""
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None]).mean()
    ties = (pos[:, None] == neg[None]).mean()
    return float(greater + 0.5 * ties)


def label_agreement(refiner: Refiner, index: Index, labels: dict[str, str]) -> dict:
    config = DemoConfig()
    _, _, queries, query_labels = load_digits(config.num_train, 1000, config.seed)
    queries, query_labels = queries[:QUERIES], query_labels[:QUERIES].tolist()
    table = index.table(["key", "w", "z"])
    keys = table.column("key").to_pylist()
    row_labels = np.array([labels[k] for k in keys])
    engine = refiner.engine.use_views(4 * config.influence.loss.num_views)
    w_q = engine.embed(queries, keys=[f"q{i}" for i in range(len(queries))]).numpy()
    z_q = engine.represent(queries).numpy()
    out = {}
    for name, q, x in (
        ("influence", w_q, vectors(table, "w")),
        ("embedding", z_q, vectors(table, "z")),
    ):
        cos = l2_normalize(q.astype(np.float32)) @ l2_normalize(x.astype(np.float32)).T
        top = np.argsort(-cos, axis=1)[:, :10]
        wanted = np.array([str(c) for c in query_labels])[:, None]
        out[name] = float((row_labels[top] == wanted).mean())
    out["chance"] = float(np.mean([np.mean(row_labels == str(c)) for c in query_labels]))
    return out


def outliers(index: Index, kinds: dict[str, str]) -> dict:
    from pipeline.search import SearchIndex

    table = index.table(["key", "self_influence", "z"])
    keys = table.column("key").to_pylist()
    positive = np.array([kinds[k] == "outlier" for k in keys])
    s = table.column("self_influence").to_numpy()
    z = vectors(table, "z").astype(np.float32)
    search = SearchIndex.build(z, kind="flat", normalized=True)
    cosine, _ = search.search(z, 11)
    distance = 1 - cosine[:, 1:].mean(axis=1)
    return {"self_influence": auroc(s, positive), "embedding_knn": auroc(distance, positive)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--index", default="runs/demo/index")
    parser.add_argument("--refine", type=int, default=64)
    parser.add_argument("--out", default=str(RESULTS / "demo_quality.md"))
    args = parser.parse_args()
    corpus = make_corpus(DemoConfig())
    truth = {k: s for k, s in zip(corpus.keys, corpus.source, strict=True) if s}
    kinds = dict(zip(corpus.keys, corpus.kinds, strict=True))
    index = Index(args.index)
    refiner = Refiner(index, args.refine)
    lines = [
        "| mode | tau | exact copies found (of 20) | near-copies found (of 20) | removed | "
        "false removals |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    w_table = None
    for mode, taus in TAUS.items():
        base = DedupConfig(index=args.index, mode=mode.split(",")[0], exact=False)
        table, x = read_inputs(index, base)
        if mode == "influence":
            w_table = (x, table.column("key").to_pylist())
        for tau in taus:
            refine = args.refine if "refined" in mode else 0  # explicit: stored w or refined
            config = dataclasses.replace(base, tau=tau, refine=refine)
            result = dedup_table(table, x, config, refiner.rows if refine else None)
            s = copies_found(result, truth, kinds)
            lines.append(
                f"| {mode} | {tau} | {s['exact_found']} | {s['near_found']} | {s['removed']} | "
                f"{s['removed_not_planted']} |"
            )
            print(lines[-1], flush=True)
    top = top_proponent_of_copies(w_table[0], w_table[1], truth, kinds)
    labels = dict(zip(corpus.keys, corpus.labels, strict=True))
    agreement = label_agreement(refiner, index, labels)
    auc = outliers(index, kinds)
    text = (
        f"# The demo index as a user sees it\n\n`OMP_NUM_THREADS=2 python "
        f"benchmarks/demo_quality.py --refine {args.refine}` on `{args.index}`.\n\n"
        f"## Dedup, pixel hash off\n\nRefined examples: "
        f"{sum(v is not None for v in refiner.cache.values())}.\n\n"
        + "\n".join(lines)
        + f"\n\nExact copies whose original is their top proponent (stored w, pixel hash "
        f"off): {top:.0%}.\n\n## Queries\n\n{QUERIES} held-out digits as image queries: "
        f"share of the top-10 that carry the query's digit: influence (cosine of w) "
        f"{agreement['influence']:.3f}, embedding (cosine of z) {agreement['embedding']:.3f}, "
        f"chance {agreement['chance']:.3f}.\n\n## Outliers\n\nAUROC for the 10 planted "
        f"out-of-domain images: self-influence (high = outlier) {auc['self_influence']:.3f}, "
        f"embedding k-NN distance {auc['embedding_knn']:.3f}.\n"
    )
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
