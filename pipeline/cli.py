"""`influence-ssl <verb>`: one verb per job; each is also a module under `jobs/`.

`fit` and `build` run on Ray (a cluster at `runtime.address` / RAY_ADDRESS, else an embedded
local one). The offline verbs read an index and need no Ray; for them `--out` names the index.

A mistake the user can fix (a `UserError`, a missing or forbidden object, an index or
checkpoint that does not fit, a held lease) prints one or two lines on stderr, `error: ...`
and what to do, and exits with code 2; `--debug` adds the traceback. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from dataclasses import dataclass

from pipeline.config import load_config
from pipeline.errors import UserError


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
        "pipeline.demo.validate:ValidateConfig",
        "pipeline.demo.validate:run_validate",
    ),
    "ingest": Verb(
        "images (folder, s3:// prefix, or CSV/Parquet list with metadata) -> WebDataset shards; "
        "resumable, bad files skipped and counted",
        "pipeline.ingest:IngestConfig",
        "pipeline.ingest:run_ingest",
    ),
    "train": Verb(
        "train a SimCLR/BYOL/Barlow Twins encoder on shards; write a checkpoint, loss curve "
        "and a job YAML for fit/build",
        "pipeline.train:TrainJobConfig",
        "pipeline.train:run_train",
    ),
    "init": Verb(
        "write a commented job YAML for fit/build around an existing checkpoint",
        "pipeline.jobfile:InitConfig",
        "pipeline.jobfile:run_init",
        "path",
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
        command.add_argument("--debug", **DEBUG)
    parser.add_argument("--debug", **{**DEBUG, "default": False})
    return parser


# On the verb too (`influence-ssl query ... --debug`); SUPPRESS keeps it from resetting a
# `--debug` given before the verb.
DEBUG = {
    "action": "store_true",
    "default": argparse.SUPPRESS,
    "help": "on an error, also print the traceback",
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return run_verb(args)
    except Exception as error:
        lines = user_error_lines(error)
        if lines is None:
            raise  # a bug: the traceback is what helps
        if args.debug:
            traceback.print_exc()
        print("\n".join(lines), file=sys.stderr)
        return UserError.exit_code


def run_verb(args: argparse.Namespace) -> int:
    verb = VERBS[args.verb]
    config = load_config(resolve(verb.config), args.config, overrides_of(args, verb))
    result = resolve(verb.run)(config)
    if args.verb == "build":
        return 1 if result["failed"] or result["shards_missing"] else 0
    return 0


def user_error_lines(error: BaseException) -> list[str] | None:
    """`error: what and why` and at most one `hint: what to do` line, for an error the user
    can fix; None for anything else (a bug)."""
    hint = error_hint(error)
    if hint is None:
        return None
    return [f"error: {one_line(str(error))}"] + ([f"hint: {hint}"] if hint else [])


def error_hint(error: BaseException) -> str | None:
    """What to do about a user's error ("" when its message says it), None for a bug."""
    from pipeline.storage import AccessDeniedError, StorageError

    known = known_error_hint(error)  # first: some of these are UserErrors as well
    if known is not None:
        return known
    if isinstance(error, UserError):
        return ""
    if isinstance(error, AccessDeniedError):
        return (
            "check the credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID) and that they may read "
            "(and, for fit/build, write) this bucket"
        )
    if isinstance(error, FileNotFoundError | NotADirectoryError | IsADirectoryError):
        return ""  # a local or object path that is not there: the message names it
    if isinstance(error, StorageError):
        return "check the endpoint (AWS_ENDPOINT_URL), the network, and the bucket name"
    if isinstance(error, PermissionError):
        return "check the file's permissions"
    return None


def known_error_hint(error: BaseException) -> str | None:
    """The hint for the project's own typed errors ("" for none), None for other errors.
    Imported here: these modules pull in torch or Ray, which `--help` does not need."""
    from pipeline.index.lease import LeaseHeldError
    from pipeline.index.manifest import IndexMismatchError
    from pipeline.models.loading import CheckpointError

    if isinstance(error, IndexMismatchError):
        return (
            "use the settings the index was built with, or fit a new index with these "
            "(another --out, or overwrite=true to replace this one)"
        )
    if isinstance(error, CheckpointError):
        return (
            "the checkpoint must be of influence.model.arch, with the same projector_dims and "
            "kwargs it was trained with"
        )
    if isinstance(error, LeaseHeldError):
        return ""
    return None


def one_line(message: str, limit: int = 800, detail_limit: int = 160) -> str:
    """A multi-line message (a list of differences, say) as one line: the first line whole,
    each further one cut at `detail_limit` (a layer list's repr is long), all at `limit`."""
    parts = [part.strip() for part in message.strip().splitlines() if part.strip()]
    first, *details = parts or ["(no message)"]
    details = [d if len(d) <= detail_limit else d[: detail_limit - 3] + "..." for d in details]
    text = "; ".join([first, *details]).replace(":;", ":")
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
