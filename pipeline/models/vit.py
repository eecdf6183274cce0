"""Vision Transformers in plain torch, keyed like timm, DINO and DINOv2 checkpoints.

Keys: `cls_token`, `pos_embed` (class position first, then the patch grid), `patch_embed.proj`
(a Conv2d with kernel = stride = patch), `blocks.N.{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}`, `norm`; these coincide in timm's `vit_*_patch16_224` (with
`num_classes=0`) and DINO's `vision_transformer.py`. DINOv2 adds LayerScale
(`blocks.N.ls1.gamma`, `ls2.gamma`), `mask_token` (unused at inference; built so DINOv2's
own checkpoints load strictly, optional on load as timm's conversions drop it),
`register_tokens` for the `_reg` releases, and a 37x37 grid of 14-pixel patches (trained at
518 px).

Attention projects with one `qkv` nn.Linear and one `proj` nn.Linear on [B, T, C] tokens, so
the influence tracker sees every token as a row of those layers; the attention itself is
`F.scaled_dot_product_attention`. For an input whose patch grid differs from the checkpoint's,
the position grid is resized bicubically as DINO / DINOv2 do (`interpolate_offset`,
`interpolate_antialias`). The representation is the class token (`pool="cls"`) or the mean of
the patch tokens (`pool="mean"`, registers excluded), both after the final `norm`.
A classifier head (`head.*`, or a DINO projection head) in a checkpoint is dropped on load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import ModelError

POOLS = ("cls", "mean")


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: [B, C, H, W] -> [B, H/p * W/p, D] (row-major)."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ModelError(
                f"ViT input {h}x{w} is not a multiple of the {p}-pixel patch: "
                f"set the view size (augment.size) to a multiple of {p}"
            )
        x = self.proj(x)
        grid = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), grid


class Attention(nn.Module):
    """Multi-head self-attention: fused `qkv` Linear, SDPA, output `proj` Linear."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ModelError(f"ViT width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, T, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class Mlp(nn.Module):
    """Linear up, GELU, Linear down (`fc1`, `fc2`)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (`gamma`), as in CaiT / DINOv2."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block; LayerScale on both branches when `layer_scale` is set."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        layer_scale: float | None = None,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def resize_pos_grid(
    grid_embed: torch.Tensor,
    old: tuple[int, int],
    new: tuple[int, int],
    offset: float = 0.1,
    antialias: bool = False,
) -> torch.Tensor:
    """Bicubic resize of patch position embeddings [1, old_h*old_w, D] to [1, new_h*new_w, D].

    `offset` > 0 reproduces DINO / DINOv2: the scale factor is (new + offset) / old, a
    work-around for float rounding of the output size that checkpoints were evaluated with;
    `offset=0` resizes to the size directly (DINOv2 `_reg` models, with `antialias=True`).
    """
    if new == old:
        return grid_embed
    dim = grid_embed.shape[-1]
    image = grid_embed.float().reshape(1, old[0], old[1], dim).permute(0, 3, 1, 2)
    if offset:
        scale = ((new[0] + offset) / old[0], (new[1] + offset) / old[1])
        image = F.interpolate(image, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        image = F.interpolate(image, size=new, mode="bicubic", antialias=antialias)
    if tuple(image.shape[-2:]) != new:  # only a pathological offset gets here
        raise ModelError(f"position grid resized to {tuple(image.shape[-2:])}, expected {new}")
    return image.permute(0, 2, 3, 1).reshape(1, -1, dim).to(grid_embed.dtype)


class VisionTransformer(nn.Module):
    """ViT feature backbone returning `out_dim` (= `embed_dim`) features per image."""

    def __init__(
        self,
        *,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        img_size: int = 224,
        in_channels: int = 3,
        qkv_bias: bool = True,
        layer_scale: float | None = None,
        num_register_tokens: int = 0,
        mask_token: bool = False,
        pool: str = "cls",
        interpolate_offset: float = 0.1,
        interpolate_antialias: bool = False,
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ModelError(f"ViT pool must be one of {POOLS}, not {pool!r}")
        if img_size % patch_size:
            raise ModelError(f"ViT img_size {img_size} is not a multiple of patch {patch_size}")
        side = img_size // patch_size
        self.grid = (side, side)
        self.pool = pool
        self.num_prefix_tokens = 1 + num_register_tokens
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        # Parameters in checkpoint order (state dicts list own parameters before submodules).
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + side * side, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
            if num_register_tokens
            else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if mask_token else None
        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dim)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, layer_scale) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.out_dim = embed_dim
        self.head_prefixes = ("head.",)
        # Never used by `forward`: a checkpoint without it (timm's DINOv2) loads as well.
        self.optional_keys = ("mask_token",) if mask_token else ()
        self._init_weights()

    def _init_weights(self) -> None:
        # timm / DINO: truncated-normal position embeddings and Linear weights, zero biases.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """[1, 1 + gh*gw, D]: the class position, then the grid resized to `grid`."""
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid_pos = resize_pos_grid(
            grid_pos, self.grid, grid, self.interpolate_offset, self.interpolate_antialias
        )
        return torch.cat([cls_pos, grid_pos], dim=1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised output tokens [B, 1 + registers + patches, D]."""
        patches, grid = self.patch_embed(x)
        cls = self.cls_token.expand(len(patches), -1, -1)
        t = torch.cat([cls, patches], dim=1) + self.position_embedding(grid)
        if self.register_tokens is not None:  # DINOv2: registers carry no position
            regs = self.register_tokens.expand(len(t), -1, -1)
            t = torch.cat([t[:, :1], regs, t[:, 1:]], dim=1)
        for block in self.blocks:
            t = block(t)
        return self.norm(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        if self.pool == "cls":
            return t[:, 0]
        return t[:, self.num_prefix_tokens :].mean(dim=1)


def _vit(
    size: str, patch: int, dinov2: bool, in_channels: int, pool: str, registers: int = 0, **kwargs
) -> VisionTransformer:
    width, heads = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}[size]
    args: dict = {"patch_size": patch, "embed_dim": width, "num_heads": heads}
    args |= {"in_channels": in_channels, "pool": pool}
    if dinov2:
        # DINOv2 hub models: 518 px training (37x37 grid), LayerScale, mask token; the
        # register models resize the position grid by size with antialiasing.
        args |= {"img_size": 518, "layer_scale": 1.0, "mask_token": True}
        if registers:
            args |= {"num_register_tokens": registers, "interpolate_offset": 0.0}
            args |= {"interpolate_antialias": True}
    return VisionTransformer(**(args | kwargs))


def vit_tiny_patch16(in_channels: int = 3, pool: str = "cls", **kwargs) -> VisionTransformer:
    """ViT-Ti/16 (192 wide, 12 blocks, 3 heads) at 224 px: timm `vit_tiny_patch16_224` (DeiT-Ti).

    The small preset for tests and benchmarks: `embed_dim`, `depth`, `num_heads`,
    `patch_size` and `img_size` (kwargs) give other sizes with the same keys.
    """
    return _vit("tiny", 16, dinov2=False, in_channels=in_channels, pool=pool, **kwargs)


def vit_small_patch16(in_channels: int = 3, pool: str = "cls", **kwargs) -> VisionTransformer:
    """ViT-S/16 (384 wide, 12 blocks, 6 heads) at 224 px: timm `vit_small_patch16_224`, DINO."""
    return _vit("small", 16, dinov2=False, in_channels=in_channels, pool=pool, **kwargs)


def vit_base_patch16(in_channels: int = 3, pool: str = "cls", **kwargs) -> VisionTransformer:
    """ViT-B/16 (768 wide, 12 blocks, 12 heads) at 224 px: timm `vit_base_patch16_224`, DINO."""
    return _vit("base", 16, dinov2=False, in_channels=in_channels, pool=pool, **kwargs)


def vit_small_patch14_dinov2(
    in_channels: int = 3, pool: str = "cls", **kwargs
) -> VisionTransformer:
    """DINOv2 ViT-S/14 (`dinov2_vits14_pretrain.pth` keys)."""
    return _vit("small", 14, dinov2=True, in_channels=in_channels, pool=pool, **kwargs)


def vit_base_patch14_dinov2(in_channels: int = 3, pool: str = "cls", **kwargs) -> VisionTransformer:
    """DINOv2 ViT-B/14 (`dinov2_vitb14_pretrain.pth` keys)."""
    return _vit("base", 14, dinov2=True, in_channels=in_channels, pool=pool, **kwargs)


def vit_small_patch14_reg4_dinov2(
    in_channels: int = 3, pool: str = "cls", **kwargs
) -> VisionTransformer:
    """DINOv2 ViT-S/14 with 4 registers (`dinov2_vits14_reg4_pretrain.pth` keys)."""
    return _vit("small", 14, dinov2=True, in_channels=in_channels, pool=pool, registers=4, **kwargs)


def vit_base_patch14_reg4_dinov2(
    in_channels: int = 3, pool: str = "cls", **kwargs
) -> VisionTransformer:
    """DINOv2 ViT-B/14 with 4 registers (`dinov2_vitb14_reg4_pretrain.pth` keys)."""
    return _vit("base", 14, dinov2=True, in_channels=in_channels, pool=pool, registers=4, **kwargs)
