"""`influence-ssl <verb>`: one verb per job; each is also a module under `jobs/`."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.config import load_config

VERBS = {
    "demo": "the whole method on bundled real digits: train an SSL encoder, fit, embed, score",
    "fit": "stream a sample of shards; fit the projected curvature; write factors and manifest",
    "build": "stream every shard; write one index part (and marker) per shard",
    "rank": "examples of an index ordered by self-influence (outliers, memorisation)",
    "query": "top-k proponents and opponents of examples already in an index (by key)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="influence-ssl",
        description="Label-free influence (Influence-SSL) for self-supervised image encoders.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, help_text in VERBS.items():
        command = sub.add_parser(verb, help=help_text, description=help_text)
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
            "--out", help="output (for rank: the index) folder or s3:// URI, a --set shortcut"
        )
        if verb in ("fit", "build"):
            command.add_argument(
                "--shards", nargs="+", help="input shards: paths, globs, {a..b}, s3://prefix/"
            )
        command.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.verb == "demo":
        from pipeline.demo import DemoConfig, run_demo

        overrides = list(args.overrides) + ([f"out={args.out}"] if args.out else [])
        run_demo(load_config(DemoConfig, args.config, overrides))
        return 0
    if args.verb in ("rank", "query"):
        return run_offline_verb(args)
    return run_pipeline_verb(args)


def run_offline_verb(args: argparse.Namespace) -> int:
    """Verbs that read an index and need no Ray: `--out` names the index."""
    overrides = list(args.overrides) + ([f"index={args.out}"] if args.out else [])
    if args.verb == "rank":
        from pipeline.rank import RankConfig, run_rank

        run_rank(load_config(RankConfig, args.config, overrides))
    else:
        from pipeline.query import QueryConfig, run_query

        run_query(load_config(QueryConfig, args.config, overrides))
    return 0


def run_pipeline_verb(args: argparse.Namespace) -> int:
    from pipeline.config import PipelineConfig

    config = load_config(PipelineConfig, args.config, list(args.overrides))
    if args.out:
        config.output = args.out
    if args.shards:
        config.input.shards = list(args.shards)
    if args.verb == "fit":
        from pipeline.fit import run_fit

        run_fit(config)
        return 0
    from pipeline.build import run_build

    summary = run_build(config)
    return 1 if summary["failed"] or summary["shards_missing"] else 0


if __name__ == "__main__":
    sys.exit(main())
