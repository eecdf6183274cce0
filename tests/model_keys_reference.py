"""Reference state-dict layouts of public checkpoints, written from the upstream definitions.

Run `python -m tests.model_keys_reference` to (re)write `tests/data/model_keys/<arch>.json`.
Nothing here imports `pipeline.models`: each layout is spelled out from the upstream module
definitions (torchvision `models/{convnext,mobilenetv2,mobilenetv3,efficientnet}.py` and
`ops/misc.py`; timm `models/vision_transformer.py`; DINO `vision_transformer.py`; DINOv2
`models/vision_transformer.py` and `layers/`), so a test comparing the built-in encoders
against these files checks two independent derivations against each other, and the
parameter counts of both against the published ones.

Conventions of those sources that fix the keys and their order: a module's own parameters
come before its children's; torchvision's `Conv2dNormActivation` is a Sequential (conv `.0`,
norm `.1`), its convs have no bias when followed by a norm, and a BatchNorm holds `weight`,
`bias`, `running_mean`, `running_var`, `num_batches_tracked` (a 0-d count).
"""

from __future__ import annotations

import json
from pathlib import Path

FIXTURES = Path(__file__).parent / "data" / "model_keys"
Keys = list[tuple[str, list[int]]]


def _bn(name: str, c: int) -> Keys:
    return [(f"{name}.{s}", [c]) for s in ("weight", "bias", "running_mean", "running_var")] + [
        (f"{name}.num_batches_tracked", [])
    ]


def _conv_bn(name: str, cin: int, cout: int, k: int, depthwise: bool = False) -> Keys:
    """torchvision Conv2dNormActivation with BatchNorm: `name.0` conv, `name.1` norm."""
    per_group = 1 if depthwise else cin
    return [(f"{name}.0.weight", [cout, per_group, k, k]), *_bn(f"{name}.1", cout)]


def _linear(name: str, cin: int, cout: int) -> Keys:
    return [(f"{name}.weight", [cout, cin]), (f"{name}.bias", [cout])]


def _se(name: str, c: int, squeeze: int) -> Keys:
    """torchvision ops.misc.SqueezeExcitation: 1x1 convs `fc1`, `fc2`, both with bias."""
    return [
        (f"{name}.fc1.weight", [squeeze, c, 1, 1]),
        (f"{name}.fc1.bias", [squeeze]),
        (f"{name}.fc2.weight", [c, squeeze, 1, 1]),
        (f"{name}.fc2.bias", [c]),
    ]


def _round8(v: float) -> int:
    # torchvision models._utils._make_divisible(v, 8): nearest multiple of 8, at least 8,
    # bumped up a step when rounding lost more than 10%.
    r = max(8, int(v + 4) // 8 * 8)
    return r + 8 if r < 0.9 * v else r


def convnext_tiny() -> Keys:
    """torchvision.models.convnext_tiny(num_classes=1000)."""
    widths, depths = [96, 192, 384, 768], [3, 3, 9, 3]
    keys: Keys = [("features.0.0.weight", [96, 3, 4, 4]), ("features.0.0.bias", [96])]
    keys += [("features.0.1.weight", [96]), ("features.0.1.bias", [96])]
    index = 1
    for stage, (c, n) in enumerate(zip(widths, depths, strict=True)):
        for j in range(n):
            p = f"features.{index}.{j}"
            keys += [(f"{p}.layer_scale", [c, 1, 1])]
            keys += [(f"{p}.block.0.weight", [c, 1, 7, 7]), (f"{p}.block.0.bias", [c])]
            keys += [(f"{p}.block.2.weight", [c]), (f"{p}.block.2.bias", [c])]
            keys += _linear(f"{p}.block.3", c, 4 * c) + _linear(f"{p}.block.5", 4 * c, c)
        index += 1
        if stage < 3:
            p, c2 = f"features.{index}", widths[stage + 1]
            keys += [(f"{p}.0.weight", [c]), (f"{p}.0.bias", [c])]
            keys += [(f"{p}.1.weight", [c2, c, 2, 2]), (f"{p}.1.bias", [c2])]
            index += 1
    keys += [("classifier.0.weight", [768]), ("classifier.0.bias", [768])]
    return keys + _linear("classifier.2", 768, 1000)


def mobilenet_v2() -> Keys:
    """torchvision.models.mobilenet_v2(num_classes=1000)."""
    table = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
             (6, 160, 3, 2), (6, 320, 1, 1)]  # fmt: skip
    keys = _conv_bn("features.0", 3, 32, 3)
    cin, index = 32, 1
    for t, c, n, _ in table:
        for _ in range(n):
            p, hidden, m = f"features.{index}.conv", cin * t, 0
            if t != 1:
                keys += _conv_bn(f"{p}.0", cin, hidden, 1)
                m = 1
            keys += _conv_bn(f"{p}.{m}", hidden, hidden, 3, depthwise=True)
            keys += [(f"{p}.{m + 1}.weight", [c, hidden, 1, 1]), *_bn(f"{p}.{m + 2}", c)]
            cin, index = c, index + 1
    keys += _conv_bn(f"features.{index}", 320, 1280, 1)
    return keys + _linear("classifier.1", 1280, 1000)


V3_LARGE = [(16, 3, 16, 16, 0), (16, 3, 64, 24, 0), (24, 3, 72, 24, 0), (24, 5, 72, 40, 1),
            (40, 5, 120, 40, 1), (40, 5, 120, 40, 1), (40, 3, 240, 80, 0), (80, 3, 200, 80, 0),
            (80, 3, 184, 80, 0), (80, 3, 184, 80, 0), (80, 3, 480, 112, 1),
            (112, 3, 672, 112, 1), (112, 5, 672, 160, 1), (160, 5, 960, 160, 1),
            (160, 5, 960, 160, 1)]  # fmt: skip
V3_SMALL = [(16, 3, 16, 16, 1), (16, 3, 72, 24, 0), (24, 3, 88, 24, 0), (24, 5, 96, 40, 1),
            (40, 5, 240, 40, 1), (40, 5, 240, 40, 1), (40, 5, 120, 48, 1), (48, 5, 144, 48, 1),
            (48, 5, 288, 96, 1), (96, 5, 576, 96, 1), (96, 5, 576, 96, 1)]  # fmt: skip


def _mobilenet_v3(table: list[tuple[int, ...]], last: int) -> Keys:
    """torchvision MobileNetV3 (num_classes=1000): (in, kernel, expanded, out, se) rows."""
    keys = _conv_bn("features.0", 3, table[0][0], 3)
    for i, (cin, k, exp, cout, se) in enumerate(table, start=1):
        p, m = f"features.{i}.block", 0
        if exp != cin:
            keys += _conv_bn(f"{p}.0", cin, exp, 1)
            m = 1
        keys += _conv_bn(f"{p}.{m}", exp, exp, k, depthwise=True)
        m += 1
        if se:
            keys += _se(f"{p}.{m}", exp, _round8(exp // 4))
            m += 1
        keys += _conv_bn(f"{p}.{m}", exp, cout, 1)
    conv_out = 6 * table[-1][3]
    keys += _conv_bn(f"features.{len(table) + 1}", table[-1][3], conv_out, 1)
    return keys + _linear("classifier.0", conv_out, last) + _linear("classifier.3", last, 1000)


def mobilenet_v3_large() -> Keys:
    """torchvision.models.mobilenet_v3_large(num_classes=1000)."""
    return _mobilenet_v3(V3_LARGE, 1280)


def mobilenet_v3_small() -> Keys:
    """torchvision.models.mobilenet_v3_small(num_classes=1000)."""
    return _mobilenet_v3(V3_SMALL, 1024)


def efficientnet_b0() -> Keys:
    """torchvision.models.efficientnet_b0(num_classes=1000)."""
    stages = [(1, 3, 32, 16, 1), (6, 3, 16, 24, 2), (6, 5, 24, 40, 2), (6, 3, 40, 80, 3),
              (6, 5, 80, 112, 3), (6, 5, 112, 192, 4), (6, 3, 192, 320, 1)]  # fmt: skip
    keys = _conv_bn("features.0", 3, 32, 3)
    for s, (t, k, cin, cout, n) in enumerate(stages, start=1):
        for b in range(n):
            block_in = cin if b == 0 else cout
            p, exp, m = f"features.{s}.{b}.block", _round8(block_in * t), 0
            if exp != block_in:
                keys += _conv_bn(f"{p}.0", block_in, exp, 1)
                m = 1
            keys += _conv_bn(f"{p}.{m}", exp, exp, k, depthwise=True)
            keys += _se(f"{p}.{m + 1}", exp, max(1, block_in // 4))
            keys += _conv_bn(f"{p}.{m + 2}", exp, cout, 1)
    keys += _conv_bn("features.8", 320, 1280, 1)
    return keys + _linear("classifier.1", 1280, 1000)


def _vit(dim: int, patch: int, grid: int, dinov2: bool = False, registers: int = 0) -> Keys:
    """timm VisionTransformer (num_classes=0) / DINO / DINOv2 DinoVisionTransformer keys."""
    keys: Keys = [("cls_token", [1, 1, dim]), ("pos_embed", [1, 1 + grid * grid, dim])]
    if registers:
        keys.append(("register_tokens", [1, registers, dim]))
    if dinov2:
        keys.append(("mask_token", [1, dim]))
    keys += [("patch_embed.proj.weight", [dim, 3, patch, patch]), ("patch_embed.proj.bias", [dim])]
    for i in range(12):
        p = f"blocks.{i}"
        keys += [(f"{p}.norm1.weight", [dim]), (f"{p}.norm1.bias", [dim])]
        keys += _linear(f"{p}.attn.qkv", dim, 3 * dim) + _linear(f"{p}.attn.proj", dim, dim)
        keys += [(f"{p}.ls1.gamma", [dim])] if dinov2 else []
        keys += [(f"{p}.norm2.weight", [dim]), (f"{p}.norm2.bias", [dim])]
        keys += _linear(f"{p}.mlp.fc1", dim, 4 * dim) + _linear(f"{p}.mlp.fc2", 4 * dim, dim)
        keys += [(f"{p}.ls2.gamma", [dim])] if dinov2 else []
    return [*keys, ("norm.weight", [dim]), ("norm.bias", [dim])]


REFERENCES = {
    "convnext_tiny": convnext_tiny,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_large": mobilenet_v3_large,
    "mobilenet_v3_small": mobilenet_v3_small,
    "efficientnet_b0": efficientnet_b0,
    # timm vit_*_patch16_224 and DINO vit_* at 224 px: a 14x14 grid.
    "vit_small_patch16": lambda: _vit(384, 16, 14),
    "vit_base_patch16": lambda: _vit(768, 16, 14),
    # DINOv2 hub models: trained at 518 px, a 37x37 grid of 14-pixel patches.
    "vit_small_patch14_dinov2": lambda: _vit(384, 14, 37, dinov2=True),
    "vit_base_patch14_dinov2": lambda: _vit(768, 14, 37, dinov2=True),
    "vit_small_patch14_reg4_dinov2": lambda: _vit(384, 14, 37, dinov2=True, registers=4),
    "vit_base_patch14_reg4_dinov2": lambda: _vit(768, 14, 37, dinov2=True, registers=4),
}
SOURCES = {
    "convnext_tiny": "torchvision.models.convnext_tiny(num_classes=1000)",
    "mobilenet_v2": "torchvision.models.mobilenet_v2(num_classes=1000)",
    "mobilenet_v3_large": "torchvision.models.mobilenet_v3_large(num_classes=1000)",
    "mobilenet_v3_small": "torchvision.models.mobilenet_v3_small(num_classes=1000)",
    "efficientnet_b0": "torchvision.models.efficientnet_b0(num_classes=1000)",
    "vit_small_patch16": "timm vit_small_patch16_224(num_classes=0); DINO vit_small(16)",
    "vit_base_patch16": "timm vit_base_patch16_224(num_classes=0); DINO vit_base(16)",
    "vit_small_patch14_dinov2": "DINOv2 hub dinov2_vits14 (dinov2_vits14_pretrain.pth)",
    "vit_base_patch14_dinov2": "DINOv2 hub dinov2_vitb14 (dinov2_vitb14_pretrain.pth)",
    "vit_small_patch14_reg4_dinov2": "DINOv2 hub dinov2_vits14_reg (..._reg4_pretrain.pth)",
    "vit_base_patch14_reg4_dinov2": "DINOv2 hub dinov2_vitb14_reg (..._reg4_pretrain.pth)",
}


def fixture(arch: str) -> dict:
    return {"arch": arch, "reference": SOURCES[arch], "keys": REFERENCES[arch]()}


def main() -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for arch in REFERENCES:
        path = FIXTURES / f"{arch}.json"
        data = fixture(arch)
        lines = ",\n".join(json.dumps(list(k)) for k in data["keys"])
        head = json.dumps({"arch": arch, "reference": data["reference"]})[:-1]
        path.write_text(f'{head}, "keys": [\n{lines}\n]}}\n')
        print(f"{path}: {len(data['keys'])} keys")


if __name__ == "__main__":
    main()
