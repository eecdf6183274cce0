"""benchmarks/gpu_check.py: its smoke mode runs every code path on the CPU, without PyYAML or
safetensors, and writes the table; its FLOP count and safetensors stand-in are right."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from pipeline.models import resnet50

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_the_table_with_standins(tmp_path):
    out, raw = tmp_path / "gpu.md", tmp_path / "gpu.json"
    # The stand-ins forced: the run must need neither PyYAML nor safetensors.
    env = {**os.environ, "GPU_CHECK_STANDINS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--json", str(raw)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    text = out.read_text()
    assert "## Agreement with the CPU" in text and "## Throughput of the embedding pass" in text
    assert "stand-ins for: yaml, safetensors" in text
    figures = json.loads(raw.read_text())
    rows = figures["agreement"]
    cases = sorted({r["case"] for r in rows})
    assert len(cases) == 2  # a SmallCNN and a ResNet-18, each in every GPU mode
    assert sorted((r["case"], r["mode"]) for r in rows) == sorted(
        (case, mode) for case in cases for mode in ("fp32", "fp32-tf32", "bf16")
    )
    for row in rows:
        assert f"| {row['case']} | {row['mode']} |" in text
        if row["mode"] != "bf16":  # CPU against CPU on the same views: bitwise equal
            assert row["g_rel"] == 0.0 and row["w_rel"] == 0.0 and row["loss_rel"] == 0.0
        assert row["D"] > 0 and row["loss_mean"] > 0
    modes = figures["throughput"]["modes"]
    assert set(modes) == {"bf16", "fp32"}
    for data in modes.values():
        timed = [r for r in data["results"] if "ex_s" in r]
        assert timed and all(r["ex_s"] > 0 and r["floor"] > 0 for r in timed)
        assert [r["batch"] for r in data["results"]][:3] == [2, 4, 8]
        plain = data["plain"]  # the same views through a plain forward + backward
        assert plain["batch"] == max(r["batch"] for r in timed) and plain["ratio"] > 0
    assert "## The embedding against a plain forward + backward" in text


def test_forward_flops_counts_conv_and_linear():
    gpu_check = load_script()
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10)
    )
    # conv: 8 x 16 x 16 outputs, 3 x 3 x 3 multiply-adds each; linear: 10 x 2048.
    expected = 2 * (8 * 16 * 16 * 27) + 2 * (10 * 2048)
    assert gpu_check.forward_flops(model, 3, 32) == expected
    # torchvision's published cost of ResNet-50 at 224 px: 4.09 G multiply-adds.
    flops = gpu_check.forward_flops(resnet50(), 3, 224)
    assert 8.15e9 < flops < 8.2e9


def test_safetensors_standin_matches_the_real_format():
    gpu_check = load_script()
    tensors = {
        "a/U": torch.randn(5, 3, dtype=torch.float64),
        "b": torch.arange(4, dtype=torch.int64),
        "c": torch.tensor(0.5, dtype=torch.float32),
        "d": torch.randn(2, 2).to(torch.bfloat16),
    }
    metadata = {"format": "x", "layers": "[1, 2]"}
    ours = gpu_check.safetensors_save(tensors, metadata)
    real = safetensors.torch.save(tensors, metadata=metadata)
    for blob in (ours, real):
        for loaded in (safetensors.torch.load(blob), gpu_check.safetensors_load(blob)):
            assert loaded.keys() == tensors.keys()
            for name, value in tensors.items():
                assert loaded[name].dtype == value.dtype
                assert torch.equal(loaded[name], value)
    from pipeline.influence.engine import safetensors_metadata

    assert safetensors_metadata(ours) == metadata
