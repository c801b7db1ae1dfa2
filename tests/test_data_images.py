"""Image readers: every file kind ends as HxWx3 uint8 RGB; broken files fail naming the path."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFile

from pathlib import Path

from bestie.data.images import load_label_png, load_rgb
from bestie.errors import DataError


def test_rgb_png_exact(tmp_path):
    a = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) * 3
    Image.fromarray(a).save(tmp_path / "a.png")
    out = load_rgb(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (4, 5, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, a)


def test_grayscale_expands_to_three_equal_channels(tmp_path):
    g = np.array([[0, 10, 200], [255, 1, 2]], dtype=np.uint8)
    Image.fromarray(g, mode="L").save(tmp_path / "g.png")
    out = load_rgb(tmp_path / "g.png")
    assert out.shape == (2, 3, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)


def test_palette_image_uses_palette_colours(tmp_path):
    idx = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    im = Image.frombytes("P", (2, 2), idx.tobytes())
    pal = [0, 0, 0, 10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 9)
    im.putpalette(pal)
    im.save(tmp_path / "p.png")
    out = load_rgb(tmp_path / "p.png")
    np.testing.assert_array_equal(out[0, 1], [10, 20, 30])
    np.testing.assert_array_equal(out[1, 0], [200, 100, 50])
    np.testing.assert_array_equal(out[0, 0], [0, 0, 0])


def test_rgba_is_composited_on_black(tmp_path):
    a = np.zeros((1, 3, 4), dtype=np.uint8)
    a[0, 0] = (200, 100, 50, 128)  # half transparent: 200*128/255 = 100.4 -> 100, 50.2 -> 50, 25.1 -> 25
    a[0, 1] = (200, 100, 50, 255)  # opaque: unchanged
    a[0, 2] = (200, 100, 50, 0)  # transparent: black
    Image.fromarray(a, mode="RGBA").save(tmp_path / "a.png")
    out = load_rgb(tmp_path / "a.png")
    np.testing.assert_array_equal(out[0], [[100, 50, 25], [200, 100, 50], [0, 0, 0]])


def test_palette_transparency_and_la(tmp_path):
    idx = np.array([[0, 1]], dtype=np.uint8)
    im = Image.frombytes("P", (2, 1), idx.tobytes())
    im.putpalette([255, 255, 255, 10, 200, 30] + [0] * (254 * 3))
    im.info["transparency"] = 0
    im.save(tmp_path / "pt.png", transparency=0)
    out = load_rgb(tmp_path / "pt.png")
    np.testing.assert_array_equal(out[0], [[0, 0, 0], [10, 200, 30]])  # index 0 transparent -> black
    la = np.array([[[100, 255], [100, 51]]], dtype=np.uint8)  # grey 100, alpha 1.0 and 0.2
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    out = load_rgb(tmp_path / "la.png")
    np.testing.assert_array_equal(out[0], [[100, 100, 100], [20, 20, 20]])


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = load_rgb(tmp_path / "c.jpg")
    assert out.shape == (16, 16, 3)
    # C=0 M=Y=255 K=0 is pure red.
    assert np.abs(out.astype(int) - [255, 0, 0]).max() <= 6


def test_16bit_png_is_scaled_to_8bit(tmp_path):
    v = np.array([[0, 128, 129, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(v).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    out = load_rgb(tmp_path / "d.png")
    # round(v / 257): 0, 0.498 -> 0, 0.502 -> 1, 100, 255
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 1, 100, 255])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_exif_orientation_applied(tmp_path):
    a = np.zeros((16, 32, 3), dtype=np.uint8)
    a[:, :16] = (255, 0, 0)  # left half red
    a[:, 16:] = (0, 0, 255)  # right half blue
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the left edge becomes the top edge
    im.save(tmp_path / "e.jpg", exif=exif.tobytes(), quality=95)
    out = load_rgb(tmp_path / "e.jpg")
    assert out.shape == (32, 16, 3)
    assert out[:14, :, 0].mean() > 240 and out[:14, :, 2].mean() < 15  # top red
    assert out[18:, :, 2].mean() > 240 and out[18:, :, 0].mean() < 15  # bottom blue
    raw = load_rgb(tmp_path / "e.jpg", exif_transpose=False)
    assert raw.shape == (16, 32, 3)


def test_truncated_jpeg_raises_naming_path(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "t.jpg", quality=90)
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(DataError, match=r"t\.jpg.*truncated"):
        load_rgb(tmp_path / "t.jpg")


def test_missing_and_not_an_image(tmp_path):
    with pytest.raises(DataError, match=r"not found.*nope\.jpg"):
        load_rgb(tmp_path / "nope.jpg")
    (tmp_path / "text.jpg").write_text("hello, I am not a JPEG")
    with pytest.raises(DataError, match=r"text\.jpg"):
        load_rgb(tmp_path / "text.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.png"):
        load_rgb(tmp_path / "empty.png")
    with pytest.raises(DataError, match=r"not a regular file"):
        load_rgb(tmp_path)


def test_label_png_gives_palette_indices(tmp_path):
    idx = np.array([[0, 1, 255], [20, 3, 0]], dtype=np.uint8)
    im = Image.frombytes("P", (3, 2), idx.tobytes())
    im.putpalette([(i * 7) % 256 for i in range(768)])
    im.save(tmp_path / "l.png")
    out = load_label_png(tmp_path / "l.png")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, idx)
    Image.fromarray(idx, mode="L").save(tmp_path / "g.png")
    np.testing.assert_array_equal(load_label_png(tmp_path / "g.png"), idx)


def test_label_png_rejects_rgb_and_truncated(tmp_path):
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match=r"rgb\.png.*'RGB'"):
        load_label_png(tmp_path / "rgb.png")
    rng = np.random.default_rng(1)
    im = Image.frombytes("P", (64, 64), rng.integers(0, 21, 64 * 64, dtype=np.uint8).tobytes())
    im.putpalette(list(range(256)) * 3)
    im.save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) - 40])
    with pytest.raises(DataError, match=r"cut\.png"):
        load_label_png(tmp_path / "cut.png")


def test_image_size_reads_the_header_with_the_exif_orientation(tmp_path):
    from bestie.data.images import image_size

    src = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco128-voc" / "JPEGImages" / "2017_000030.jpg"
    if not src.is_file():
        pytest.skip(f"real data {src} is absent")
    with Image.open(src) as im:
        exif = im.getexif()
        exif[0x0112] = 6  # rotate 90: width and height swap when loaded
        im.save(tmp_path / "rot.jpg", exif=exif.tobytes())
        im.save(tmp_path / "plain.png")
    assert image_size(tmp_path / "rot.jpg") == load_rgb(tmp_path / "rot.jpg").shape[:2] == (640, 428)
    assert image_size(tmp_path / "rot.jpg", exif_transpose=False) == (428, 640)
    assert image_size(tmp_path / "plain.png") == load_rgb(tmp_path / "plain.png").shape[:2] == (428, 640)
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"cannot read image .*junk\.jpg"):
        image_size(tmp_path / "junk.jpg")
    with pytest.raises(DataError, match=r"image file not found: .*none\.jpg"):
        image_size(tmp_path / "none.jpg")
