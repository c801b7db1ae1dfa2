"""Augmentations: geometry of maps and points stays consistent; crop padding is 255 (ignore)."""

from __future__ import annotations

import numpy as np
import pytest

from bestie.data.transforms import (
    DEFAULT_SCALES,
    MEAN_PIXEL,
    Compose,
    PhotometricDistortion,
    RandomCrop,
    RandomHFlip,
    RandomScale,
    ResizeLong,
    hflip,
    normalize,
    photometric_distortion,
    random_crop,
    random_scale,
    resize,
    resize_long,
    resize_short,
)
from bestie.errors import DataError


def block_sample(h: int = 39, w: int = 48, block: int = 3) -> dict:
    """Label map of block x block tiles, each with its own value 1..254; one point at each tile centre."""
    gy, gx = h // block, w // block
    vals = (np.arange(gy * gx) % 254 + 1).astype(np.uint8).reshape(gy, gx)
    sem = np.kron(vals, np.ones((block, block), np.uint8))
    cy, cx = np.mgrid[0:gy, 0:gx]
    c = block // 2
    pts = np.stack([cx.ravel() * block + c, cy.ravel() * block + c, np.zeros(gy * gx), np.ones(gy * gx)], 1)
    img = np.stack([sem, 255 - sem, sem // 2], axis=2).astype(np.uint8)
    return {"image": img, "semantic": sem, "points": pts.astype(np.float32), "id": "x"}


def point_values(sample: dict) -> np.ndarray:
    p = sample["points"]
    x = np.floor(p[:, 0] + 0.5).astype(int)
    y = np.floor(p[:, 1] + 0.5).astype(int)
    return sample["semantic"][y, x]


def test_resize_sizes_and_point_rule():
    s = block_sample(10, 20, 1)
    out = resize_short(s, 20)
    assert out["image"].shape == (20, 40, 3) and out["semantic"].shape == (20, 40)
    assert out["id"] == "x"
    # half-pixel rule: x' = (x + 0.5) * 2 - 0.5
    np.testing.assert_allclose(out["points"][:, 0], (s["points"][:, 0] + 0.5) * 2 - 0.5)
    assert resize_long(s, 10)["image"].shape == (5, 10, 3)
    assert resize_short(s, 20, max_long=30)["image"].shape == (15, 30, 3)
    assert resize(s, (7, 9))["semantic"].shape == (7, 9)
    # upscaling x2 with nearest neighbour: every source pixel becomes a 2x2 block
    np.testing.assert_array_equal(out["semantic"], np.kron(s["semantic"], np.ones((2, 2), np.uint8)))
    np.testing.assert_array_equal(point_values(out), point_values(s))
    assert s["semantic"].shape == (10, 20)  # input untouched


@pytest.mark.parametrize("scale", DEFAULT_SCALES)
def test_random_scale_points_stay_on_their_tile(scale):
    s = block_sample()
    out = random_scale(s, np.random.default_rng(0), scales=(scale,))
    assert out["image"].shape[:2] == (round(39 * scale), round(48 * scale))
    assert out["semantic"].dtype == np.uint8
    np.testing.assert_array_equal(point_values(out), point_values(s))
    # nearest neighbour creates no new label values
    assert set(np.unique(out["semantic"])) <= set(np.unique(s["semantic"]))


def test_crop_pads_labels_with_255_and_image_with_mean():
    img = np.full((10, 12, 3), 7, np.uint8)
    sem = np.zeros((10, 12), np.uint8)  # all background
    sem[4, 5] = 9
    masks = np.ones((1, 10, 12), bool)
    pts = np.array([[5, 4, 0, 1]], np.float32)
    s = {"image": img, "semantic": sem, "points": pts, "instance_masks": masks}
    out = random_crop(s, np.random.default_rng(3), 16)
    assert out["image"].shape == (16, 16, 3) and out["semantic"].shape == (16, 16)
    sem_o = out["semantic"]
    assert (sem_o == 255).sum() == 16 * 16 - 120  # every padded pixel is ignore, none is background
    assert (sem_o == 0).sum() == 119 and (sem_o == 9).sum() == 1
    pad = sem_o == 255
    np.testing.assert_array_equal(out["image"][pad], np.broadcast_to(MEAN_PIXEL, (pad.sum(), 3)))
    np.testing.assert_array_equal(out["image"][~pad], 7)
    np.testing.assert_array_equal(out["instance_masks"][0], ~pad)
    assert point_values(out).tolist() == [9]
    out = random_crop(s, np.random.default_rng(3), 16, label_pad=200, image_pad=(1, 2, 3))
    assert (out["semantic"] == 200).sum() == 136


def test_crop_shifts_and_drops_points():
    s = block_sample()
    for seed in range(20):
        out = random_crop(s, np.random.default_rng(seed), (20, 17))
        assert out["semantic"].shape == (20, 17) and out["image"].shape == (20, 17, 3)
        p = out["points"]
        assert 0 < len(p) < len(s["points"])  # a 20x17 crop of a 39x48 map loses points
        assert (p[:, 0] >= 0).all() and (p[:, 0] <= 16).all() and (p[:, 1] >= 0).all() and (p[:, 1] <= 19).all()
        # every tile fully inside the crop keeps its point; kept points still sit on their tile
        vals = point_values(out)
        src_vals = point_values(s)
        assert set(vals.tolist()) <= set(src_vals.tolist())
        kept_centres = {v for v in np.unique(out["semantic"]) if (out["semantic"] == v).sum() == 9}
        assert kept_centres <= set(vals.tolist())


def test_single_pixel_markers_through_upscale_crop_flip():
    """Every pixel has its own value: a point must land on exactly its own pixel (scales >= 1).

    The conf column carries each point's source value through the transforms, untouched."""
    h, w = 15, 16
    sem = np.arange(1, h * w + 1, dtype=np.uint8).reshape(h, w)
    yy, xx = np.mgrid[0:h, 0:w]
    pts = np.stack([xx.ravel(), yy.ravel(), np.zeros(h * w), sem.ravel()], 1).astype(np.float32)
    s = {"image": np.zeros((h, w, 3), np.uint8), "semantic": sem, "points": pts}
    pipe = Compose([RandomScale((1.0, 1.1, 1.2, 1.3)), RandomCrop(12), RandomHFlip()])
    for seed in range(30):
        out = pipe(s, np.random.default_rng(seed))
        p = out["points"]
        assert len(p) > 0
        np.testing.assert_array_equal(point_values(out), p[:, 3].astype(np.uint8))


def test_hflip():
    s = block_sample()
    out = hflip(s, np.random.default_rng(0), p=1.0)
    np.testing.assert_array_equal(out["semantic"], s["semantic"][:, ::-1])
    np.testing.assert_array_equal(out["image"], s["image"][:, ::-1])
    np.testing.assert_allclose(out["points"][:, 0], 47 - s["points"][:, 0])
    np.testing.assert_array_equal(point_values(out), point_values(s))
    same = hflip(s, np.random.default_rng(0), p=0.0)
    np.testing.assert_array_equal(same["semantic"], s["semantic"])
    # the flip of a single-pixel marker at column 0 lands at column W-1
    one = {"image": np.zeros((3, 5, 3), np.uint8), "semantic": np.zeros((3, 5), np.uint8),
           "points": np.array([[0, 1, 0, 1]], np.float32), "instance_masks": np.zeros((1, 3, 5), bool)}
    one["semantic"][1, 0] = 5
    one["instance_masks"][0, 1, 0] = True
    f = hflip(one, np.random.default_rng(0), p=1.0)
    assert f["semantic"][1, 4] == 5 and f["instance_masks"][0, 1, 4] and f["points"][0, 0] == 4


def test_full_pipeline_keeps_points_on_their_tile_and_is_deterministic():
    s = block_sample(60, 75, 3)
    pipe = Compose([PhotometricDistortion(), ResizeLong(60), RandomScale(), RandomCrop(40), RandomHFlip()])
    for seed in range(25):
        a = pipe(s, np.random.default_rng(seed))
        b = pipe(s, np.random.default_rng(seed))
        for k in ("image", "semantic", "points"):
            np.testing.assert_array_equal(a[k], b[k])
        assert a["image"].shape == (40, 40, 3) and a["semantic"].shape == (40, 40)
        vals = point_values(a)
        assert (vals != 255).all()  # no point on padding
        src = dict(zip(map(tuple, s["points"][:, :2].tolist()), point_values(s).tolist()))
        assert set(vals.tolist()) <= set(src.values())


def test_photometric_only_touches_image_and_keeps_gray_gray():
    rng = np.random.default_rng(0)
    g = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    s = {"image": np.repeat(g[:, :, None], 3, axis=2), "semantic": g.copy(), "points": np.ones((2, 4), np.float32)}
    changed = 0
    for seed in range(10):
        out = photometric_distortion(s, np.random.default_rng(seed))
        assert out["image"].dtype == np.uint8 and out["image"].shape == (20, 30, 3)
        assert out["semantic"] is s["semantic"] and out["points"] is s["points"]
        # saturation and hue leave a gray image gray; brightness / contrast keep R = G = B
        assert np.abs(out["image"].astype(int) - out["image"][..., :1]).max() <= 1
        changed += int(not np.array_equal(out["image"], s["image"]))
    assert changed >= 5
    col = {"image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)}
    assert not all(
        np.array_equal(photometric_distortion(col, np.random.default_rng(k))["image"], col["image"]) for k in range(5)
    )


def test_normalize():
    img = np.zeros((2, 3, 3), np.uint8)
    img[0, 0] = (255, 0, 51)
    out = normalize(img, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert out.shape == (3, 2, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0, 0], [1.0, -1.0, (0.2 - 0.5) / 0.5], atol=1e-6)
    np.testing.assert_allclose(normalize(img)[0, 0, 0], (1.0 - 0.485) / 0.229, rtol=1e-6)


def test_bad_samples_raise():
    with pytest.raises(DataError, match="image"):
        hflip({"image": np.zeros((4, 4), np.uint8)}, np.random.default_rng(0))
    with pytest.raises(DataError, match="semantic"):
        random_crop({"image": np.zeros((4, 4, 3), np.uint8), "semantic": np.zeros((3, 4), np.uint8)},
                    np.random.default_rng(0), 2)
    with pytest.raises(DataError, match="points"):
        resize({"image": np.zeros((4, 4, 3), np.uint8), "points": np.zeros((2, 3))}, (2, 2))


def test_instance_masks_follow_the_map():
    s = block_sample()
    s["instance_masks"] = np.stack([s["semantic"] == v for v in (1, 20, 40)])
    out = Compose([RandomScale(), RandomCrop(30), RandomHFlip()])(s, np.random.default_rng(11))
    for k, v in enumerate((1, 20, 40)):
        np.testing.assert_array_equal(out["instance_masks"][k], out["semantic"] == v)
