"""Tests of bestie.targets (pseudo instance labels, METHOD.md section 4) on hand-made maps and real data."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bestie.errors import ConfigError, DataError
from bestie.params import PseudoLabelParams
from bestie.targets import draw_gaussian, gaussian_kernel, make_pseudo_instance_labels

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128-voc"
POINT = PseudoLabelParams(setting="point")


def gauss_at(h, w, cy, cx, sigma=6.0):
    """Independent reference: the kernel on the integer grid, |dy|, |dx| <= 3 sigma + 1, 0 elsewhere."""
    yy, xx = np.mgrid[0:h, 0:w]
    g = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    r = int(round(3 * sigma + 1))
    g[(np.abs(yy - cy) > r) | (np.abs(xx - cx) > r)] = 0
    return g.astype(np.float32)


def test_gaussian_kernel_size_and_values():
    g = gaussian_kernel(6.0)
    assert g.shape == (39, 39)  # 6 sigma + 3
    assert g[19, 19] == 1.0
    assert g[19 + 3, 19 + 4] == pytest.approx(math.exp(-25 / 72), rel=1e-6)
    assert g[0, 0] == pytest.approx(math.exp(-(19**2 * 2) / 72), rel=1e-5)
    assert gaussian_kernel(2).shape == (15, 15)
    with pytest.raises(ConfigError):
        gaussian_kernel(0)


def test_draw_gaussian_clips_at_border_and_keeps_maximum():
    heat = np.zeros((10, 12), np.float32)
    heat[5, 5] = 0.99
    draw_gaussian(heat, 0, 0, gaussian_kernel(6))
    assert heat[0, 0] == 1.0
    assert heat[2, 3] == pytest.approx(math.exp(-13 / 72), rel=1e-6)
    assert heat[5, 5] == pytest.approx(0.99)  # exp(-50/72) = 0.5 < 0.99: the maximum is kept
    np.testing.assert_allclose(heat[:, 6:], gauss_at(10, 12, 0, 0)[:, 6:], rtol=1e-6)
    before = heat.copy()
    draw_gaussian(heat, -1, 3, gaussian_kernel(6))  # outside the image: nothing
    draw_gaussian(heat, 12, 3, gaussian_kernel(6))
    np.testing.assert_array_equal(heat, before)
    other = np.zeros((10, 12), np.float32)
    draw_gaussian(other, 11, 9, gaussian_kernel(6))  # bottom-right corner
    np.testing.assert_allclose(other, gauss_at(10, 12, 9, 11), rtol=1e-6)


def test_one_point_component_image_setting_exact():
    wsss = np.zeros((40, 50), np.uint8)
    wsss[5:15, 10:30] = 3  # class 2, rows 5..14, cols 10..29: 200 px, mean (y, x) = (9.5, 19.5)
    wsss[30:35, 0:3] = 255
    pts = np.array([[12.4, 6.6, 2, 0.9]], np.float32)  # pixel (7, 12), inside
    out = make_pseudo_instance_labels(wsss, [2], pts, num_classes=4)
    comp = wsss == 3
    # centroid (9.5, 19.5) -> nearest pixel with floor(v + 0.5): (10, 20) (the public code truncates: (9, 19))
    assert out["num_instances"] == 1
    assert out["center"].shape == (4, 40, 50) and out["center"].dtype == np.float32
    np.testing.assert_allclose(out["center"][2], gauss_at(40, 50, 10, 20), rtol=1e-6, atol=0)
    assert not out["center"][[0, 1, 3]].any()
    yy, xx = np.mgrid[0:40, 0:50]
    np.testing.assert_array_equal(out["offset"][0], np.where(comp, 10 - yy, 0).astype(np.float32))
    np.testing.assert_array_equal(out["offset"][1], np.where(comp, 20 - xx, 0).astype(np.float32))
    np.testing.assert_array_equal(out["weight"], comp.astype(np.float32))


def test_centroid_without_tie():
    wsss = np.zeros((30, 40), np.uint8)
    wsss[4:13, 3:24] = 1  # rows 4..12 (mean 8), cols 3..23 (mean 13)
    wsss[4, 3] = 0  # mean y = (9*21*8 - 4) / 188, mean x = (9*21*13 - 3) / 188
    out = make_pseudo_instance_labels(wsss, [0], [[5, 5, 0, 1.0]], num_classes=1)
    my, mx = (9 * 21 * 8 - 4) / 188, (9 * 21 * 13 - 3) / 188  # 8.02, 13.05
    cy, cx = int(math.floor(my + 0.5)), int(math.floor(mx + 0.5))
    assert (cy, cx) == (8, 13)
    assert np.unravel_index(np.argmax(out["center"][0]), (30, 40)) == (8, 13)
    assert out["offset"][0, 12, 23] == 8 - 12 and out["offset"][1, 12, 23] == 13 - 23


def test_two_points_or_none_give_no_instance():
    wsss = np.zeros((40, 60), np.uint8)
    wsss[2:12, 2:12] = 1  # two points
    wsss[20:30, 2:12] = 1  # no point
    wsss[2:12, 30:40] = 1  # one point -> the only instance
    pts = np.array([[3, 3, 0, 0.9], [8, 8, 0, 0.95], [35, 5, 0, 0.8]], np.float32)
    out = make_pseudo_instance_labels(wsss, [0], pts, num_classes=1)
    assert out["num_instances"] == 1
    assert out["weight"][2:12, 2:12].sum() == 0 and out["weight"][20:30, 2:12].sum() == 0
    assert out["weight"][2:12, 30:40].min() == 1 and out["weight"].sum() == 100
    assert not out["offset"][:, 2:12, 2:12].any() and not out["offset"][:, 20:30].any()
    # only one Gaussian, at the accepted component's centroid (6.5, 34.5) -> (7, 35)
    np.testing.assert_allclose(out["center"][0], gauss_at(40, 60, 7, 35), rtol=1e-6)


def test_diagonal_touch_is_one_component_8_connectivity():
    wsss = np.zeros((30, 30), np.uint8)
    wsss[0:8, 0:8] = 1
    wsss[8:16, 8:16] = 1  # touches the first square only at a corner
    pts = np.array([[2, 2, 0, 1.0], [12, 12, 0, 1.0]], np.float32)
    out = make_pseudo_instance_labels(wsss, [0], pts, num_classes=1)
    assert out["num_instances"] == 0 and out["weight"].sum() == 0


def test_small_components_dropped():
    wsss = np.zeros((30, 40), np.uint8)
    wsss[1:8, 1:8] = 1  # 49 px
    wsss[12:17, 1:11] = 1  # 50 px
    pts = np.array([[3, 3, 0, 1.0], [4, 14, 0, 1.0]], np.float32)
    out = make_pseudo_instance_labels(wsss, [0], pts, num_classes=1)
    assert out["num_instances"] == 1
    assert out["weight"][1:8, 1:8].sum() == 0
    assert out["weight"][12:17, 1:11].min() == 1 and out["weight"].sum() == 50
    out49 = make_pseudo_instance_labels(wsss, [0], pts, num_classes=1, params=PseudoLabelParams(min_area=49))
    assert out49["num_instances"] == 2


def test_point_filters_threshold_class_and_image():
    wsss = np.zeros((30, 60), np.uint8)
    wsss[2:12, 2:12] = 1
    wsss[2:12, 20:30] = 2  # class 1 is not in the labels
    wsss[15:25, 2:12] = 1
    pts = np.array(
        [
            [5, 5, 0, 0.9],
            [7, 7, 0, 0.69],  # below the 0.7 threshold: ignored, so the first component has one point
            [25, 5, 1, 1.0],  # class not present
            [5, 20, 0, 0.7],  # exactly the threshold: kept
            [100, 5, 0, 1.0],  # outside the image
        ],
        np.float32,
    )
    out = make_pseudo_instance_labels(wsss, [0], pts, num_classes=2)
    assert out["num_instances"] == 2
    assert out["weight"][2:12, 20:30].sum() == 0
    assert out["weight"].sum() == 200
    out2 = make_pseudo_instance_labels(wsss, [0], pts, num_classes=2, params=PseudoLabelParams(point_threshold=0.5))
    assert out2["num_instances"] == 1  # now the first component holds two points


def test_point_setting_gaussians_at_points_offsets_to_point():
    wsss = np.zeros((50, 60), np.uint8)
    wsss[2:12, 2:22] = 1  # one point -> accepted
    wsss[20:30, 2:12] = 1  # two points -> rejected, but both Gaussians drawn
    wsss[35:45, 40:50] = 2  # class 1, one point
    pts = np.array(
        [[4, 3, 0, 1.0], [3, 22, 0, 1.0], [9, 28, 0, 1.0], [44, 36, 1, 1.0], [55, 45, 2, 1.0]], np.float32
    )
    out = make_pseudo_instance_labels(wsss, [0, 1], pts, num_classes=3, params=PseudoLabelParams(setting="point"))
    expect0 = np.maximum.reduce([gauss_at(50, 60, 3, 4), gauss_at(50, 60, 22, 3), gauss_at(50, 60, 28, 9)])
    np.testing.assert_allclose(out["center"][0], expect0, rtol=1e-6)
    np.testing.assert_allclose(out["center"][1], gauss_at(50, 60, 36, 44), rtol=1e-6)
    assert not out["center"][2].any()  # class 2 absent from the labels
    assert out["num_instances"] == 2
    yy, xx = np.mgrid[0:50, 0:60]
    comp = wsss == 1
    comp[20:30] = False
    comp1 = wsss == 2
    np.testing.assert_array_equal(out["weight"], (comp | comp1).astype(np.float32))
    exp_dy = np.where(comp, 3 - yy, 0) + np.where(comp1, 36 - yy, 0)
    exp_dx = np.where(comp, 4 - xx, 0) + np.where(comp1, 44 - xx, 0)
    np.testing.assert_array_equal(out["offset"][0], exp_dy)
    np.testing.assert_array_equal(out["offset"][1], exp_dx)


def test_point_on_row_and_column_zero_counts():
    wsss = np.zeros((30, 30), np.uint8)
    wsss[0:10, 0:10] = 1
    for setting in ("image", "point"):
        out = make_pseudo_instance_labels(wsss, [0], [[0, 0, 0, 1.0]], num_classes=1,
                                          params=PseudoLabelParams(setting=setting))
        assert out["num_instances"] == 1, setting
        assert out["weight"][0:10, 0:10].min() == 1
    out = make_pseudo_instance_labels(wsss, [0], [[0, 0, 0, 1.0]], num_classes=1, params=POINT)
    assert out["center"][0, 0, 0] == 1.0
    assert out["offset"][0, 9, 9] == -9 and out["offset"][1, 9, 9] == -9
    # a point on column 0 only
    out = make_pseudo_instance_labels(wsss, [0], [[0, 7, 0, 1.0]], num_classes=1, params=POINT)
    assert out["num_instances"] == 1 and out["center"][0, 7, 0] == 1.0


def test_two_hundred_points_of_one_class():
    # 10 x 20 grid of 8x8 blocks (64 px each) separated by one background line, one point per block
    wsss = np.zeros((90, 180), np.uint8)
    pts = []
    for i in range(10):
        for j in range(20):
            wsss[9 * i : 9 * i + 8, 9 * j : 9 * j + 8] = 6
            pts.append([9 * j + (i % 8), 9 * i + (j % 8), 5, 1.0])  # includes x = 0 and y = 0
    pts = np.array(pts, np.float32)
    for setting in ("image", "point"):
        out = make_pseudo_instance_labels(wsss, [5], pts, num_classes=20, params=PseudoLabelParams(setting=setting))
        assert out["num_instances"] == 200
        np.testing.assert_array_equal(out["weight"], (wsss == 6).astype(np.float32))
    peaks = out["center"][5][pts[:, 1].astype(int), pts[:, 0].astype(int)]
    np.testing.assert_array_equal(peaks, np.ones(200, np.float32))


def test_numpy_types_object_arrays_tensors():
    wsss = np.zeros((30, 30), np.int64)
    wsss[3:13, 3:13] = 2
    wsss[20:25, 20:25] = 255
    ref = make_pseudo_instance_labels(wsss.astype(np.uint8), [1], np.array([[5, 5, 1, 0.9]], np.float32), num_classes=3)
    variants = [
        (wsss, np.array([1], np.uint8), np.array([[5, 5, np.int64(1), 0.9]], dtype=object)),
        (wsss.astype(np.int32), [np.int64(1)], [[np.float64(5), 5, 1, np.float32(0.9)]]),
        (torch.from_numpy(wsss), torch.tensor([1]), torch.tensor([[5.0, 5.0, 1.0, 0.9]])),
        (wsss.astype(np.uint16), (1,), np.array([[5, 5, 1, 0.9]], np.float64)),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for w_, l_, p_ in variants:
            out = make_pseudo_instance_labels(w_, l_, p_, num_classes=3)
            for key in ("center", "offset", "weight"):
                np.testing.assert_array_equal(out[key], ref[key])
            assert out["num_instances"] == 1
    empty = make_pseudo_instance_labels(wsss, [1], np.zeros((0, 4), np.float32), num_classes=3)
    assert empty["num_instances"] == 0 and not empty["weight"].any()
    assert make_pseudo_instance_labels(wsss, [1], None, num_classes=3)["num_instances"] == 0
    assert make_pseudo_instance_labels(wsss, [1], [], num_classes=3)["num_instances"] == 0


def test_bad_inputs_raise_clear_errors():
    wsss = np.zeros((10, 10), np.uint8)
    with pytest.raises(DataError, match="shape"):
        make_pseudo_instance_labels(wsss, [0], np.zeros((3, 3)), num_classes=2)
    with pytest.raises(DataError, match="class"):
        make_pseudo_instance_labels(wsss, [0], [[1, 1, 5, 1.0]], num_classes=2)
    with pytest.raises(DataError, match="class"):
        make_pseudo_instance_labels(wsss, [2], [], num_classes=2)
    with pytest.raises(DataError, match="non-finite"):
        make_pseudo_instance_labels(wsss, [0], [[np.nan, 1, 0, 1.0]], num_classes=2)
    with pytest.raises(DataError, match="label map"):
        make_pseudo_instance_labels(np.zeros((2, 10, 10), np.uint8), [0], [], num_classes=2)
    with pytest.raises(DataError, match="0..255"):
        make_pseudo_instance_labels(np.full((10, 10), 300), [0], [], num_classes=2)
    with pytest.raises(DataError, match="integer dtype"):
        make_pseudo_instance_labels(np.zeros((10, 10), np.float32), [0], [], num_classes=2)
    with pytest.raises(ConfigError, match="setting"):
        make_pseudo_instance_labels(wsss, [0], [], num_classes=2, params=PseudoLabelParams(setting="box"))
    with pytest.raises(ConfigError, match="num_classes"):
        make_pseudo_instance_labels(wsss, [0], [], num_classes=0)


def reference_pseudo_weight(wsss, labels, pts, min_area=50):
    """Independent loop implementation over cv2.connectedComponentsWithStats (as the public code)."""
    weight = np.zeros(wsss.shape, np.float32)
    for c in labels:
        n, lab, stats, _ = cv2.connectedComponentsWithStats((wsss == c + 1).astype(np.uint8), connectivity=8)
        for k in range(1, n):
            if stats[k, cv2.CC_STAT_AREA] < min_area:
                continue
            inside = sum(1 for x, y, pc, _ in pts if pc == c and lab[int(y), int(x)] == k)
            if inside == 1:
                weight[lab == k] = 1
    return weight


def test_matches_loop_reference_on_random_blobs():
    rng = np.random.default_rng(7)
    for trial in range(4):
        noise = cv2.GaussianBlur(rng.random((120, 160)).astype(np.float32), (0, 0), 4)
        wsss = np.digitize(noise, np.quantile(noise, [0.4, 0.7])).astype(np.uint8)  # 0, 1, 2
        wsss[rng.random(wsss.shape) < 0.01] = 255
        pts = [[rng.integers(0, 160), rng.integers(0, 120), rng.integers(0, 2), 1.0] for _ in range(25)]
        pts = np.array(pts, np.float32)
        out = make_pseudo_instance_labels(wsss, [0, 1], pts, num_classes=2)
        ref = reference_pseudo_weight(wsss, [0, 1], pts)
        np.testing.assert_array_equal(out["weight"], ref)
        assert ref.sum() > 0 or trial > 0


def _voc_instances(stem):
    from PIL import Image

    cls = np.array(Image.open(DATA / "SegmentationClass" / f"{stem}.png"))
    obj = np.array(Image.open(DATA / "SegmentationObject" / f"{stem}.png"))
    return cls, obj


@pytest.mark.skipif(not DATA.is_dir(), reason=f"real data folder {DATA} absent")
def test_real_voc_gt_instances_as_points():
    """GT class map as WSSS, one point inside every GT instance: each instance that forms its own
    component (>= 50 px, no other instance of its class touching it) must become exactly that instance."""
    stems = sorted(p.stem for p in (DATA / "SegmentationObject").glob("*.png"))[:12]
    assert stems
    accepted_total = 0
    for stem in stems:
        cls, obj = _voc_instances(stem)
        ids = [i for i in np.unique(obj) if i not in (0, 255)]
        pts, labels = [], set()
        for i in ids:
            m = obj == i
            c = int(np.bincount(cls[m]).argmax()) - 1
            ys, xs = np.nonzero(m & (cls == c + 1))
            j = len(ys) // 2
            pts.append([xs[j], ys[j], c, 1.0])
            labels.add(c)
        pts = np.array(pts, np.float32).reshape(-1, 4)
        out = make_pseudo_instance_labels(cls, sorted(labels), pts, num_classes=20)
        ref = reference_pseudo_weight(cls, sorted(labels), pts)
        np.testing.assert_array_equal(out["weight"], ref)
        accepted_total += out["num_instances"]
        # offsets point to a pixel whose center map value is 1 (the Gaussian peak) for every weighted pixel
        w = out["weight"] > 0
        if w.any():
            ys, xs = np.nonzero(w)
            ty = ys + out["offset"][0][w].astype(int)
            tx = xs + out["offset"][1][w].astype(int)
            peak = out["center"].max(axis=0)[ty, tx]
            np.testing.assert_array_equal(peak, np.ones_like(peak))
    assert accepted_total > 0


def _random_scene(rng, h=120, w=160, n_points=25):
    noise = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 4)
    wsss = np.digitize(noise, np.quantile(noise, [0.4, 0.7])).astype(np.uint8)  # 0, 1, 2
    wsss[rng.random(wsss.shape) < 0.01] = 255
    pts = np.array([[rng.integers(0, w), rng.integers(0, h), rng.integers(0, 2), rng.choice([0.5, 1.0])]
                    for _ in range(n_points)], np.float32)
    return wsss, pts


def test_batched_device_rendering_equals_the_dense_pseudo_labels():
    """render_targets over a batch (the training step's path) = make_pseudo_instance_labels per sample,
    exactly, in both settings; Gaussians near the border are clipped alike."""
    from bestie.instance_data import collate_compact
    from bestie.targets import pseudo_instance_components, render_targets

    rng = np.random.default_rng(11)
    scenes = [_random_scene(rng) for _ in range(3)]
    scenes[1][1][:3] = [[0, 0, 0, 1.0], [159, 119, 1, 1.0], [2, 117, 0, 1.0]]  # corner / border points
    for setting in ("image", "point"):
        params = PseudoLabelParams(setting=setting, min_area=30)
        samples, refs = [], []
        for wsss, pts in scenes:
            comp = pseudo_instance_components(wsss, [0, 1], pts, num_classes=3, params=params)
            samples.append({k: torch.from_numpy(np.asarray(comp[k])) for k in ("components", "table", "gaussians")})
            refs.append(make_pseudo_instance_labels(wsss, [0, 1], pts, num_classes=3, params=params))
        batch = collate_compact(samples)
        out = render_targets(batch["components"], batch["table"], batch["gaussians"], batch["first_row"],
                             num_classes=3, sigma=params.sigma)
        assert sum(r["num_instances"] for r in refs) >= 3
        for b, ref in enumerate(refs):
            for key in ("center", "offset", "weight"):
                np.testing.assert_array_equal(out[key][b].numpy(), ref[key], err_msg=f"{setting} {b} {key}")


def test_compact_components_hand_case():
    """Two class-0 components (one point: accepted; two points: rejected), one class-1 component without a
    point, one component below min_area: ids in class / label order, the table's targets and Gaussians."""
    from bestie.targets import pseudo_instance_components

    wsss = np.zeros((30, 40), np.uint8)
    wsss[2:8, 2:12] = 1  # 60 px, point at (x 4, y 3) -> centroid (y 4.5 -> 5, x 6.5 -> 7)
    wsss[12:20, 2:12] = 1  # 80 px, two points
    wsss[22:24, 30:32] = 1  # 4 px < min_area
    wsss[2:12, 20:30] = 2  # class 1, no point
    pts = np.array([[4, 3, 0, 1.0], [3, 13, 0, 1.0], [9, 18, 0, 1.0], [30, 22, 0, 1.0]], np.float32)
    for setting, target in (("image", [5, 7]), ("point", [3, 4])):
        c = pseudo_instance_components(wsss, [0, 1], pts, num_classes=2,
                                       params=PseudoLabelParams(setting=setting, min_area=10))
        np.testing.assert_array_equal(c["table"], [[0, *target, 1], [0, -1, -1, 0], [1, -1, -1, 0]])
        assert c["components"].dtype == np.int16 and c["num_instances"] == 1
        assert (c["components"][2:8, 2:12] == 1).all() and (c["components"][12:20, 2:12] == 2).all()
        assert (c["components"][2:12, 20:30] == 3).all() and c["components"][22, 30] == 0
        assert int((c["components"] > 0).sum()) == 60 + 80 + 100
        gauss = [[0, *target]] if setting == "image" else [[0, 3, 4], [0, 13, 3], [0, 18, 9], [0, 22, 30]]
        np.testing.assert_array_equal(c["gaussians"], gauss)


def test_split_by_points_nearest_point_hand_case():
    """A 2 x 6 strip split by points at columns 0 and 5: three columns each; ties go to the lower index;
    a second point on the same pixel gets an empty part."""
    from bestie.targets import split_by_points

    mask = np.zeros((4, 8), bool)
    mask[1:3, 1:7] = True
    parts = split_by_points(mask, [1, 2], [1, 6])
    np.testing.assert_array_equal(parts[1], [0, 1, 1, 1, 2, 2, 2, 0])
    np.testing.assert_array_equal(parts[2], [0, 1, 1, 1, 2, 2, 2, 0])
    assert not parts[0].any() and not parts[3].any()
    tie = split_by_points(np.ones((1, 3), bool), [0, 0], [0, 2])  # the middle pixel is equidistant
    np.testing.assert_array_equal(tie, [[1, 1, 2]])
    same = split_by_points(mask, [1, 1], [1, 1])
    assert (same[mask] == 1).all()
    with pytest.raises(ValueError):
        split_by_points(mask, [], [])


def test_split_components_gives_one_instance_per_point():
    """A 10 x 40 component of class 0 with two points becomes two pseudo instances with split_components (the
    halves, centroids at their centres), none without (the paper); a part below min_area is kept as a
    component but not accepted; host and batched device renders agree."""
    from bestie.instance_data import collate_compact
    from bestie.stages.score_baseline import baseline_instances
    from bestie.targets import pseudo_instance_components, render_targets

    wsss = np.zeros((20, 50), np.uint8)
    wsss[5:15, 5:45] = 1
    pts = np.array([[10, 9, 0, 0.9], [39, 10, 0, 0.8]], np.float32)  # nearest-point boundary between x 24 / 25
    paper = pseudo_instance_components(wsss, [0], pts, num_classes=1, params=PseudoLabelParams(min_area=50))
    assert paper["num_instances"] == 0
    params = PseudoLabelParams(min_area=50, split_components=True)
    c = pseudo_instance_components(wsss, [0], pts, num_classes=1, params=params)
    assert c["num_instances"] == 2
    assert (c["components"][5:15, 5:25] == 1).all() and (c["components"][5:15, 25:45] == 2).all()
    # centroids: rows 5..14 -> 9.5 -> 10; columns 5..24 -> 14.5 -> 15 and 25..44 -> 34.5 -> 35
    np.testing.assert_array_equal(c["table"], [[0, 10, 15, 1], [0, 10, 35, 1]])
    dense = make_pseudo_instance_labels(wsss, [0], pts, num_classes=1, params=params)
    assert dense["weight"].sum() == 400 and dense["offset"][:, 10, 15].tolist() == [0, 0]
    assert dense["offset"][:, 5, 44].tolist() == [5, -9]
    comp_t = {k: torch.from_numpy(np.asarray(c[k])) for k in ("components", "table", "gaussians")}
    batch = collate_compact([comp_t])
    out = render_targets(batch["components"], batch["table"], batch["gaussians"], batch["first_row"],
                         num_classes=1, sigma=params.sigma)
    for key in ("center", "offset", "weight"):
        np.testing.assert_array_equal(out[key][0].numpy(), dense[key], err_msg=key)
    # the baseline scores exactly these masks, each with the conf of its point
    base = baseline_instances(wsss, [0], pts, params, num_classes=1)
    assert base["masks"].sum(axis=(1, 2)).tolist() == [200, 200]
    np.testing.assert_allclose(base["scores"], [0.9, 0.8])
    # a point near the end cuts off a part below min_area: that part is not an instance
    pts_edge = np.array([[10, 10, 0, 0.9], [44, 10, 0, 0.8], [42, 10, 0, 0.8]], np.float32)
    e = pseudo_instance_components(wsss, [0], pts_edge, num_classes=1, params=params)
    # parts (ties to the lower index): x 5..26 to the first point, x 43..44 (20 px) to the second, x 27..42
    # to the third
    assert e["table"][:, 3].tolist() == [1, 0, 1] and e["num_instances"] == 2
    assert [int((e["components"] == k).sum()) for k in (1, 2, 3)] == [220, 20, 160]
    # the point setting points the offsets of each part to its own point
    p = pseudo_instance_components(wsss, [0], pts, num_classes=1,
                                   params=PseudoLabelParams(setting="point", min_area=50, split_components=True))
    np.testing.assert_array_equal(p["table"], [[0, 9, 10, 1], [0, 10, 39, 1]])


def test_split_components_rejects_non_bool():
    with pytest.raises(ConfigError, match="split_components"):
        PseudoLabelParams(split_components="yes")
