"""The demo, shortened (fewer images, fewer steps), end to end through every verb."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.config import load_config
from pipeline.dedup import read_dedup_groups
from pipeline.demo import DemoConfig, run_demo
from pipeline.index.reader import Index


class Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_short_demo_finds_every_exact_copy_and_writes_the_report(ray_session, tmp_path):
    overrides = [
        f"out={tmp_path}",
        "num_train=300",
        "exact_copies=6",
        "near_copies=4",
        "outliers=4",
        "per_shard=100",
        "workers=1",
        "train.steps=10",
        "train.batch_size=64",
    ]
    findings = run_demo(load_config(DemoConfig, None, overrides))

    for mode in ("influence", "embedding"):
        found = findings["dedup"][mode]
        assert found["exact_found"] == found["exact_planted"] == 6
    assert findings["examples"] == 300 + 6 + 4 + 4
    for ranking in ("top_self_influence", "bottom_self_influence", "top_embedding_knn_distance"):
        assert 0 <= findings[f"outliers_in_{ranking}"] <= 4
    index = tmp_path / "index"
    influence = read_dedup_groups(Index(str(index)), "influence").to_pylist()
    removed = [row for row in influence if not row["kept"]]
    assert removed and all(row["group"] >= 0 for row in removed)
    assert json.loads((tmp_path / "summary.json").read_text()) == findings

    report = Path(findings["report"])
    parser = Images()
    parser.feed(report.read_text())
    assert parser.sources, "the report shows no image"
    assert all((report.parent / src).is_file() for src in parser.sources)
    queries = pq.read_table(index / "query" / "results.parquet")
    assert set(queries.column("direction").to_pylist()) == {"proponent", "opponent"}
