"""Settings as dataclasses, loadable from one YAML file and overridable per key.

Every setting that changes the numbers written to an index (model, views, loss, projection,
curvature) lives here, so the manifest can record it and a query can check it.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UserError


@dataclass
class ModelConfig:
    """Which encoder to build and which of its outputs is the representation `z`."""

    # Built-in name (models.BUILTIN_ARCHS: "resnet18", "vit_small_patch16", ...),
    # "timm:<name>", "torchvision:<name>", or "module:function".
    arch: str = "resnet18"
    # Local path, file:// or s3:// URI of a state dict (safetensors or torch weights_only).
    checkpoint: str | None = None
    # Projector MLP on top of the backbone: [] for none, else hidden/output widths.
    projector_dims: list[int] = field(default_factory=list)
    # "auto": projector output where there is a projector, else backbone features.
    representation: str = "auto"
    # Input channels (1 for grayscale digits, 3 for RGB).
    in_channels: int = 3
    # Extra keyword arguments for the factory ("module:function" or built-in).
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class AugmentConfig:
    """SimCLR-style view family; each part can be switched off or tuned."""

    size: int = 224  # output side of every view, in pixels
    crop_scale: tuple[float, float] = (0.2, 1.0)  # random resized crop: area fraction range
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio (width/height) range
    flip_p: float = 0.5  # probability of a horizontal flip
    jitter_p: float = 0.8  # probability of colour jitter (the four strengths below)
    brightness: float = 0.4  # jitter: brightness factor in [1 - b, 1 + b]
    contrast: float = 0.4  # jitter: contrast factor in [1 - c, 1 + c]
    saturation: float = 0.4  # jitter: saturation factor in [1 - s, 1 + s]
    hue: float = 0.1  # jitter: hue shift in [-h, h] turns
    grayscale_p: float = 0.2  # probability of converting a view to grayscale
    blur_p: float = 0.0  # probability of a Gaussian blur
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # blur sigma range, in output pixels
    # Per-channel normalisation applied after augmentation (empty: none).
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)  # per-channel divisor (with mean; empty: none)


@dataclass
class LossConfig:
    """Augmentation-consistency loss over V views of each example (SPEC section 2)."""

    # V: views per example. The default is the smallest that made w reproducible on the
    # reliability curve (docs/benchmarks.md); every index records its own reliability.
    num_views: int = 16
    # "all_pairs": the mean over all C(V, 2) pairs of views; "pairs": V/2 disjoint pairs.
    estimator: str = "all_pairs"
    kind: str = "cosine"  # "cosine" (||n(z)-n(z')||^2 = 2 - 2cos) or "l2"
    seed: int = 0  # global seed of the views
    # "common": view a has the same parameters for every example (from seed and a alone);
    # "stratified": common views drawn as Latin-hypercube blocks of V (each view parameter
    # covers its range evenly; more reproducible from V = 32 and for refined w, not at 16:
    # docs/benchmarks.md); "key": views drawn per example key.
    view_seeding: str = "common"


@dataclass
class ProjectionConfig:
    """Kronecker random projection of each layer's gradient."""

    dim_in: int = 16  # k_in per layer (input side, bias column included); grouped Conv2d: half
    dim_out: int = 16  # k_out per layer (output side); grouped/depthwise Conv2d: half
    # Per-layer overrides: {"layer4.*": [32, 32]} (fnmatch pattern -> [dim_in, dim_out]).
    per_layer: dict[str, list[int]] = field(default_factory=dict)
    kind: str = "gaussian"  # "gaussian" or "rademacher"
    seed: int = 0  # seed of the projection matrices
    enabled: bool = True  # False: identity on both sides (exact gradients)


@dataclass
class CurvatureConfig:
    """How the curvature is approximated and damped."""

    # "auto" (default): "dense_all" when the total projected dimension fits max_dense_dim,
    # else "dense" (per layer); chosen by benchmarks/fidelity.py. Or "ekfac", "dense",
    # "dense_all", "identity" (gradient dot product, no curvature).
    kind: str = "auto"
    # A factor of the mean eigenvalue, or absolute (see damping_mode). 1.0: the directions
    # below the mean curvature, where the view noise of w lives, are not amplified more than
    # 2x against the top ones (benchmarks/results/view_reliability*.md: same-example cos(w)
    # 0.49 -> 0.63 on the demo model, 0.47 -> 0.63 on ResNet-18, against 0.1).
    damping: float = 1.0
    # "spanned": factor x trace / min(fit examples, dim), the mean over the directions the
    # fit can span; "relative": factor x trace / dim; "absolute": the factor itself.
    damping_mode: str = "spanned"
    # Largest block a dense curvature may eigendecompose (memory dim^2, time dim^3).
    max_dense_dim: int = 16384


@dataclass
class LayerConfig:
    """Which layers are tracked, by fnmatch patterns on module names."""

    include: list[str] = field(default_factory=lambda: ["*"])  # patterns of layers to track
    exclude: list[str] = field(default_factory=list)  # patterns dropped from those included


@dataclass
class InfluenceConfig:
    """Everything that defines the index vector `w(x)` of an example."""

    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)
    layers: LayerConfig = field(default_factory=LayerConfig)
    # Examples per forward pass; 0: as many as make about `views_per_batch` views (examples
    # x V), which keeps a pass's size, and its memory and system time, steady as V changes.
    batch_size: int = 0
    views_per_batch: int = 256  # views per forward pass when batch_size is 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    # "bf16": the model's forward/backward under bf16 autocast, and the Linear / Conv2d
    # projections in bf16 (float32 accumulation); per-example gradients, statistics and
    # whitening stay in float32/float64. "none": float32 throughout. bf16 needs a trained
    # encoder: at near-zero consistency loss (views that map to the same z) its rounding
    # swamps the difference of the two views' representations.
    autocast: str = "none"


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data view of a config dataclass (tuples become lists), for YAML and JSON."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class SettingError(UserError, ValueError):
    """A setting that does not exist, a value of the wrong type, or a malformed override."""


@dataclass(frozen=True)
class Override:
    """A `--set key=value` leaf: the text as typed and its YAML value. `from_dict` takes the
    text where the setting is a string (`keys=001` stays "001", `autocast=off` stays "off")
    and the YAML value everywhere else."""

    text: str
    value: Any


# Settings that were replaced, with what to write instead.
RENAMED = {
    ("LossConfig", "num_pairs"): (
        "; num_pairs (K pairs) became num_views (V views, all pairs by default); "
        "K pairs are num_views=2K with estimator=pairs"
    ),
}


# Settings that no longer do anything: accepted (old manifests, old YAML) and ignored, with a note.
IGNORED = {
    ("SearchConfig", "max_shard_bytes"): (
        "search shards are sized by vector count now (index.search.shard_rows)"
    ),
}


def from_dict(cls: type, data: dict[str, Any], base: Any = None, where: str = "") -> Any:
    """Build dataclass `cls` from nested plain data; unknown keys are an error.

    Settings not given keep their defaults, and a nested section given in part is merged onto
    that section's default *as the parent defines it* (`DemoConfig.influence` is a small CNN,
    so `influence.loss.num_views=8` must not bring back `InfluenceConfig`'s ResNet-18).
    Values are checked against the declared types and converted where that is unambiguous
    (see `_coerce`); `where` is the dotted path of `cls` in the whole config, for messages.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    data = drop_ignored(cls, data)
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise SettingError(unknown_setting(cls, unknown, names, where))
    base = base if isinstance(base, cls) else _default(cls)
    kwargs = {
        name: _coerce(hints[name], value, getattr(base, name, None), where + name)
        for name, value in data.items()
    }
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def unknown_setting(cls: type, unknown: list[str], names: list[str], where: str) -> str:
    """`unknown setting 'tpo' (did you mean 'top'?); QueryConfig takes: index, keys, ...`."""
    close = difflib.get_close_matches(unknown[0], names, n=1)
    guess = f" (did you mean {where + close[0]!r}?)" if close else ""
    guess = RENAMED.get((cls.__name__, unknown[0]), guess)
    shown = ", ".join(repr(where + name) for name in unknown[:5])
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    section = where.rstrip(".") or cls.__name__
    return f"unknown setting {shown}{more}{guess}; {section} takes: {', '.join(names)}"


def drop_ignored(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """`data` without the IGNORED settings of `cls`, warning once per call for each."""
    for key in [k for k in data if (cls.__name__, k) in IGNORED]:
        warnings.warn(
            f"{cls.__name__}.{key} is deprecated and ignored: {IGNORED[(cls.__name__, key)]}",
            FutureWarning,
            stacklevel=3,
        )
    return {k: v for k, v in data.items() if (cls.__name__, k) not in IGNORED}


def _default(cls: type) -> Any:
    try:
        return cls()
    except TypeError:  # a dataclass with required fields: no defaults to merge onto
        return None


def _coerce(hint: Any, value: Any, current: Any = None, name: str = "") -> Any:
    """`value` as the declared type `hint` of setting `name`, or a SettingError.

    Lists (and tuples) also take one value (`keys=a` -> ["a"]) and a comma list
    (`keys=a,b` -> ["a", "b"]; commas inside {...} brace patterns do not split), never a
    string's characters. Numbers take integral floats and numeric text (`1e5`); strings take
    numbers. Anything else of the wrong type is refused, naming the setting.
    """
    if isinstance(value, Override):
        value = value.text.strip() if _takes_text(hint, value.value) else value.value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, dict):
            return from_dict(hint, value, current, name + ".")
        raise SettingError(f"{name} is a section: set its fields, e.g. {name}.<field>=...")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(args, value, current, name)
    value = _plain_value(value)  # below: plain data (a dict setting's leaves, a list's items)
    if origin in (list, tuple):
        return _coerce_sequence(origin, args, value, name)
    if hint is dict or origin is dict:
        return _coerce_mapping(args, value, name)
    if hint in (bool, int, float, str):
        return _coerce_scalar(hint, value, name)
    return value


def _takes_text(hint: Any, parsed: Any) -> bool:
    """Whether an override's own text, not its YAML scalar, is meant: a string setting (or
    list of strings) given a YAML number or boolean."""
    if parsed is None or isinstance(parsed, str | list | dict):
        return False
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_takes_text(arg, parsed) for arg in args if arg is not type(None))
    return hint is str or (typing.get_origin(hint) in (list, tuple) and str in args)


def _plain_value(value: Any) -> Any:
    """Nested data with any Override leaves replaced by their YAML values."""
    if isinstance(value, Override):
        return _plain_value(value.value)
    if isinstance(value, dict):
        return {k: _plain_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain_value(v) for v in value)
    return value


def _coerce_union(args: tuple, value: Any, current: Any, name: str) -> Any:
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in (a for a in args if a is not type(None)):
        try:
            return _coerce(arg, value, current, name)
        except SettingError as error:
            errors.append(error)
    raise errors[0]


def _coerce_sequence(origin: type, args: tuple, value: Any, name: str) -> list | tuple:
    if isinstance(value, str):
        items: list = split_list(value)
    elif isinstance(value, list | tuple):
        items = list(value)
    elif value is None and origin is list:  # `keys=` (nothing): an empty list
        items = []
    elif value is None or isinstance(value, dict):
        raise SettingError(f"{name} takes a list, e.g. {name}=a,b; got {value!r}")
    else:
        items = [value]  # one number for a list of numbers
    element = args[0] if args else Any
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(items) != len(args):
            raise SettingError(f"{name} takes {len(args)} values, got {len(items)}: {value!r}")
        return tuple(_coerce(a, v, None, name) for a, v in zip(args, items, strict=True))
    coerced = [_coerce(element, v, None, name) for v in items]
    return tuple(coerced) if origin is tuple else coerced


def split_list(text: str) -> list[str]:
    """`a, b,c` -> ["a", "b", "c"]: commas split except inside {...} (shard brace patterns
    like `s-{a,b}.tar`); blanks around items and empty items are dropped."""
    items, depth, start = [], 0, 0
    for at, char in enumerate(text):
        depth += (char == "{") - (char == "}" and depth > 0)
        if char == "," and depth == 0:
            items.append(text[start:at])
            start = at + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _coerce_mapping(args: tuple, value: Any, name: str) -> dict:
    if not isinstance(value, dict):
        raise SettingError(f"{name} takes a mapping, e.g. {name}.<key>=value; got {value!r}")
    if len(args) == 2:
        return {k: _coerce(args[1], v, None, f"{name}.{k}") for k, v in value.items()}
    return value


def _coerce_scalar(hint: type, value: Any, name: str) -> Any:
    """bool, int, float or str, from a value of that type or an unambiguous other one."""
    if hint is bool:
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, numbers.Number) and not isinstance(value, bool):
            return str(value)
    elif not isinstance(value, bool):
        number = _number(value)
        if number is not None and hint is float:
            return float(number)
        if number is not None and float(number).is_integer():
            return int(number)
    kind = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}[hint]
    note = " (YAML reads yes/no/on/off as booleans: quote it)" if isinstance(value, bool) else ""
    raise SettingError(f"{name} takes {kind}, got {value!r}{note}")


def _number(value: Any) -> float | int | None:
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.replace("_", ""))
        except ValueError:
            return None
    return None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to nested plain data; each leaf is an `Override` (the
    text and its YAML value), resolved against the setting's type by `from_dict`."""
    for item in overrides:
        path, equals, raw = item.partition("=")
        if not equals or not path.strip():
            raise SettingError(f"--set {item!r} is not of the form key=value (e.g. top=20)")
        node = data
        *parents, leaf = path.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SettingError(f"--set {item!r}: {part!r} is not a section")
        node[leaf] = Override(raw, parse_value(item, raw))
    return data


def parse_value(item: str, raw: str) -> Any:
    """The YAML value of an override; text YAML cannot read (`*.bn`, an alias to YAML;
    `{a,b}.tar`) is taken as the text itself, except a broken list or mapping (`[a, b`)."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as error:
        text = raw.strip()
        if not (text.startswith("[") or (text.startswith("{") and text.endswith("}"))):
            return raw
        problem = getattr(error, "problem", None) or type(error).__name__
        raise SettingError(
            f"--set {item!r}: the value is not valid YAML ({problem}); quote it, e.g. "
            f"--set \"{item.partition('=')[0]}='{raw}'\""
        ) from error


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None):
    """Defaults of `cls`, then the YAML file (if any), then `key.path=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_config_file(path)
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def read_config_file(path: str | Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError as error:
        raise SettingError(f"config file {path} does not exist") from error
    except yaml.YAMLError as error:
        message = f"config file {path} is not valid YAML: {error}".replace("\n", " ")
        raise SettingError(message) from error
    if not isinstance(loaded, dict):
        raise SettingError(f"config file {path} must hold a mapping at the top level")
    return loaded


@dataclass
class InputConfig:
    """Where the examples come from and how they are decoded for batching."""

    # Shard specs: local paths, globs, brace patterns, s3://bucket/prefix/ listings.
    shards: list[str] = field(default_factory=list)
    side: int = 0  # decode resolution (shorter side, centre crop); 0: augment.size
    max_pixels: int = 64_000_000  # images larger than this are skipped, not decoded


@dataclass
class FitConfig:
    """Which sample of the corpus the curvature is fitted on."""

    # A seeded sample of this many shards (all of a smaller corpus); 0: every shard.
    max_shards: int = 64
    max_examples_per_shard: int = 0  # examples read from each sampled shard; 0: all
    seed: int = 0  # seed of the shard sample
    # Examples of the fit sample embedded a second time, with V independent views, to record
    # how reproducible w is (manifest "reliability"); 0: skip the check.
    reliability_sample: int = 300


@dataclass
class RuntimeConfig:
    """Ray: where to run and how many workers."""

    address: str | None = None  # None: $RAY_ADDRESS if set, else an embedded local Ray
    num_workers: int = 0  # 0: one per GPU where there are GPUs, else one CPU worker
    cpus_per_worker: float = 1.0  # CPUs Ray reserves for each worker
    gpus_per_worker: float = -1.0  # -1: 1 where the cluster has GPUs, else 0
    max_retries: int = 2  # attempts per shard after the first, before it is marked failed
    queue_depth: int = 2  # shards handed to a worker at once (one runs, the rest wait ready)
    decode_threads: int = 2  # image-decoding threads per worker
    temp_dir: str | None = None  # embedded Ray's session folder (default: a per-user /tmp one)


@dataclass
class SearchConfig:
    """The FAISS search index `build` writes beside the parts (SPEC section 4)."""

    kind: str = "auto"  # auto (flat up to flat_max_rows, else ivfpq), flat, ivfpq, or none
    metric: str = "cosine"  # cosine (normalised influence) or inner_product (influence)
    flat_max_rows: int = 100_000  # largest index searched exactly (kind auto)
    # Vectors per search shard (whole parts each): a shard is built, and searched, as one unit.
    shard_rows: int = 2_000_000
    train_rows: int = 200_000  # IVF-PQ is trained on a sample of at most this many vectors
    nlist: int = 0  # IVF lists; 0: about 4 sqrt(N)
    m: int = 0  # PQ sub-quantisers; 0: the largest divisor of the (reduced) D <= min(128, D/2)
    reduce_dim: int = 256  # IVF-PQ works on the top principal directions (0: all of D)
    seed: int = 0  # seed of the IVF-PQ training sample
    gpu: bool = True  # search's coarse quantiser (and flat shards) on a GPU where FAISS has one


@dataclass
class IndexConfig:
    """What `build` stores per example, and the search index over it."""

    vector_dtype: str = "float32"  # "float32" or "float16" for the stored w
    store_representation: bool = True  # also store z(x) (float16) for the embedding baseline
    # Metadata fields stored as columns `meta.<field>` for a fast `groups field=...`: None
    # (auto) every top-level scalar field, up to 16 per shard; a list exactly these; [] none.
    group_fields: list[str] | None = None
    search: SearchConfig = field(default_factory=SearchConfig)


@dataclass
class PipelineConfig:
    """A whole job: input shards -> factors and an index under `output`."""

    output: str = "runs/index"  # a local folder or s3://bucket/prefix
    input: InputConfig = field(default_factory=InputConfig)
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    overwrite: bool = False  # replace an index built with other settings
    force: bool = False  # take over the output's lease even from a live job (CLI --force)
    progress: bool = True  # progress on stderr: a tqdm bar on terminals, else a line every 2 s
