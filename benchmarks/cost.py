"""Cost of embedding: examples/s of w(x) relative to a plain forward+backward.

Every setting runs the engine's defaults (V = 16 views, all pairs, a batch of
`views_per_batch` = 256 views, i.e. 16 examples; 16x16 projections; curvature `auto`), and
the same pre-generated views go through

* baseline: a standard training-style step without the optimiser: parameters require grad,
  the engine's consistency loss of `encoder(views)`, `.sum().backward()` computes every weight
  gradient (eval mode, as the engine, so BatchNorm does the same arithmetic; under the same
  autocast as the engine);
* embed: what `InfluenceSSL.embed_batch` does after `make_views`: the hooked backward with
  frozen parameters, per-example projected gradients, whitening with the default curvature
  (`auto`: dense_all here), with EK-FAC, and with the identity (no whitening), `.float()`.

View generation is timed on its own and excluded from both. ratio = examples/s of embed /
examples/s of baseline = time(baseline) / time(embed) on the same views (target >= 1.0: the
embedding pass is no slower than a plain forward+backward). Each variant is warmed up, then
the variants are timed round-robin (so load from other processes hits them alike) and the
median is kept.

The embed side's stages: "frozen" runs the same graph as the embedding (parameters frozen,
the graph starting at the first tracked layer's output) without the tracker's hooks.

Run from the repository root: `python benchmarks/cost.py --threads 1 --clock cpu` (about
18 minutes at one thread, ResNet-18 most of it; `--device cuda --autocast bf16` on a GPU).
`--clock cpu` times the process's CPU time, which other jobs on shared cores do not inflate;
`--reps N` overrides the rounds; `--ratio-only` times the baseline and the default embed
alone and prints the ratio (no report). Writes `benchmarks/results/cost.md`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.config import (
    AugmentConfig,
    CurvatureConfig,
    InfluenceConfig,
    LossConfig,
    ModelConfig,
    ProjectionConfig,
)
from pipeline.demo import load_digits
from pipeline.influence.curvature import ProjectedBatch
from pipeline.influence.engine import InfluenceSSL, default_keys, frozen_parameters
from pipeline.influence.layers import ExampleRows
from pipeline.influence.loss import consistency_loss
from pipeline.influence.tracker import start_graph
from pipeline.models import build_encoder

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Setting:
    name: str
    model: ModelConfig
    size: int  # view side
    grayscale: bool  # digits: no colour augmentations
    reps: int


SETTINGS = {
    "small_cnn": Setting(
        "SmallCNN(width=16) + projector [64, 32], 1x28x28 digits",
        ModelConfig(
            arch="small_cnn",
            in_channels=1,
            projector_dims=[64, 32],
            kwargs={"width": 16, "out_dim": 64},
        ),
        size=28,
        grayscale=True,
        reps=41,
    ),
    "resnet18_32": Setting(
        "ResNet-18 (small_input), 3x32x32 photo crops",
        ModelConfig(arch="resnet18", in_channels=3, kwargs={"small_input": True}),
        size=32,
        grayscale=False,
        reps=5,
    ),
    "resnet18_64": Setting(
        "ResNet-18 (small_input), 3x64x64 photo crops",
        ModelConfig(arch="resnet18", in_channels=3, kwargs={"small_input": True}),
        size=64,
        grayscale=False,
        reps=3,
    ),
}


def augment(setting: Setting) -> AugmentConfig:
    if setting.grayscale:
        return AugmentConfig(
            size=setting.size,
            crop_scale=(0.6, 1.0),
            flip_p=0.0,
            saturation=0.0,
            hue=0.0,
            grayscale_p=0.0,
        )
    return AugmentConfig(size=setting.size)


def engine_config(setting: Setting, kind: str, args: argparse.Namespace) -> InfluenceConfig:
    return InfluenceConfig(
        model=setting.model,
        augment=augment(setting),
        loss=LossConfig(),  # the default: V = 16 views, all pairs
        projection=ProjectionConfig(),  # the default: 16 x 16 per layer
        curvature=CurvatureConfig(kind=kind),
        device=args.device,
        autocast=args.autocast,
    )


def photo_crops(side: int, count: int) -> torch.Tensor:
    """[count, 3, side, side] tiles of scikit-image's bundled photographs, each photo first
    shrunk (antialiased) so that its short side holds four tiles."""
    from skimage import data

    tiles = []
    for photo in (data.astronaut(), data.chelsea(), data.coffee(), data.rocket()):
        x = torch.from_numpy(photo).permute(2, 0, 1).float()[None] / 255.0
        scale = 4 * side / min(x.shape[-2:])
        x = F.interpolate(x, scale_factor=scale, mode="bilinear", antialias=True)[0]
        rows, cols = x.shape[1] // side, x.shape[2] // side
        for r in range(rows):
            for c in range(cols):
                tiles.append(x[:, r * side : (r + 1) * side, c * side : (c + 1) * side])
    tiles = torch.stack(tiles).clamp(0, 1)
    return tiles[torch.arange(count) % len(tiles)]


def images_for(setting: Setting, count: int) -> torch.Tensor:
    if setting.grayscale:
        return load_digits(count, 0)[0]
    return photo_crops(setting.size, count)


# -- timing ------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK_NOTES = {
    "wall": ", wall time",
    "cpu": ", the process's CPU time (other jobs sharing the cores do not count)",
}


def round_robin(
    fns: dict[str, Callable[[], object]], reps: int, device: torch.device, clock: str = "wall"
) -> dict[str, float]:
    """Median seconds of each fn: one warm-up each, then `reps` rounds over all of them.

    clock "cpu": this process's CPU time, which a CPU run at --threads 1 spends whether or not
    other processes share the cores (wall time counts their turns too)."""
    now = CLOCKS[clock]
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            synchronize(device)
            tic = now()
            fn()
            synchronize(device)
            times[name].append(now() - tic)
    return {name: statistics.median(values) for name, values in times.items()}


def measure(
    setting: Setting, args: argparse.Namespace, profile: bool
) -> tuple[dict[str, float], str | None]:
    torch.manual_seed(0)
    encoder = build_encoder(setting.model).eval()
    default = InfluenceSSL(encoder, engine_config(setting, "auto", args))
    encoder, batch = default.encoder, default.examples_per_batch()
    images = images_for(setting, 4 * batch)
    keys = default_keys(len(images))
    default.fit(images, keys)
    ekfac = InfluenceSSL(encoder, engine_config(setting, "ekfac", args)).fit(images, keys)
    identity = InfluenceSSL(encoder, engine_config(setting, "identity", args))
    batch_images, batch_keys = images[:batch], keys[:batch]
    views = default.make_views(batch_images, batch_keys)
    b, v = views.shape[:2]
    loss_config = default.config.loss

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        with default.autocast():
            z = encoder(x)
        z = z.float().reshape(b, v, -1)
        return consistency_loss(z, loss_config.kind, loss_config.estimator).sum()

    def baseline_forward() -> None:
        loss_of(views.flatten(0, 1))

    def baseline() -> None:
        loss_of(views.flatten(0, 1)).backward()
        encoder.zero_grad(set_to_none=True)

    first = default.tracker.layers[0].module

    def frozen(hooks: bool, backward: bool) -> Callable[[], None]:
        """The embedding's forward (and backward): frozen parameters, the graph starting at
        the first tracked layer's output; with the tracker's hooks, or none at all."""

        def fn() -> None:
            with frozen_parameters(encoder), torch.enable_grad():
                x = views.flatten(0, 1).detach()
                if hooks:
                    with default.tracker.capture():
                        loss = loss_of(x)
                        if backward:
                            loss.backward()
                    return
                handle = first.register_forward_hook(lambda m, i, out: start_graph(out))
                try:
                    loss = loss_of(x)
                    if backward:
                        loss.backward()
                finally:
                    handle.remove()

        return fn

    def embed(engine: InfluenceSSL) -> Callable[[], torch.Tensor]:
        return lambda: engine.curvature.whiten(engine.project_views(views)[0].gradients()).float()

    rows = default.project_views(views)[0].rows

    def fresh_gradients() -> dict[str, torch.Tensor]:
        # New ExampleRows each call: the captured ones keep the gradient once computed.
        parts = {n: ExampleRows(r.parts, r.num_examples) for n, r in rows.items()}
        return ProjectedBatch(rows=parts).gradients()

    gradients = fresh_gradients()
    encoder.requires_grad_(True)
    fns = {
        "views": lambda: default.make_views(batch_images, batch_keys),
        "baseline": baseline,
        "embed": embed(default),
    }
    if not args.ratio_only:
        fns |= {
            "baseline_forward": baseline_forward,
            "frozen_forward": frozen(hooks=False, backward=False),
            "frozen": frozen(hooks=False, backward=True),
            "hooked_forward": frozen(hooks=True, backward=False),
            "project": lambda: default.project_views(views),
            "gradients": fresh_gradients,
            "whiten": lambda: default.curvature.whiten(gradients),
            "embed_ekfac": embed(ekfac),
            "embed_identity": embed(identity),
        }
    seconds = round_robin(fns, args.reps or setting.reps, default.device, args.clock)
    seconds["dimension"] = default.dimension
    seconds["layers"] = len(default.tracker.layers)
    seconds["parameters"] = sum(p.numel() for p in encoder.parameters())
    seconds["batch"] = b
    seconds["views_per_example"] = v
    seconds["curvature"] = default.curvature.kind
    table = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU]
        if default.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with torch_profile(activities=activities) as prof:
            for _ in range(2):
                embed(default)()
            synchronize(default.device)
        sort = "self_cuda_time_total" if default.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=15)
    return seconds, table


# -- report ------------------------------------------------------------------------------------


def summary_row(name: str, s: dict) -> list[str]:
    rate = s["batch"] / s["baseline"]
    return [
        name,
        f"{s['parameters'] / 1e6:.2f}M" if s["parameters"] > 1e5 else f"{s['parameters']:.0f}",
        f"{s['views_per_example']:.0f} x {s['batch']:.0f}",
        f"{s['dimension']:.0f}",
        f"{rate:.1f}",
        f"{s['batch'] / s['embed']:.1f}",
        f"**{s['baseline'] / s['embed']:.2f}** ({s['curvature']})",
        f"{s['baseline'] / s['embed_ekfac']:.2f}",
        f"{s['baseline'] / s['embed_identity']:.2f}",
        f"{s['batch'] / s['views']:.0f}",
    ]


def breakdown_rows(name: str, s: dict) -> list[list[str]]:
    """Milliseconds per batch of each stage, and its share of the default embed."""
    total = s["embed"]
    frozen_backward = s["frozen"] - s["frozen_forward"]
    hooks_forward = s["hooked_forward"] - s["frozen_forward"]
    parts = [
        ("baseline forward (+loss), params require grad", s["baseline_forward"], False),
        ("baseline backward (input + weight grads)", s["baseline"] - s["baseline_forward"], False),
        ("embed: forward, frozen params, no hooks", s["frozen_forward"], True),
        ("embed: input projections in forward hooks", hooks_forward, True),
        ("embed: backward, no weight grads, no hooks", frozen_backward, True),
        (
            "embed: output-grad projections + row capture",
            s["project"] - s["hooked_forward"] - frozen_backward,
            True,
        ),
        ("embed: per-example gradients (batched matmul)", s["gradients"], True),
        (f"embed: {s['curvature']} whitening", s["whiten"], True),
        (
            "embed: unaccounted (sum of parts vs measured)",
            total - s["project"] - s["gradients"] - s["whiten"],
            True,
        ),
        ("embed total (measured)", total, True),
        ("view generation (excluded from both)", s["views"], False),
    ]
    return [
        [name, label, f"{1e3 * t:.1f}", f"{100 * t / total:.0f}%" if share else ""]
        for label, t, share in parts
    ]


def table(header: list[str], rows: list[list[str]], align: str) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def report(results: dict, profile: str | None, args: argparse.Namespace) -> str:
    command = "python benchmarks/cost.py"
    if vars(args) != vars(parse_args([])):
        command += (
            f" --settings {' '.join(args.settings)} --threads {args.threads}"
            f" --profile {args.profile} --device {args.device} --autocast {args.autocast}"
        )
        command += f" --reps {args.reps}" if args.reps else ""
        command += f" --clock {args.clock}" if args.clock != "wall" else ""
    summary = table(
        [
            "setting",
            "params",
            "views x examples",
            "D",
            "baseline ex/s",
            "embed ex/s",
            "ratio (curvature)",
            "ratio ekfac",
            "ratio identity",
            "views ex/s",
        ],
        [summary_row(SETTINGS[k].name, s) for k, s in results.items()],
        ["---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:"],
    )
    breakdown = table(
        ["setting", "stage", "ms / batch", "share of embed"],
        [row for k, s in results.items() for row in breakdown_rows(k, s)],
        ["---", "---", "---:", "---:"],
    )
    precision = "float32" if args.autocast == "none" else f"{args.autocast} autocast"
    text = (
        f"# Cost of embedding vs a plain forward+backward\n\nReproduce (repository root, venv "
        f"active): `{command}`\n\n{torch.__version__}, {args.device}, {args.threads} CPU "
        f"threads, {precision}. Default engine: V = 16 views, all-pairs cosine consistency "
        "loss, 256 views per batch, 16 x 16 projection on every Linear/Conv2d layer, curvature "
        "`auto`. Same views and batch for both sides; view generation is timed separately and "
        "excluded from both. Median of round-robin repetitions after a warm-up"
        f"{CLOCK_NOTES[args.clock]}. ratio = embed "
        "ex/s / baseline ex/s = time(plain forward+backward) / time(embed) (target >= 1.0)."
        f"\n\n{summary}\n## Where the time goes\n\n"
        "Stages are differences of separately timed runs (so small ones are noisy); shares "
        f"are of the default embed.\n\n{breakdown}"
    )
    if profile:
        text += (
            f"\n## torch.profiler, 2 default embed batches of {args.profile}, top ops by self "
            f"CPU time\n\n```\n{profile}```\n"
        )
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", default="resnet18_32", help="setting to profile")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--autocast", default="none", choices=["none", "bf16"])
    parser.add_argument("--reps", type=int, default=0, help="timed rounds (0: per setting)")
    parser.add_argument(
        "--clock", default="wall", choices=list(CLOCKS), help="cpu: process CPU time (CPU runs)"
    )
    parser.add_argument(
        "--ratio-only", action="store_true", help="time only the baseline and the default embed"
    )
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    results, profile = {}, None
    for key in args.settings:
        tic = time.perf_counter()
        results[key], table_text = measure(SETTINGS[key], args, profile=key == args.profile)
        profile = table_text or profile
        s = results[key]
        others = "".join(
            f", {name} {1e3 * s[f'embed_{name}']:.0f} ms"
            for name in ("ekfac", "identity")
            if f"embed_{name}" in s
        )
        print(
            f"{key}: baseline {1e3 * s['baseline']:.0f} ms, embed ({s['curvature']}) "
            f"{1e3 * s['embed']:.0f} ms{others}, ratio {s['baseline'] / s['embed']:.2f} "
            f"({time.perf_counter() - tic:.0f}s)",
            flush=True,
        )
    if args.ratio_only:  # a quick check: the report needs every stage
        return
    text = report(results, profile, args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cost.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
