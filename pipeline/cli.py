"""`influence-ssl <verb>`: one verb per job; each is also a module under `jobs/`.

`fit` and `build` run on Ray (a cluster at `runtime.address` / RAY_ADDRESS, else an embedded
local one). The offline verbs read an index and need no Ray; for them `--out` names the index.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass

from pipeline.config import load_config


@dataclass(frozen=True)
class Verb:
    help: str
    config: str  # "module:ConfigClass"
    run: str  # "module:run_function"
    out_key: str | None = None  # the setting `--out` fills in (offline verbs: the index)


VERBS = {
    "demo": Verb(
        "the whole path on bundled real digits: shards, SSL encoder, fit, build, query, "
        "rank, dedup, groups, report",
        "pipeline.demo:DemoConfig",
        "pipeline.demo:run_demo",
        "out",
    ),
    "fit": Verb(
        "stream a sample of shards; fit the projected curvature; write factors and manifest",
        "pipeline.config:PipelineConfig",
        "pipeline.fit:run_fit",
    ),
    "build": Verb(
        "stream every shard; write one index part (and marker) per shard, then the search index",
        "pipeline.config:PipelineConfig",
        "pipeline.build:run_build",
    ),
    "query": Verb(
        "top-k proponents and opponents of keys in the index or of image files/URIs",
        "pipeline.query:QueryConfig",
        "pipeline.query:run_query",
        "index",
    ),
    "rank": Verb(
        "examples ordered by self-influence (outliers, memorisation)",
        "pipeline.rank:RankConfig",
        "pipeline.rank:run_rank",
        "index",
    ),
    "dedup": Verb(
        "exact and influence duplicates: groups and a keep/remove list",
        "pipeline.dedup:DedupConfig",
        "pipeline.dedup:run_dedup",
        "index",
    ),
    "groups": Verb(
        "self-influence and influence between groups of a metadata field",
        "pipeline.groups:GroupsConfig",
        "pipeline.groups:run_groups",
        "index",
    ),
    "report": Verb(
        "a static HTML report with thumbnails and plots of the outputs above",
        "pipeline.report:ReportConfig",
        "pipeline.report:run_report",
        "index",
    ),
    "validate": Verb(
        "measure attribution quality (LDS against baselines, removal test) on bundled digits",
        "pipeline.validate:ValidateConfig",
        "pipeline.validate:run_validate",
    ),
}
PIPELINE_VERBS = ("fit", "build")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="influence-ssl",
        description="Label-free influence (Influence-SSL) for self-supervised image encoders.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, verb in VERBS.items():
        command = sub.add_parser(name, help=verb.help, description=verb.help)
        command.add_argument("--config", help="YAML file with settings")
        command.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override one setting, e.g. --set influence.curvature.kind=dense",
        )
        command.add_argument(
            "--out",
            help="the output folder or s3:// URI (for offline verbs: the index to read)",
        )
        if name in PIPELINE_VERBS:
            command.add_argument(
                "--shards", nargs="+", help="input shards: paths, globs, {a..b}, s3://prefix/"
            )
            command.add_argument(
                "--force", action="store_true", help="take over another run's lease on --out"
            )
        command.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    verb = VERBS[args.verb]
    config = load_config(resolve(verb.config), args.config, overrides_of(args, verb))
    result = resolve(verb.run)(config)
    if args.verb == "build":
        return 1 if result["failed"] or result["shards_missing"] else 0
    return 0


def resolve(path: str):
    """`module:name` -> the object (imported on use: `query` never loads Ray, say)."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def overrides_of(args: argparse.Namespace, verb: Verb) -> list[str]:
    """`--set` values, then the shortcuts (`--out`, `--shards`, `--force`) on top."""
    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"{verb.out_key or 'output'}={args.out}")
    if getattr(args, "shards", None):
        overrides.append("input.shards=[" + ", ".join(quote(s) for s in args.shards) + "]")
    if getattr(args, "force", False):
        overrides.append("force=true")
    return overrides


def quote(value: str) -> str:
    """A YAML flow-sequence item that stays a plain string (braces and commas included)."""
    return "'" + value.replace("'", "''") + "'"


if __name__ == "__main__":
    sys.exit(main())
