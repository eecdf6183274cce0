"""Commented job YAML files: `influence-ssl init`, and the job file `train` writes.

Every setting of a `PipelineConfig` is written with a one-line comment taken from the config
dataclasses themselves (the comment above or beside each field, a section's docstring), so
the file documents itself and stays in step with the code. The YAML loads back with
`load_config` into the same values.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import yaml

from pipeline import storage
from pipeline.config import (
    AugmentConfig,
    InputConfig,
    ModelConfig,
    PipelineConfig,
    from_dict,
    to_dict,
)
from pipeline.errors import UserError

# A comment grows by whole sentences up to this length (the first sentence always counts).
_COMMENT_CHARS = 150
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"A-Z0-9(])")


@dataclass
class InitConfig:
    """`influence-ssl init`: a commented job YAML for fit/build around an existing checkpoint."""

    path: str = "job.yaml"  # the YAML file to write (local path or s3:// URI; CLI --out)
    # The encoder's weights: local path, file:// or s3:// URI (fills model.checkpoint).
    checkpoint: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)  # the encoder of the checkpoint
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # views (as in training)
    input: InputConfig = field(default_factory=InputConfig)  # the shards to index
    output: str = "runs/index"  # where fit and build write the index
    check: bool = True  # build the encoder and load the checkpoint before writing the file
    overwrite: bool = False  # replace an existing file at `path`


def run_init(config: InitConfig) -> dict[str, Any]:
    """Write the job YAML; returns where, and the job's settings as plain data."""
    job = job_of(config)
    if config.check:
        check_model(job)
    if job.input.shards:
        check_shards(job.input.shards)
    text = job_yaml(job, header=init_header(job))
    write_text(config.path, text, config.overwrite)
    print(f"wrote {config.path}: run `influence-ssl fit --config {config.path}`", flush=True)
    if not job.input.shards:
        print("note: input.shards is empty; set it before fit and build", flush=True)
    return {"path": config.path, "job": to_dict(job)}


def job_of(config: InitConfig) -> PipelineConfig:
    checkpoint = config.checkpoint or config.model.checkpoint
    if not checkpoint:
        raise UserError(
            "init needs the encoder's checkpoint: add --set checkpoint=PATH_OR_S3_URI "
            "(and model.arch=... for its architecture)"
        )
    job = PipelineConfig(output=config.output, input=config.input)
    job.influence.model = dataclasses.replace(config.model, checkpoint=checkpoint)
    job.influence.augment = config.augment
    return job


def check_model(job: PipelineConfig) -> None:
    """Build the encoder and load its weights, so a wrong arch or path fails here, not on
    the cluster."""
    from pipeline.models import build_encoder

    model = job.influence.model
    try:
        build_encoder(model, open_uri=storage.read_uri)
    except UserError:
        raise
    except (ValueError, OSError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"model.arch={model.arch!r} with checkpoint {model.checkpoint} does not load: "
            f"{detail}; fix the arch/kwargs/projector_dims or the path (or --set check=false)"
        ) from exc


def check_shards(shards: list[str]) -> None:
    from pipeline.data import expand_shards

    try:
        expand_shards(shards)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"input.shards: {exc}; give existing shards (paths, globs, s3://)") from exc


def init_header(job: PipelineConfig) -> str:
    return (
        f"Job for `influence-ssl fit --config FILE` then `build --config FILE`.\n"
        f"Encoder {job.influence.model.arch} from {job.influence.model.checkpoint}.\n"
        "Every setting is listed with its default unless given; edit and rerun."
    )


def write_text(path: str, text: str, overwrite: bool) -> None:
    """Write `text` at a local path or object URI, atomically; refuse to replace a file
    unless `overwrite`."""
    store, name = storage.split_uri(path)
    if store.exists(name) and not overwrite:
        raise UserError(f"{path} already exists; choose another path or --set overwrite=true")
    store.write_bytes(name, text.encode("utf-8"))


# -- the commented YAML ------------------------------------------------------------------------


def job_yaml(config: Any, header: str = "") -> str:
    """`config` (a config dataclass) as YAML, each setting under a one-line comment."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    if lines:
        lines.append("")
    _emit(config, 0, lines)
    text = "\n".join(lines) + "\n"
    _check_round_trip(config, text)
    return text


def _emit(config: Any, indent: int, lines: list[str]) -> None:
    pad = " " * indent
    comments = field_comments(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        comment = comments.get(f.name) or _section_doc(value)
        if comment:
            lines.append(f"{pad}# {comment}")
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            _emit(value, indent + 2, lines)
        else:
            lines.append(f"{pad}{f.name}: {flow(value)}")


def _section_doc(value: Any) -> str:
    if not dataclasses.is_dataclass(value):
        return ""
    return one_line((inspect.getdoc(type(value)) or "").split("\n\n")[0])


def flow(value: Any) -> str:
    """One YAML flow value (`[a, b]`, `{k: v}`, a scalar), as `yaml.safe_load` reads back."""
    text = yaml.safe_dump(to_plain(value), default_flow_style=True, width=1 << 20)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    return value


def _check_round_trip(config: Any, text: str) -> None:
    """The written file must load back into the same settings (a bug otherwise)."""
    loaded = from_dict(type(config), yaml.safe_load(text) or {})
    if to_dict(loaded) != to_dict(config):
        raise AssertionError(f"job YAML does not load back into the same {type(config).__name__}")


@cache
def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment in `cls`'s source, as one line: the comment lines right
    above the field, else the comment at the end of its line."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {
        token.start[0]: token.string.lstrip("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above = _comment_above(node.lineno, comments, lines)
            trailing = comments.get(node.end_lineno or node.lineno, "")
            out[node.target.id] = one_line(above or trailing)
    return out


def _comment_above(lineno: int, comments: dict[int, str], lines: list[str]) -> str:
    found: list[str] = []
    line = lineno - 1
    while line in comments and lines[line - 1].lstrip().startswith("#"):
        found.insert(0, comments[line])
        line -= 1
    return " ".join(found)


def one_line(text: str) -> str:
    """Whole sentences of `text` (whitespace joined) up to `_COMMENT_CHARS`; at least one."""
    sentences = _SENTENCE_END.split(" ".join(text.split()))
    out = sentences[0]
    for sentence in sentences[1:]:
        if len(out) + 1 + len(sentence) > _COMMENT_CHARS:
            break
        out += " " + sentence
    return out
