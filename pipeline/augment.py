"""Deterministic, batched SimCLR-style views (SPEC section 2).

View `a` is `t(x; s)` with `s` a blake2b hash of (global seed, a) (common random views, the
default) or of (global seed, key, a) (seeding by key): it never depends on worker, process,
thread count or batch composition. Parameters
are sampled on the CPU from one `numpy` generator per view; pixels are computed batched in plain
torch on the images' device.

Order of operations (fixed): random resized crop + horizontal flip (one `grid_sample`), colour
jitter with probability `jitter_p` in the FIXED order brightness -> contrast -> saturation -> hue
(torchvision shuffles the order per call; one order is simpler and loses little), random
grayscale, Gaussian blur, then optional per-channel normalisation. Hue is rotated in HSV (the
maths of torchvision's `adjust_hue`, batched, in closed form), not by a YIQ rotation.

Batch invariance is exact (bitwise) on the CPU: every pixel op is elementwise or per view, the
per-image contrast mean is summed exactly (float sums change in the last bits with how torch
splits a reduction over threads, i.e. with the batch size), and the blur is a depthwise
convolution whose output pixels are independent dot products.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config import AugmentConfig

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
# Torchvision's RandomResizedCrop tries this many times before the centre-crop fallback.
_CROP_TRIES = 10
# Fixed layout of the uniform draws of one view: every view consumes the same count, so
# switching one augmentation off or on never shifts the others' parameters.
_U_SCALE = slice(0, _CROP_TRIES)
_U_RATIO = slice(_CROP_TRIES, 2 * _CROP_TRIES)
_U_TOP, _U_LEFT, _U_FLIP, _U_JITTER = 20, 21, 22, 23
_U_BRIGHT, _U_CONTRAST, _U_SAT, _U_HUE = 24, 25, 26, 27
_U_GRAY, _U_BLUR, _U_SIGMA = 28, 29, 30
_NUM_U = 31
# Quantum of the exact contrast mean (2**-24: below float32 resolution of values near 1).
_MEAN_SCALE = float(2**24)


def view_seed(global_seed: int, key: str, pair: int, side: int) -> int:
    """Stable 64-bit seed of view (`pair`, `side`) of example `key`.

    Fields are length-prefixed so distinct tuples never hash the same bytes
    (e.g. key "a1", pair 2 vs key "a", pair 12).
    """
    h = hashlib.blake2b(digest_size=8, person=b"infl-ssl-view")
    for part in (str(int(global_seed)), key, str(int(pair)), str(int(side))):
        data = part.encode("utf-8")
        h.update(struct.pack("<Q", len(data)))
        h.update(data)
    return int.from_bytes(h.digest(), "little")


@dataclass
class ViewParams:
    """Sampled parameters of N views (CPU tensors unless moved with `to`).

    `box` is (top, left, height, width) as fractions of the input's H and W; identity values
    (factor 1, hue 0, sigma 0) mean "not applied".
    """

    box: Tensor  # [N, 4] float32
    flip: Tensor  # [N] bool
    jitter: Tensor  # [N] bool, whether colour jitter was drawn (else identity factors)
    brightness: Tensor  # [N] float32 multiplicative factor
    contrast: Tensor  # [N] float32 blend factor against the mean gray
    saturation: Tensor  # [N] float32 blend factor against per-pixel gray
    hue: Tensor  # [N] float32 shift in turns, in [-0.5, 0.5]
    gray: Tensor  # [N] bool
    blur_sigma: Tensor  # [N] float32 in output pixels, 0 = no blur

    def __len__(self) -> int:
        return self.box.shape[0]

    def to(self, device: torch.device | str) -> ViewParams:
        return ViewParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def sample_view_params(
    cfg: AugmentConfig, seeds: Sequence[int], image_hw: tuple[int, int]
) -> ViewParams:
    """Parameters of one view per seed; a view depends only on its own seed (and `cfg`, H, W)."""
    u = np.empty((len(seeds), _NUM_U))
    for row, seed in enumerate(seeds):
        u[row] = np.random.Generator(np.random.PCG64(int(seed))).random(_NUM_U)
    return params_from_uniforms(cfg, u, image_hw)


def stratified_uniforms(global_seed: int, block_index: int, block: int) -> np.ndarray:
    """[block, _NUM_U] uniforms of one Latin-hypercube block of common views.

    Every coordinate of the block's views takes each of the `block` strata [j/block,
    (j+1)/block) exactly once (a random permutation per coordinate, a uniform offset within
    the stratum), so e.g. exactly half of 16 views are flipped at flip_p 0.5 and the crop
    scales cover their range evenly. Blocks are independent draws from (seed, block_index).
    """
    h = hashlib.blake2b(digest_size=8, person=b"infl-ssl-sview")
    h.update(struct.pack("<qQ", int(global_seed), int(block_index)))
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(h.digest(), "little")))
    strata = np.argsort(rng.random((_NUM_U, block)), axis=1).T  # [block, _NUM_U] permutations
    return (strata + rng.random((block, _NUM_U))) / block


def params_from_uniforms(
    cfg: AugmentConfig, u: np.ndarray, image_hw: tuple[int, int]
) -> ViewParams:
    """View parameters from their [N, _NUM_U] uniform draws (the fixed layout above)."""
    box = _crop_boxes(cfg, u, image_hw)
    jitter = u[:, _U_JITTER] < cfg.jitter_p
    blur = u[:, _U_BLUR] < cfg.blur_p
    sigma_lo, sigma_hi = cfg.blur_sigma
    sigma = np.where(blur, sigma_lo + (sigma_hi - sigma_lo) * u[:, _U_SIGMA], 0.0)

    def f32(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.float32))

    return ViewParams(
        box=f32(box),
        flip=torch.from_numpy(u[:, _U_FLIP] < cfg.flip_p),
        jitter=torch.from_numpy(jitter),
        brightness=f32(np.where(jitter, _factor(cfg.brightness, u[:, _U_BRIGHT]), 1.0)),
        contrast=f32(np.where(jitter, _factor(cfg.contrast, u[:, _U_CONTRAST]), 1.0)),
        saturation=f32(np.where(jitter, _factor(cfg.saturation, u[:, _U_SAT]), 1.0)),
        hue=f32(np.where(jitter, cfg.hue * (2.0 * u[:, _U_HUE] - 1.0), 0.0)),
        gray=torch.from_numpy(u[:, _U_GRAY] < cfg.grayscale_p),
        blur_sigma=f32(sigma),
    )


def _factor(strength: float, u: np.ndarray) -> np.ndarray:
    """Torchvision's jitter range [max(0, 1 - s), 1 + s] mapped from uniforms `u`."""
    lo = max(0.0, 1.0 - strength)
    return lo + (1.0 + strength - lo) * u


def _crop_boxes(cfg: AugmentConfig, u: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """Torchvision's RandomResizedCrop.get_params, vectorised over views, as fractions."""
    height, width = image_hw
    scale_lo, scale_hi = cfg.crop_scale
    log_lo, log_hi = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
    area = height * width * (scale_lo + (scale_hi - scale_lo) * u[:, _U_SCALE])
    log_aspect = log_lo + (log_hi - log_lo) * u[:, _U_RATIO]
    # Row by row: a SIMD exp may round an element by its position in the array, which must
    # not depend on the batch.
    aspect = np.stack([np.exp(row) for row in log_aspect]).reshape(log_aspect.shape)
    w = np.rint(np.sqrt(area * aspect))  # rint = round-half-even, as Python's round
    h = np.rint(np.sqrt(area / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = np.argmax(ok, axis=1)[:, None]  # first successful try
    w = np.take_along_axis(w, first, axis=1)[:, 0]
    h = np.take_along_axis(h, first, axis=1)[:, 0]
    top = np.floor(u[:, _U_TOP] * (height - h + 1))
    left = np.floor(u[:, _U_LEFT] * (width - w + 1))
    fb_top, fb_left, fb_h, fb_w = _centre_fallback(cfg.crop_ratio, height, width)
    found = ok.any(axis=1)
    top, left = np.where(found, top, fb_top), np.where(found, left, fb_left)
    h, w = np.where(found, h, fb_h), np.where(found, w, fb_w)
    return np.stack([top / height, left / width, h / height, w / width], axis=1)


def _centre_fallback(
    ratio: tuple[float, float], height: int, width: int
) -> tuple[int, int, int, int]:
    """Torchvision's fallback after 10 failed tries: the largest centred crop within `ratio`."""
    in_ratio = width / height
    h, w = height, width
    if in_ratio < min(ratio):
        h = round(width / min(ratio))
    elif in_ratio > max(ratio):
        w = round(height * max(ratio))
    return (height - h) // 2, (width - w) // 2, h, w


def apply_views(images: Tensor, params: ViewParams, cfg: AugmentConfig) -> Tensor:
    """Render view n of image n: [N, C, H, W] in [0, 1] -> [N, C, size, size] float32."""
    if images.shape[0] != len(params):
        raise ValueError(f"{images.shape[0]} images but {len(params)} views")
    return _render(images, params, cfg, views_per_image=1)


def _render(images: Tensor, params: ViewParams, cfg: AugmentConfig, views_per_image: int) -> Tensor:
    """Views [B * V, C, size, size]; views n * V .. n * V + V - 1 are of image n."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, C, H, W], C in (1, 3), got {tuple(images.shape)}")
    params = params.to(images.device)
    x = _crop_flip(images.float(), params, cfg.size, views_per_image)
    x = _colour_jitter(x, params)
    x = _grayscale(x, params.gray)
    x = _blur(x, params.blur_sigma)
    return _normalise(x, cfg.mean, cfg.std)


def _crop_flip(images: Tensor, params: ViewParams, size: int, views_per_image: int) -> Tensor:
    """Crop, resize and flip in one bilinear `grid_sample`.

    The V grids of one image are stacked along the grid's height, so each image is sampled V
    times without being copied V times. The grid is built with elementwise ops only (no
    `affine_grid`, whose bmm may change its summation with the batch size).
    """
    b, c, height, width = images.shape
    top, left, h, w = params.box.unbind(1)
    base = (torch.arange(size, device=images.device, dtype=torch.float32) * 2 + 1) / size - 1
    gx = _axis_grid(left, w, params.flip, width, base)[:, None, :].expand(-1, size, -1)
    gy = _axis_grid(top, h, torch.zeros_like(params.flip), height, base)[:, :, None]
    grid = torch.stack([gx, gy.expand(-1, -1, size)], dim=-1)
    grid = grid.reshape(b, views_per_image * size, size, 2)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out.view(b, c, views_per_image, size, size).transpose(1, 2)
    return out.reshape(b * views_per_image, c, size, size)


def _axis_grid(start: Tensor, length: Tensor, flip: Tensor, pixels: int, base: Tensor) -> Tensor:
    """Normalised input coordinates [N, size] of one axis of the crop (align_corners=False).

    Output coordinate u in [-1, 1] maps to (+/-) length * u + 2 * start + length - 1; the result
    is clamped to the crop's first and last pixel centres, so border pixels are replicated
    exactly as crop-then-resize (torchvision's resized_crop) does, never mixed with pixels
    just outside the crop.
    """
    start, length = start.double(), length.double()
    scale = torch.where(flip, -length, length).float()[:, None]
    shift = (2 * start + length - 1).float()[:, None]
    lo = (2 * start + 1 / pixels - 1).float()[:, None]
    hi = (2 * (start + length) - 1 / pixels - 1).float()[:, None]
    return torch.minimum(torch.maximum(scale * base + shift, lo), hi)


def _per_sample(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def _on_views(x: Tensor, mask: Tensor, fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """`fn(views, index)` on the views where `mask` holds, written back into `x` in place.

    Every op is per view, so the result of a view does not depend on which others are selected;
    views that are not selected are skipped (not recomputed as identities), which saves time.
    """
    index = mask.nonzero().squeeze(1)
    if index.numel() == 0:
        return x
    if index.numel() == mask.numel():
        return fn(x, index)
    x[index] = fn(x[index], index)
    return x


def _luma(x: Tensor) -> Tensor:
    """[N, 1, H, W] grayscale (the image itself when C == 1); elementwise, so batch-exact."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend_(x: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    """ratio * x + (1 - ratio) * other, clamped to [0, 1] (torchvision's _blend), in place."""
    r = _per_sample(ratio)
    return x.mul_(r).add_((1.0 - r) * other).clamp_(0.0, 1.0)


def _colour_jitter(x: Tensor, p: ViewParams) -> Tensor:
    """Brightness -> contrast -> saturation -> hue on the views whose factors are not identity.

    The factors, not the `jitter` flag, decide, so hand-made parameters behave as they read.
    """

    def jitter(v: Tensor, i: Tensor) -> Tensor:
        v = v.mul_(_per_sample(p.brightness[i])).clamp_(0.0, 1.0)
        v = _blend_(v, _image_mean(_luma(v)), p.contrast[i])
        if v.shape[1] == 1:  # saturation and hue are no-ops for one channel
            return v
        v = _blend_(v, _luma(v), p.saturation[i])
        hue = p.hue[i]
        return _on_views(v, hue != 0, lambda w, k: _shift_hue(w, hue[k]))

    active = (p.brightness != 1) | (p.contrast != 1) | (p.saturation != 1) | (p.hue != 0)
    return _on_views(x, active, jitter)


def _image_mean(gray: Tensor) -> Tensor:
    """Per-image mean [N, 1, 1, 1], exact and hence independent of the summation order.

    Values are rounded to multiples of 2**-24, whose float64 partial sums are all exact; a
    plain float mean changes in the last bits with how torch splits the reduction over
    threads, i.e. with the batch size.
    """
    q = torch.round(gray * _MEAN_SCALE).sum(dim=(1, 2, 3), dtype=torch.float64)
    return _per_sample((q / (gray[0].numel() * _MEAN_SCALE)).float())


def _shift_hue(x: Tensor, hue: Tensor) -> Tensor:
    """Rotate the HSV hue by `hue` turns (torchvision's adjust_hue, same maths).

    V = max and the chroma max - min do not change, so no HSV planes are built: the hue sector
    h6 in [0, 6) is shifted and each channel is the closed form of HSV->RGB,
    f(n) = max - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + h6) mod 6, n = 5, 3, 1.
    """
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    chroma = maxc - minc
    inv = 1.0 / torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    h6 = torch.where(
        maxc == r,
        (g - b) * inv,
        torch.where(maxc == g, (b - r) * inv + 2.0, (r - g) * inv + 4.0),
    )
    shift = (6.0 * hue).view(-1, 1, 1)
    out = torch.empty_like(x)
    for c, n in enumerate((5.0, 3.0, 1.0)):
        k = torch.remainder(h6 + (shift + n), 6.0)
        w = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
        torch.sub(maxc, chroma * w, out=out[:, c])
    return out


def _grayscale(x: Tensor, gray: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    return _on_views(x, gray, lambda v, _: _luma(v).expand_as(v).contiguous())


def blur_kernel_size(size: int) -> int:
    """Odd kernel of about 10% of the view side (23 for 224, as SimCLR), at least 3."""
    k = int(0.1 * size)
    return max(3, k + 1 - k % 2)


def _blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable per-view Gaussian blur with reflect padding on the views with sigma > 0."""
    return _on_views(x, sigma > 0, lambda v, i: _gaussian(v, sigma[i]))


def _gaussian(x: Tensor, sigma: Tensor) -> Tensor:
    """Depthwise (grouped) conv: each output pixel is its own dot product, so batch-exact."""
    n, c, size, _ = x.shape
    k = min(blur_kernel_size(size), 2 * size - 1)  # reflect pad must be < size
    pad = k // 2
    # Kernel in float64 then rounded: float32 exp may differ by an ulp between SIMD lanes.
    r = torch.arange(k, device=x.device, dtype=torch.float64) - pad
    w = torch.exp(-(r**2) / (2 * sigma.double()[:, None] ** 2))
    w = (w / w.sum(dim=1, keepdim=True)).float().repeat_interleave(c, dim=0)  # [N*C, k]
    y = x.reshape(1, n * c, size, size)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), w.view(-1, 1, 1, k), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), w.view(-1, 1, k, 1), groups=n * c)
    return y.view_as(x)


def normalise_views(x: Tensor, cfg: AugmentConfig) -> Tensor:
    """The per-channel normalisation the views get, for un-augmented images."""
    return _normalise(x, cfg.mean, cfg.std)


def _normalise(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    if not mean and not std:
        return x
    if len(mean) != len(std) or len(mean) not in (1, x.shape[1]):
        raise ValueError(f"mean/std of lengths {len(mean)}/{len(std)} for {x.shape[1]} channels")
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


VIEW_SEEDINGS = ("common", "stratified", "key")


def common_view_seed(global_seed: int, view: int) -> int:
    """Stable 64-bit seed of view `view` shared by every example (common random views)."""
    h = hashlib.blake2b(digest_size=8, person=b"infl-ssl-cview")
    h.update(struct.pack("<qQ", int(global_seed), int(view)))
    return int.from_bytes(h.digest(), "little")


class ViewGenerator:
    """V views per example: the augmentation entry point of the engine (SPEC section 2).

    `seeding="common"` (the default): view `a` has the same parameters for every example,
    drawn from (seed, a) alone, so exact copies get identical views and every example is
    measured under the same draws. `seeding="key"`: view `a` of key `k` is drawn from
    (seed, k, a // 2, a % 2) (the K-pair layout of earlier indices). Views `offset ..
    offset + V - 1` of the stream are produced: a second, independent set of V views is
    `offset=V`, and more views for a query extend the index's own.
    `seeding="stratified"`: common views drawn in Latin-hypercube blocks of `block` views
    (the index's V; `stratified_uniforms`), so views `offset=V` are another independent block.
    """

    def __init__(
        self,
        cfg: AugmentConfig,
        num_views: int,
        seed: int,
        seeding: str = "common",
        offset: int = 0,
        block: int | None = None,
    ) -> None:
        if num_views < 2:
            raise ValueError(f"num_views must be >= 2, got {num_views}")
        if seeding not in VIEW_SEEDINGS:
            raise ValueError(f"view seeding must be one of {VIEW_SEEDINGS}, not {seeding!r}")
        if offset < 0:
            raise ValueError(f"view offset must be >= 0, got {offset}")
        self.cfg, self.num_views, self.seed = cfg, num_views, seed
        self.seeding, self.offset = seeding, offset
        self.block = block or num_views
        self._common: dict[tuple[int, int], ViewParams] = {}

    def view_indices(self) -> range:
        return range(self.offset, self.offset + self.num_views)

    def seeds(self, keys: Sequence[str]) -> list[int]:
        """Seeds in output order: key-major, then view index."""
        if self.seeding == "stratified":
            raise ValueError("stratified views are drawn per block, not from one seed per view")
        if self.seeding == "common":
            return [common_view_seed(self.seed, a) for _ in keys for a in self.view_indices()]
        return [
            view_seed(self.seed, key, a // 2, a % 2) for key in keys for a in self.view_indices()
        ]

    def params(self, keys: Sequence[str], image_hw: tuple[int, int]) -> ViewParams:
        if self.seeding == "key":
            return sample_view_params(self.cfg, self.seeds(keys), image_hw)
        if image_hw not in self._common:  # the same V draws for every batch: sample once
            self._common[image_hw] = self._common_params(image_hw)
        return _tile(self._common[image_hw], len(keys))

    def _common_params(self, image_hw: tuple[int, int]) -> ViewParams:
        if self.seeding == "common":
            seeds = [common_view_seed(self.seed, a) for a in self.view_indices()]
            return sample_view_params(self.cfg, seeds, image_hw)
        first, last = self.offset // self.block, (self.offset + self.num_views - 1) // self.block
        u = np.concatenate(
            [stratified_uniforms(self.seed, b, self.block) for b in range(first, last + 1)]
        )
        start = self.offset - first * self.block
        return params_from_uniforms(self.cfg, u[start : start + self.num_views], image_hw)

    def __call__(self, images: Tensor, keys: Sequence[str]) -> Tensor:
        """[B, C, H, W] in [0, 1] -> [B, V, C, size, size]; index a is view offset + a."""
        if images.ndim != 4 or images.shape[0] != len(keys):
            raise ValueError(f"images {tuple(images.shape)} do not match {len(keys)} keys")
        b, c, height, width = images.shape
        v = self.num_views
        out = _render(images, self.params(keys, (height, width)), self.cfg, views_per_image=v)
        return out.view(b, v, c, self.cfg.size, self.cfg.size)


def _tile(params: ViewParams, times: int) -> ViewParams:
    """The V views of `params` repeated for `times` examples (example-major)."""

    def tile(t: Tensor) -> Tensor:
        return t.repeat(times, *([1] * (t.dim() - 1)))

    return ViewParams(**{f.name: tile(getattr(params, f.name)) for f in fields(params)})


def resize_to_square(img: Tensor, side: int) -> Tensor:
    """[C, H, W] -> [C, side, side] float32: shorter side to `side` (antialiased bilinear),
    then a centre crop. uint8 input is scaled to [0, 1]."""
    x = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
    _, height, width = x.shape
    if height <= width:
        new_h, new_w = side, max(side, int(side * width / height))
    else:
        new_h, new_w = max(side, int(side * height / width)), side
    if (new_h, new_w) != (height, width):
        x = F.interpolate(
            x[None], size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
        )[0]
    top = round((new_h - side) / 2.0)
    left = round((new_w - side) / 2.0)
    return x[:, top : top + side, left : left + side].clamp(0.0, 1.0)
