"""GPU check: CUDA results against the CPU, then the embedding pass's speed on ResNet-50.

For a CUDA machine (written for one H200). Two parts, under one global time budget
(`--budget`, default 270 s, so the whole run, imports and CUDA start-up included, stays
under 5 minutes):

1. Agreement. Small encoders are trained briefly with SimCLR (`pipeline.train`) on synthetic
   smooth colour images; factors are fitted on the CPU and loaded on the GPU through the
   safetensors bytes the pipeline ships; the SAME views (made once on the CPU) go through
   both engines. Per example: relative error ||gpu - cpu|| / ||cpu|| and cosine of the
   projected gradients G~ and of w(x), the loss, and the relative error of the influence
   matrix <w_i, w_j> over the checked examples. GPU modes: fp32 with TF32 off (strict),
   fp32 under torch's defaults (cuDNN convolutions, the tracker's projection convolutions
   included, in TF32), and bf16 autocast (the CPU reference stays fp32). Also the largest
   pixel difference between views made on the GPU and on the CPU.
2. Throughput. `InfluenceSSL.embed_batch_with_loss` (views made on the GPU + hooked forward
   and backward + per-example projected gradients + whitening) for ResNet-50 at 224 px, 3
   channels, the default V = 16 views and 16 x 16 projection (D = 53 x 256 = 13,568, the
   `auto` curvature = dense_all), in fp32 and under bf16 autocast. The projection path is
   the engine's: Conv2d inputs projected by a convolution with P_in kernels, output
   gradients by P_out as a 1x1 convolution on the NCHW maps (no transposed copy), both in
   bf16 under autocast (float32 accumulation inside). The batch is doubled until CUDA runs
   out of memory, the cap (`--max-batch`) or the budget; each size is warmed up,
   synchronised and timed. The dense factors are synthetic (U = I, D = 1): whitening is one
   [B, D] x [D, D] product whatever U holds, and fitting a 13.6k-dim Fisher is not what is
   timed. Printed: examples/s, and the fraction of the FLOP floor reached, achieved FLOP/s /
   peak, where the work is 3 x forward FLOPs x V views per example (a training step's
   forward + backward; the engine computes no weight gradients, so 2 x forward is the work
   it really does, also shown). Then, at the largest batch that ran (halved while a plain
   step runs out of memory), the embedding on views made once against a plain forward +
   backward on the same views (parameters requiring grad, the same loss and autocast):
   ratio = time(plain) / time(embedding), as `benchmarks/cost.py` measures it on the CPU.
   Forward FLOPs are counted analytically (2 x multiply-adds of every Conv2d and Linear, from
   the layers' shapes, on the meta device). Peaks: H200 SXM datasheet dense figures (bf16
   989.4 TFLOP/s, TF32 494.7 TFLOP/s; the sparse ones are twice these); override them with
   `--peak-bf16` / `--peak-tf32` for other chips. fp32 timing runs with torch's defaults
   (recorded in the output): cuDNN convolutions in TF32, matmuls in full fp32.

Needs: this repository (run from its root; nothing needs installing), Python >= 3.11, torch
with CUDA, numpy. PyYAML and safetensors (imported by `pipeline.config` and the engine) are
used when installed; where they are missing, minimal stand-ins are put in their place (YAML
is never parsed here; the stand-in safetensors writes and reads the same format). No data
files, no network.

    python benchmarks/gpu_check.py                      # -> benchmarks/results/gpu_h200.md
    python benchmarks/gpu_check.py --smoke --out x.md   # CPU as the "device", tiny models

`--smoke` (or `--quick`) runs every code path on the CPU in seconds (tests/test_gpu_script.py);
GPU_CHECK_STANDINS=1 forces the stand-ins even where the real packages are installed.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

STARTED = time.monotonic()
REPO = Path(__file__).resolve().parents[1]

# -- stand-ins for optional packages (before anything imports `pipeline`) ----------------------

_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_NAMES = {name: dtype for dtype, name in _ST_DTYPES.items()}


def safetensors_save(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    """The safetensors format: u64 header length, JSON header (8-byte aligned), raw data."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def safetensors_load(data: bytes) -> dict[str, torch.Tensor]:
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    body = memoryview(data)[8 + length :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, (start, end) = _ST_NAMES[info["dtype"]], info["data_offsets"]
        if end == start:
            out[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        raw = torch.frombuffer(bytearray(body[start:end]), dtype=torch.uint8)
        out[name] = raw.view(dtype).reshape(info["shape"]).clone()
    return out


def install_standins(force: bool = False) -> list[str]:
    """Put minimal `yaml` and `safetensors` modules in place where the real ones are missing."""
    installed = []
    if force or not _importable("yaml"):
        yaml = types.ModuleType("yaml")

        def safe_load(_text):
            raise RuntimeError("PyYAML is not installed: gpu_check.py builds configs in code")

        yaml.safe_load = safe_load
        sys.modules["yaml"] = yaml
        installed.append("yaml")
    if force or not _importable("safetensors"):
        package = types.ModuleType("safetensors")
        module = types.ModuleType("safetensors.torch")
        module.save, module.load = safetensors_save, safetensors_load
        package.torch = module
        sys.modules["safetensors"], sys.modules["safetensors.torch"] = package, module
        installed.append("safetensors")
    return installed


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


STANDINS = install_standins(force=os.environ.get("GPU_CHECK_STANDINS") == "1")
sys.path.insert(0, str(REPO))

from pipeline.config import AugmentConfig, LossConfig, ModelConfig  # noqa: E402
from pipeline.influence.curvature.base import flatten  # noqa: E402
from pipeline.influence.engine import InfluenceSSL, default_keys  # noqa: E402
from pipeline.influence.loss import consistency_loss  # noqa: E402
from pipeline.models import build_encoder  # noqa: E402
from pipeline.testing import engine_config  # noqa: E402
from pipeline.train import TrainConfig, train_ssl  # noqa: E402

PEAK_BF16 = 989.4e12  # H200 SXM, dense BF16 tensor core (1,979 TFLOP/s with sparsity)
PEAK_TF32 = 494.7e12  # H200 SXM, dense TF32 tensor core (989 TFLOP/s with sparsity)
RESULTS = REPO / "benchmarks" / "results" / "gpu_h200.md"
BATCH = 64  # examples per engine batch


# -- settings --------------------------------------------------------------------------------


@dataclass
class CheckCase:
    """One agreement check: a briefly trained encoder, its views, its curvature."""

    name: str
    model: ModelConfig
    size: int  # view side
    source: int  # side of the synthetic source images
    pairs: int
    curvature: str
    train_steps: int
    num_fit: int
    num_check: int
    modes: tuple[str, ...] = ("fp32", "fp32-tf32", "bf16")


@dataclass
class Settings:
    device: str
    checks: list[CheckCase]
    timing_model: ModelConfig
    timing_size: int
    timing_source: int
    pairs: int
    first_batch: int
    max_batch: int
    min_seconds: float  # timed per batch size (at least 3 calls)
    budget: float
    modes: tuple[str, ...] = ("bf16", "fp32")
    notes: list[str] = field(default_factory=list)


def gpu_settings(args: argparse.Namespace) -> Settings:
    small = ModelConfig(
        arch="small_cnn", projector_dims=[64, 32], kwargs={"width": 16, "out_dim": 64}
    )
    resnet = ModelConfig(arch="resnet18", kwargs={"small_input": True})
    return Settings(
        device=args.device,
        checks=[
            CheckCase("SmallCNN + projector, 32 px", small, 32, 40, 2, "auto", 200, 512, 128),
            CheckCase("ResNet-18 (small input), 32 px", resnet, 32, 40, 1, "dense", 60, 256, 64),
        ],
        timing_model=ModelConfig(arch="resnet50", in_channels=3),
        timing_size=224,
        timing_source=256,
        pairs=LossConfig().num_views // 2,
        first_batch=16,
        max_batch=args.max_batch,
        min_seconds=1.5,
        budget=args.budget,
    )


def smoke_settings(args: argparse.Namespace) -> Settings:
    """Every code path on the CPU in seconds: tiny models, tiny images, CPU as the device."""
    tiny = ModelConfig(arch="small_cnn", projector_dims=[8, 4], kwargs={"width": 4, "out_dim": 8})
    resnet = ModelConfig(arch="resnet18", kwargs={"small_input": True})
    return Settings(
        device="cpu",
        checks=[
            CheckCase("SmallCNN (tiny) + projector, 12 px", tiny, 12, 16, 2, "auto", 3, 32, 8),
            CheckCase("ResNet-18 (small input), 8 px", resnet, 8, 10, 1, "dense", 1, 8, 4),
        ],
        timing_model=ModelConfig(
            arch="small_cnn", projector_dims=[8], kwargs={"width": 4, "out_dim": 8}
        ),
        timing_size=16,
        timing_source=20,
        pairs=LossConfig().num_views // 2,
        first_batch=2,
        max_batch=min(args.max_batch, 8),
        min_seconds=0.05,
        budget=min(args.budget, 100.0),
        notes=["SMOKE RUN: CPU as the device, tiny models; the figures mean nothing."],
    )


def case_settings(case: CheckCase) -> dict[str, Any]:
    """The engine settings of a check case (16 x 16 projections, on the CPU unless given)."""
    return {"model": case.model, "augment": case.size, "pairs": case.pairs, "batch_size": BATCH}


def remaining(settings: Settings) -> float:
    return settings.budget - (time.monotonic() - STARTED)


class tf32:
    """Set TF32 for cuDNN convolutions and CUDA matmuls inside the block (None: leave as is)."""

    def __init__(self, enabled: bool | None) -> None:
        self.enabled = enabled

    def __enter__(self) -> None:
        self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        if self.enabled is not None:
            torch.backends.cudnn.allow_tf32 = self.enabled
            torch.backends.cuda.matmul.allow_tf32 = self.enabled

    def __exit__(self, *exc: object) -> None:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


def synthetic_images(n: int, side: int, device: str | torch.device, seed: int) -> torch.Tensor:
    """[n, 3, side, side] in [0, 1]: smooth random colour fields plus a little fine noise.

    Drawn on the CPU (the same numbers on every device), upsampled where they are used.
    """
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 6, generator=generator)
    fine = 0.05 * torch.randn(n, 3, side, side, generator=generator)
    x = F.interpolate(coarse.to(device), size=(side, side), mode="bicubic", align_corners=False)
    return (x + fine.to(device)).clamp(0, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- 1. agreement ----------------------------------------------------------------------------


def per_example(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative error ||a - b|| / ||b|| and cosine of each row (b is the reference)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    rel = (a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-300)
    return rel, F.cosine_similarity(a, b, dim=1, eps=1e-300)


def trained_encoder(case: CheckCase, device: torch.device) -> torch.nn.Module:
    """The case's encoder after a brief SimCLR run on the device, returned on the CPU."""
    torch.manual_seed(0)
    encoder = build_encoder(case.model).to(device)
    images = synthetic_images(max(case.num_fit, 256), case.source, device, seed=1)
    train = TrainConfig(steps=case.train_steps, batch_size=min(128, len(images)))
    train_ssl(encoder, images, AugmentConfig(size=case.size), train)
    return encoder.cpu().eval()


def outputs(engine: InfluenceSSL, views: torch.Tensor) -> dict[str, torch.Tensor]:
    """G~, w and the loss of `views` on the engine's device, returned on the CPU."""
    batch, losses = engine.project_views(views.to(engine.device))
    gradients = batch.gradients()
    w = engine.curvature.whiten(gradients)
    sync(engine.device)
    g = flatten(gradients, engine.curvature.layers)
    return {"G": g.float().cpu(), "w": w.float().cpu(), "loss": losses.float().cpu()}


def check_case(case: CheckCase, settings: Settings) -> list[dict]:
    device = torch.device(settings.device)
    tic = time.monotonic()
    encoder = trained_encoder(case, device)
    images = synthetic_images(case.num_fit, case.source, "cpu", seed=2)
    keys = default_keys(len(images))
    cpu = InfluenceSSL(
        copy.deepcopy(encoder),
        engine_config(case.curvature, **case_settings(case)),
    )
    cpu.fit(images, keys)
    factors = cpu.factors_bytes()
    check_images, check_keys = images[: case.num_check], keys[: case.num_check]
    views = cpu.make_views(check_images, check_keys)
    reference = outputs(cpu, views)
    rows = []
    for mode in case.modes:
        autocast = "bf16" if mode == "bf16" else "none"
        config = engine_config(
            case.curvature, **case_settings(case), device=settings.device, autocast=autocast
        )
        with tf32(False if mode == "fp32" else None):
            engine = InfluenceSSL(copy.deepcopy(encoder), config).load_factors_bytes(factors)
            got = outputs(engine, views)
            device_views = engine.make_views(check_images, check_keys).cpu()
        rows.append(agreement_row(case, mode, engine, reference, got, views, device_views))
        print(f"check {case.name} {mode}: w min cos {rows[-1]['w_min_cos']:.6f}", flush=True)
    for row in rows:
        row["seconds"] = time.monotonic() - tic
    return rows


def agreement_row(case, mode, engine, reference, got, views, device_views) -> dict:
    g_rel, g_cos = per_example(got["G"], reference["G"])
    w_rel, w_cos = per_example(got["w"], reference["w"])
    loss_rel = (got["loss"] - reference["loss"]).abs() / reference["loss"].abs().clamp_min(1e-30)
    ref_scores = reference["w"].double() @ reference["w"].double().T
    scores = got["w"].double() @ got["w"].double().T
    return {
        "case": case.name,
        "mode": mode,
        "n": len(views),
        "D": engine.dimension,
        "curvature": engine.curvature.kind,
        "loss_mean": float(reference["loss"].mean()),
        "loss_rel": float(loss_rel.max()),
        "g_rel": float(g_rel.max()),
        "g_min_cos": float(g_cos.min()),
        "w_rel": float(w_rel.max()),
        "w_rel_median": float(w_rel.median()),
        "w_min_cos": float(w_cos.min()),
        "w_median_cos": float(w_cos.median()),
        "scores_rel": float((scores - ref_scores).norm() / ref_scores.norm()),
        "views_max_abs": float((device_views - views).abs().max()),
    }


# Verdict thresholds on w: strict fp32 must agree to float rounding; TF32 and bf16 round
# inputs to 10 and 7 mantissa bits, so they are held to what such rounding allows.
THRESHOLDS = {
    "fp32": ("w_min_cos", 0.9999, "w_rel", 1e-3),
    "fp32-tf32": ("w_min_cos", 0.99, "w_rel", 0.1),
    "bf16": ("w_median_cos", 0.99, "w_rel_median", 0.15),
}


def verdict(row: dict) -> str:
    cos_key, cos_min, rel_key, rel_max = THRESHOLDS[row["mode"]]
    return "ok" if row[cos_key] >= cos_min and row[rel_key] <= rel_max else "CHECK"


# -- 2. throughput ---------------------------------------------------------------------------


def forward_flops(model: torch.nn.Module, in_channels: int, size: int) -> int:
    """Forward FLOPs of one image (2 x multiply-adds of every Conv2d and Linear).

    Counted from the layers' shapes on the meta device: nothing is computed or allocated.
    """
    meta = copy.deepcopy(model).to("meta").eval()
    total = 0

    def hook(module, inputs, output) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            c_in, kh, kw = module.weight.shape[1:]
            total += 2 * output.numel() * c_in * kh * kw
        else:
            total += 2 * output.numel() * module.in_features

    handles = [
        m.register_forward_hook(hook)
        for m in meta.modules()
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    ]
    with torch.no_grad():
        meta(torch.empty(1, in_channels, size, size, device="meta"))
    for handle in handles:
        handle.remove()
    return total


def synthetic_factors(engine: InfluenceSSL) -> None:
    """Load U = I, D = 1 dense factors: whitening costs the same product whatever U holds."""
    curvature = engine.curvature
    if curvature.kind not in ("dense", "dense_all"):
        raise ValueError(f"synthetic factors are for dense curvatures, not {curvature.kind!r}")
    state = {}
    for index, block in enumerate(curvature.blocks):
        size = sum(layer.size for layer in block)
        kwargs = {"dtype": torch.float64, "device": engine.device}
        state[f"block{index}/U"] = torch.eye(size, **kwargs)
        state[f"block{index}/D"] = torch.ones(size, **kwargs)
        state[f"block{index}/lambda"] = torch.tensor(0.1, **kwargs)
    curvature.load_state_dict(state, ["fisher"])


def timed(fn: Callable[[], object], device: torch.device, min_seconds: float) -> float:
    """Median seconds of one synchronised call: 2 warm-ups, then >= 3 calls and min_seconds."""
    for _ in range(2):
        fn()
    sync(device)
    times: list[float] = []
    while len(times) < 3 or sum(times) < min_seconds:
        tic = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_batch(engine: InfluenceSSL, batch: int, settings: Settings) -> dict:
    """Seconds per batch of the whole embed call, of its view generation and of the rest."""
    device = engine.device
    images = synthetic_images(batch, settings.timing_source, device, seed=3)
    keys = default_keys(batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    embed = timed(lambda: engine.embed_batch_with_loss(images, keys), device, settings.min_seconds)
    make = timed(lambda: engine.make_views(images, keys), device, settings.min_seconds / 4)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"batch": batch, "embed": embed, "views": make, "peak_gib": peak}


def search_batches(engine: InfluenceSSL, settings: Settings, deadline: float) -> list[dict]:
    """Double the batch from `first_batch` until out of memory, the cap or the deadline."""
    results: list[dict] = []
    batch, last_seconds = settings.first_batch, 0.0
    while batch <= settings.max_batch:
        if time.monotonic() + 3 * last_seconds > deadline:
            results.append({"batch": batch, "skipped": "time budget"})
            break
        tic = time.monotonic()
        try:
            result = time_batch(engine, batch, settings)
        except RuntimeError as exc:
            if not is_oom(exc):
                raise
            result = {"batch": batch, "skipped": "out of memory"}
        free_memory(engine.device)
        results.append(result)
        if "skipped" in result:
            break
        print(f"  batch {batch}: {batch / result['embed']:.1f} ex/s", flush=True)
        last_seconds = time.monotonic() - tic
        batch *= 2
    return results


def plain_step(engine: InfluenceSSL, views: torch.Tensor) -> Callable[[], None]:
    """A training step's forward + backward on `views`, no optimiser: the parameters require
    grad, the engine's loss and autocast, eval mode (as the engine)."""
    encoder, loss = engine.encoder, engine.config.loss
    b, v = views.shape[:2]

    def step() -> None:
        with engine.autocast():
            z = encoder(views.flatten(0, 1))
        z = z.float().reshape(b, v, -1)
        consistency_loss(z, loss.kind, loss.estimator).sum().backward()
        encoder.zero_grad(set_to_none=True)

    return step


def embedding_of(engine: InfluenceSSL, views: torch.Tensor) -> Callable[[], torch.Tensor]:
    """w of `views` made beforehand: the hooked pass, G~ and whitening."""
    return lambda: engine.curvature.whiten(engine.project_views(views)[0].gradients())


def against_plain(engine: InfluenceSSL, batch: int, settings: Settings) -> dict:
    """The embedding (views made once) vs a plain forward + backward on the same views, at
    `batch` examples, halved while either runs out of memory."""
    device = engine.device
    while batch >= settings.first_batch:
        try:
            images = synthetic_images(batch, settings.timing_source, device, seed=3)
            views = engine.make_views(images, default_keys(batch))
            embed_s = timed(embedding_of(engine, views), device, settings.min_seconds)
            engine.encoder.requires_grad_(True)
            plain_s = timed(plain_step(engine, views), device, settings.min_seconds)
            return {"batch": batch, "embed": embed_s, "plain": plain_s, "ratio": plain_s / embed_s}
        except RuntimeError as exc:
            if not is_oom(exc):
                raise
        finally:
            engine.encoder.zero_grad(set_to_none=True)
            free_memory(device)
        batch //= 2
    return {"batch": batch, "skipped": "out of memory"}


def throughput(settings: Settings, peaks: dict[str, float]) -> dict:
    device = torch.device(settings.device)
    torch.manual_seed(0)
    encoder = build_encoder(settings.timing_model).eval()
    flops = forward_flops(encoder, settings.timing_model.in_channels, settings.timing_size)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # autotuned kernels, as a long job would get
    out = {"forward_flops": flops, "modes": {}}
    for i, mode in enumerate(settings.modes):
        # Split what is left evenly over the modes still to run.
        deadline = time.monotonic() + remaining(settings) / (len(settings.modes) - i)
        config = engine_config(
            model=settings.timing_model,
            augment=settings.timing_size,
            pairs=settings.pairs,
            batch_size=BATCH,
            device=settings.device,
            autocast="bf16" if mode == "bf16" else "none",
        )
        engine = InfluenceSSL(encoder, config)
        synthetic_factors(engine)
        print(f"timing {mode}: D = {engine.dimension} ({engine.curvature.kind})", flush=True)
        # Time kept for the comparison with a plain step: two timings of min_seconds each.
        results = search_batches(engine, settings, deadline - 8 * settings.min_seconds)
        work = 2 * settings.pairs * flops  # forward FLOPs of one example's views
        for r in results:
            if "skipped" not in r:
                rate = r["batch"] / r["embed"]
                r["ex_s"] = rate
                r["model_ex_s"] = r["batch"] / max(r["embed"] - r["views"], 1e-12)
                r["floor"] = 3 * work * rate / peaks[mode]
                r["floor_2x"] = 2 * work * rate / peaks[mode]
        done = [r["batch"] for r in results if "skipped" not in r]
        plain = against_plain(engine, max(done), settings) if done else {"skipped": "no batch"}
        if "ratio" in plain:
            print(f"  vs a plain step at batch {plain['batch']}: {plain['ratio']:.2f}x", flush=True)
        out["modes"][mode] = {"dimension": engine.dimension, "results": results, "plain": plain}
        del engine
        free_memory(device)
    return out


# -- report ----------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def environment(settings: Settings) -> list[str]:
    device = torch.device(settings.device)
    lines = [
        f"- torch {torch.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPU cores, stand-ins for: {', '.join(STANDINS) or 'none'}",
    ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(
            f"- {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}; torch defaults: cudnn.allow_tf32="
            f"{torch.backends.cudnn.allow_tf32}, matmul.allow_tf32="
            f"{torch.backends.cuda.matmul.allow_tf32}"
        )
    else:
        lines.append(f"- device: {device} (no GPU)")
    return lines


def agreement_table(rows: list[dict]) -> str:
    header = [
        "case",
        "GPU mode",
        "n",
        "D (curvature)",
        "mean loss",
        "loss max rel err",
        "G~ max rel err",
        "G~ min cos",
        "w max / median rel err",
        "w min / median cos",
        "scores rel err",
        "views max abs diff",
        "verdict",
    ]
    body = [
        [
            r["case"],
            r["mode"],
            str(r["n"]),
            f"{r['D']} ({r['curvature']})",
            f"{r['loss_mean']:.3g}",
            f"{r['loss_rel']:.1e}",
            f"{r['g_rel']:.1e}",
            f"{r['g_min_cos']:.6f}",
            f"{r['w_rel']:.1e} / {r['w_rel_median']:.1e}",
            f"{r['w_min_cos']:.6f} / {r['w_median_cos']:.6f}",
            f"{r['scores_rel']:.1e}",
            f"{r['views_max_abs']:.1e}",
            verdict(r),
        ]
        for r in rows
    ]
    return table(header, body)


def throughput_table(timing: dict, settings: Settings, peaks: dict[str, float]) -> str:
    header = [
        "mode",
        "batch (examples)",
        "views per call",
        "ex/s (embed_batch_with_loss)",
        "ex/s without view generation",
        "peak GiB",
        "fraction of floor (3 x fwd)",
        "at 2 x fwd",
    ]
    body = []
    for mode, data in timing["modes"].items():
        for r in data["results"]:
            if "skipped" in r:
                body.append([mode, str(r["batch"]), "", r["skipped"], "", "", "", ""])
                continue
            body.append(
                [
                    f"{mode} (peak {peaks[mode] / 1e12:.1f} TFLOP/s)",
                    str(r["batch"]),
                    str(r["batch"] * 2 * settings.pairs),
                    f"{r['ex_s']:.1f}",
                    f"{r['model_ex_s']:.1f}",
                    "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}",
                    f"{r['floor']:.3g}",
                    f"{r['floor_2x']:.3g}",
                ]
            )
    return table(header, body)


def plain_table(timing: dict, settings: Settings) -> str:
    header = [
        "mode",
        "batch (examples)",
        "views per call",
        "embedding s / batch",
        "plain forward + backward s / batch",
        "ratio (plain / embedding)",
    ]
    body = []
    for mode, data in timing["modes"].items():
        r = data.get("plain", {})
        if "ratio" not in r:
            body.append([mode, str(r.get("batch", "-")), "", "", "", r.get("skipped", "-")])
            continue
        views = r["batch"] * 2 * settings.pairs
        cells = [f"{r['embed']:.3f}", f"{r['plain']:.3f}", f"**{r['ratio']:.2f}**"]
        body.append([mode, str(r["batch"]), str(views), *cells])
    return table(header, body)


def best(timing: dict) -> dict[str, dict]:
    out = {}
    for mode, data in timing["modes"].items():
        done = [r for r in data["results"] if "ex_s" in r]
        if done:
            out[mode] = max(done, key=lambda r: r["ex_s"])
    return out


def report(command: str, settings: Settings, rows: list[dict], timing: dict, peaks) -> str:
    m = settings.timing_model
    flops = timing["forward_flops"]
    summary = [
        f"- {mode}: best {r['ex_s']:.1f} examples/s at batch {r['batch']} "
        f"({r['batch'] * 2 * settings.pairs} views), {r['floor']:.1%} of the FLOP floor"
        for mode, r in best(timing).items()
    ]
    return "\n".join(
        [
            "# GPU check: CUDA vs CPU agreement, embedding throughput",
            "",
            f"Reproduce (repository root): `{command}`",
            "",
            *settings.notes,
            *environment(settings),
            f"- wall time {time.monotonic() - STARTED:.0f} s (budget {settings.budget:.0f} s)",
            "",
            "## Agreement with the CPU (same views, factors fitted on the CPU)",
            "",
            "Per example: rel err = ||gpu - cpu|| / ||cpu||, cos = cosine; G~ = projected "
            "per-example gradients of all tracked layers, w = whitened (index) vectors; scores "
            "rel err = Frobenius relative error of the n x n influence matrix. The CPU "
            "reference is fp32 in every row. fp32: TF32 off; fp32-tf32: torch's defaults; "
            "bf16: autocast. Views max abs diff: views made on the device vs on the CPU "
            "(pixels in [0, 1]). Verdict thresholds (on w): "
            + "; ".join(
                f"{mode}: {c} >= {cv}, {r} <= {rv}" for mode, (c, cv, r, rv) in THRESHOLDS.items()
            )
            + ".",
            "",
            agreement_table(rows),
            "## Throughput of the embedding pass",
            "",
            f"`embed_batch_with_loss`: {m.arch}, {m.in_channels} x {settings.timing_size} px "
            f"views (sources {settings.timing_source} px, views made on the device), V = "
            f"{2 * settings.pairs} views, projection 16 x 16 per layer (bf16 projections "
            "under autocast, the output gradient's as a 1x1 convolution), D = "
            f"{next(iter(timing['modes'].values()))['dimension'] if timing['modes'] else '-'}, "
            f"dense factors (synthetic). Forward FLOPs per image {flops / 1e9:.4g} G "
            "(conv + linear, analytic); floor = 3 x forward x V per example. Median of "
            f">= 3 synchronised calls and >= {settings.min_seconds} s after 2 warm-ups.",
            "",
            throughput_table(timing, settings, peaks),
            *summary,
            "",
            "## The embedding against a plain forward + backward (same views)",
            "",
            "Views made once; the embedding = hooked forward and backward, per-example "
            "projected gradients, whitening; the plain step = forward + backward computing "
            "every weight gradient (parameters require grad), same loss and autocast. Median "
            "of synchronised calls after 2 warm-ups.",
            "",
            plain_table(timing, settings),
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", type=float, default=270.0, help="seconds for everything")
    parser.add_argument("--max-batch", type=int, default=1024, help="examples per call, cap")
    parser.add_argument("--peak-bf16", type=float, default=PEAK_BF16, help="FLOP/s")
    parser.add_argument("--peak-tf32", type=float, default=PEAK_TF32, help="FLOP/s")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--smoke", "--quick", action="store_true", help="CPU, tiny models (CI)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = smoke_settings(args) if args.smoke else gpu_settings(args)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or use --smoke on a CPU")
    peaks = {"bf16": args.peak_bf16, "fp32": args.peak_tf32}
    command = "python benchmarks/" + Path(__file__).name + " " + " ".join(sys.argv[1:])
    rows: list[dict] = []
    if not args.skip_checks:
        for case in settings.checks:
            if remaining(settings) < 0.5 * settings.budget:
                print(f"skipping check {case.name}: time budget", flush=True)
                continue
            rows += check_case(case, settings)
    timing = throughput(settings, peaks)
    text = report(command.strip(), settings, rows, timing, peaks)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"agreement": rows, "throughput": timing}, indent=1))
    print("\n" + text + f"\nwrote {args.out}")
    strict = [r for r in rows if r["mode"] == "fp32"]
    return 0 if all(verdict(r) == "ok" for r in strict) else 1


if __name__ == "__main__":
    sys.exit(main())
