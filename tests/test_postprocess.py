"""Tests of bestie.postprocess (inference grouping, METHOD.md section 4) on crafted predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bestie.errors import ConfigError, DataError
from bestie.postprocess import (
    scaled_grouping,
    SOURCE_CENTER,
    SOURCE_CLUSTER,
    SOURCE_FALLBACK,
    cluster_centers,
    find_instance_centers,
    get_instances,
    group_pixels,
    instance_peaks,
    semantic_argmax,
    supported_centers,
)
from bestie.params import GroupingParams
from bestie.targets import make_pseudo_instance_labels

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128-voc"


def torch_nms_reference(ctr, threshold, kernel):
    """Panoptic-DeepLab's find_instance_center, written with torch max_pool2d."""
    t = F.threshold(torch.from_numpy(ctr)[None, None], threshold, -1)
    pooled = F.max_pool2d(t, kernel, stride=1, padding=(kernel - 1) // 2)
    t[t != pooled] = -1
    return torch.nonzero(t[0, 0] > 0).numpy()


def _nms(center_threshold: float, nms_kernel: int) -> GroupingParams:
    return GroupingParams(center_threshold=center_threshold, nms_kernel=nms_kernel)


def test_find_instance_centers_matches_maxpool_reference():
    rng = np.random.default_rng(0)
    for kernel in (3, 7, 41):
        ctr = rng.random((37, 53)).astype(np.float32)
        ctr[ctr < 0.6] = 0
        got = find_instance_centers(ctr, _nms(0.3, kernel))
        np.testing.assert_array_equal(got, torch_nms_reference(ctr, 0.3, kernel))
    ctr = np.zeros((20, 20), np.float32)
    ctr[5, 5], ctr[5, 6], ctr[15, 15] = 0.5, 0.5, 0.2  # plateau: both tied pixels kept
    np.testing.assert_array_equal(find_instance_centers(torch.from_numpy(ctr), _nms(0.1, 5)),
                                  [[5, 5], [5, 6], [15, 15]])
    np.testing.assert_array_equal(find_instance_centers(ctr, _nms(0.3, 5)), [[5, 5], [5, 6]])
    np.testing.assert_array_equal(find_instance_centers(ctr, _nms(0.1, 41)), [[5, 5], [5, 6]])
    ctr[15, 15] = 0.9
    np.testing.assert_array_equal(find_instance_centers(ctr, _nms(0.1, 5), top_k=1), [[15, 15]])
    with pytest.raises(ConfigError):
        find_instance_centers(ctr, GroupingParams(nms_kernel=4))


def test_group_pixels_nearest_shifted_center():
    off = np.zeros((2, 4, 12), np.float32)
    centers = np.array([[1, 1], [1, 10]])
    ids = group_pixels(centers, off)
    assert (ids[:, :6] == 1).all() and (ids[:, 6:] == 2).all()  # x <= 5 nearer to column 1 (5.5 is the middle)
    off[1, 0, 2] = 8.0  # pixel (0, 2) points to (0, 10): nearer to the second center
    off[1, 3, 11] = -10.0  # pixel (3, 11) points to (3, 1)
    ids = group_pixels(torch.from_numpy(centers), torch.from_numpy(off), fg=np.ones((4, 12), bool))
    assert ids[0, 2] == 2 and ids[3, 11] == 1
    fg = np.zeros((4, 12), bool)
    fg[:, 4:8] = True
    ids = group_pixels(centers, off, fg)
    assert (ids[~fg] == 0).all() and set(np.unique(ids[fg])) == {1, 2}
    assert not group_pixels(np.zeros((0, 2)), off).any()


def perfect_offsets(h, w, centers, assign):
    """Offsets from every pixel to centers[assign[y, x]]."""
    yy, xx = np.mgrid[0:h, 0:w]
    cy = np.asarray(centers)[assign][..., 0]
    cx = np.asarray(centers)[assign][..., 1]
    return np.stack([cy - yy, cx - xx]).astype(np.float32)


def test_cluster_centers_disc_of_21_pixels():
    off = perfect_offsets(40, 40, [(12, 20)], np.zeros((40, 40), int))
    fg = np.ones((40, 40), bool)
    np.testing.assert_array_equal(cluster_centers(off, fg, beta=3.0), [[12, 20]])
    assert cluster_centers(off, fg, beta=0).shape == (0, 2)
    # a weak region of 25 px (5x5 zero offsets) is outside (18, 24): no center
    off2 = np.full((2, 40, 40), 9.0, np.float32)
    off2[:, 10:15, 10:15] = 0
    assert cluster_centers(off2, fg, beta=3.0).shape == (0, 2)
    assert cluster_centers(off2, fg, beta=5.0).shape == (1, 2)  # 25 < 21 + 5
    # outside fg nothing counts
    fg2 = np.zeros((40, 40), bool)
    fg2[:, :18] = True
    assert cluster_centers(off, fg2, beta=3.0).shape == (0, 2)


def test_instance_peaks_first_max_per_group():
    vals = np.array([0.1, 0.5, 0.5, 0.2, 0.9, 0.3], np.float32)
    inst = np.array([0, 0, 0, 2, 2, 0])
    np.testing.assert_array_equal(instance_peaks(vals, inst, 3), [1, -1, 4])


def test_semantic_argmax_equals_numpy_including_ties():
    rng = np.random.default_rng(1)
    p = rng.random((21, 30, 40)).astype(np.float32)
    p[3, 0, 0] = p[7, 0, 0] = 5.0
    p[:, 1, 1] = 0.5
    np.testing.assert_array_equal(semantic_argmax(p), p.argmax(0))
    q = rng.random((300, 5, 6)).astype(np.float32)  # more than 256 channels
    np.testing.assert_array_equal(semantic_argmax(q), q.argmax(0))


def make_two_instance_scene():
    """Class 1 bar (rows 5..24, cols 10..109) holding two instances, class 0 square with one instance."""
    h, w = 40, 140
    prob = np.zeros((3, h, w), np.float32)
    prob[0] = 0.9
    prob[1] = 0.05
    prob[2] = 0.05
    bar = np.zeros((h, w), bool)
    bar[5:25, 10:110] = True
    prob[:, bar] = np.array([0.1, 0.1, 0.8], np.float32)[:, None]
    prob[2, 5:25, 60:110] = 0.6
    prob[0, 5:25, 60:110] = 0.3
    sq = np.zeros((h, w), bool)
    sq[28:38, 120:130] = True
    prob[:, sq] = np.array([0.3, 0.7, 0.0], np.float32)[:, None]
    center = np.zeros((2, h, w), np.float32)
    center[1, 15, 30] = 0.9
    center[1, 15, 80] = 0.6
    center[1, 16, 80] = 0.2
    center[0, 33, 125] = 0.5
    assign = np.zeros((h, w), int)
    assign[:, 55:] = 1
    assign[sq] = 2
    off = perfect_offsets(h, w, [(15, 30), (15, 80), (33, 125)], assign)
    return prob, center, off, bar, sq


def test_get_instances_crafted_two_instances_and_scores():
    prob, center, off, bar, sq = make_two_instance_scene()
    out = get_instances(prob, center, off)
    assert out["labels"].dtype == np.int64 and out["scores"].dtype == np.float32
    assert out["masks"].dtype == bool and out["masks"].shape == (3, 40, 140)
    np.testing.assert_array_equal(out["labels"], [0, 1, 1])
    left = bar.copy()
    left[:, 55:] = False
    right = bar & ~left
    np.testing.assert_array_equal(out["masks"][0], sq)
    np.testing.assert_array_equal(out["masks"][1], left)
    np.testing.assert_array_equal(out["masks"][2], right)
    # score = center score x mean class probability over the instance
    exp_right = 0.6 * (5 * 20 * 0.8 + 50 * 20 * 0.6) / (55 * 20)
    np.testing.assert_allclose(out["scores"], [0.5 * 0.7, 0.9 * 0.8, exp_right], rtol=1e-6)
    np.testing.assert_array_equal(get_instances(prob, center, off, return_sources=True)["sources"],
                                  [SOURCE_CENTER] * 3)
    # same result from tensors
    t = get_instances(torch.from_numpy(prob), torch.from_numpy(center), torch.from_numpy(off))
    np.testing.assert_array_equal(t["masks"], out["masks"])
    np.testing.assert_allclose(t["scores"], out["scores"])


def test_get_instances_clustered_centerless_and_small_components():
    h, w = 60, 60
    prob = np.zeros((2, h, w), np.float32)
    prob[0] = 1.0
    comp_a = np.zeros((h, w), bool)
    comp_a[2:22, 2:22] = True  # center map 0.08 (< 0.1 threshold, > 0.05) + perfect offsets -> clustered
    comp_b = np.zeros((h, w), bool)
    comp_b[30:50, 30:50] = True  # no center at all
    comp_c = np.zeros((h, w), bool)
    comp_c[52:59, 2:9] = True  # 49 px: ignored
    for m, p in ((comp_a, 0.9), (comp_b, 0.6), (comp_c, 0.99)):
        prob[1, m] = p
        prob[0, m] = 1 - p
    center = np.zeros((1, h, w), np.float32)
    center[0, comp_a] = 0.08
    off = np.full((2, h, w), 30.0, np.float32)
    off[:, comp_a] = perfect_offsets(h, w, [(12, 12)], np.zeros((h, w), int))[:, comp_a]
    out = get_instances(prob, center, off)
    np.testing.assert_array_equal(out["labels"], [0, 0])
    np.testing.assert_array_equal(out["masks"][0], comp_a)
    np.testing.assert_array_equal(out["masks"][1], comp_b)
    # clustered center: mean probability alone; centerless component: max center (0) x probability
    np.testing.assert_allclose(out["scores"], [0.9, 0.0], rtol=1e-6)
    assert "sources" not in out
    src = get_instances(prob, center, off, return_sources=True)["sources"]
    assert src.dtype == np.int8
    np.testing.assert_array_equal(src, [SOURCE_CLUSTER, SOURCE_FALLBACK])
    out2 = get_instances(prob, center, off, ignore_centerless=True)
    assert len(out2["labels"]) == 1
    # no clustering: nothing
    out3 = get_instances(prob, center, off, params=GroupingParams(beta=0), ignore_centerless=True)
    assert out3["masks"].shape == (0, h, w) and out3["scores"].shape == (0,)


def test_get_instances_rejects_mismatched_shapes():
    with pytest.raises(DataError):
        get_instances(np.zeros((3, 10, 10)), np.zeros((3, 10, 10)), np.zeros((2, 10, 10)))
    with pytest.raises(DataError):
        get_instances(np.zeros((3, 10, 10)), np.zeros((2, 10, 10)), np.zeros((2, 10, 11)))


def one_hot_prob(seg, num_classes):
    prob = np.zeros((num_classes + 1,) + seg.shape, np.float32)
    s = seg.astype(np.int64).copy()
    s[s == 255] = 0
    np.put_along_axis(prob, s[None], 1.0, axis=0)
    return prob


def test_targets_as_perfect_predictions_reproduce_components():
    """Sign convention: pseudo targets fed back as predictions give back the components as instances,
    also when the prediction merges two components (joined by a bridge) into one."""
    h, w = 70, 120
    wsss = np.zeros((h, w), np.uint8)
    a = np.zeros((h, w), bool)
    a[10:50, 5:50] = True
    b = np.zeros((h, w), bool)
    b[10:50, 51:100] = True  # column 50 is a gap of ignore pixels
    wsss[a | b] = 2
    wsss[10:50, 50] = 255
    pts = np.array([[20, 20, 1, 1.0], [80, 40, 1, 1.0]], np.float32)
    tgt = make_pseudo_instance_labels(wsss, [1], pts, num_classes=2)
    assert tgt["num_instances"] == 2
    pred_seg = wsss.copy()
    pred_seg[10:50, 50] = 2  # the prediction joins the two components
    out = get_instances(one_hot_prob(pred_seg, 2), tgt["center"], tgt["offset"])
    assert len(out["labels"]) == 2 and (out["labels"] == 1).all()
    np.testing.assert_array_equal(out["masks"][0] & ~out["masks"][1], out["masks"][0])  # disjoint
    np.testing.assert_array_equal(out["masks"][0][a | b], a[a | b])
    np.testing.assert_array_equal(out["masks"][1][a | b], b[a | b])
    np.testing.assert_allclose(out["scores"], [1.0, 1.0])
    # a sign error would send the far pixels of each instance to the other center
    bad = get_instances(one_hot_prob(pred_seg, 2), tgt["center"], -tgt["offset"])
    assert not np.array_equal(bad["masks"][0][a | b], a[a | b])


@pytest.mark.skipif(not DATA.is_dir(), reason=f"real data folder {DATA} absent")
def test_real_voc_targets_round_trip():
    from PIL import Image

    stems = sorted(p.stem for p in (DATA / "SegmentationObject").glob("*.png"))[:10]
    checked = 0
    for stem in stems:
        cls = np.array(Image.open(DATA / "SegmentationClass" / f"{stem}.png"))
        obj = np.array(Image.open(DATA / "SegmentationObject" / f"{stem}.png"))
        pts, labels = [], set()
        for i in [i for i in np.unique(obj) if i not in (0, 255)]:
            m = obj == i
            c = int(np.bincount(cls[m]).argmax()) - 1
            ys, xs = np.nonzero(m & (cls == c + 1))
            pts.append([xs[len(xs) // 2], ys[len(ys) // 2], c, 1.0])
            labels.add(c)
        tgt = make_pseudo_instance_labels(cls, sorted(labels), np.array(pts, np.float32), num_classes=20)
        accepted = tgt["weight"] > 0
        seg = np.where(accepted, cls, 0).astype(np.uint8)  # predict only the accepted components
        out = get_instances(one_hot_prob(seg, 20), tgt["center"], tgt["offset"])
        assert len(out["labels"]) == tgt["num_instances"]
        if len(out["labels"]):
            np.testing.assert_array_equal(out["masks"].any(axis=0), accepted)
            assert (out["masks"].sum(axis=0) <= 1).all()
            for m, c, sc in zip(out["masks"], out["labels"], out["scores"]):
                assert (cls[m] == c + 1).all()
                # probability 1, so the score is the center score: 1 at the centroid, less when the
                # centroid of a non-convex component lies outside it
                assert sc == pytest.approx(tgt["center"][c][m].max(), rel=1e-6)
        checked += tgt["num_instances"]
    assert checked > 0


def _bar_scene(f: int):
    """A 40f x 80f image: one class-1 bar (rows 10f..30f, columns 10f..70f) with center peaks 0.9 at (20f, 30f) and
    0.6 at (20f, 45f) (15f px apart), perfect offsets to the nearer one, and a centre-less 6f x 6f class-0 square."""
    h, w = 40 * f, 80 * f
    prob = np.zeros((3, h, w), np.float32)
    prob[0] = 1.0
    prob[:, 10 * f:30 * f, 10 * f:70 * f] = np.array([0.2, 0.0, 0.8], np.float32)[:, None, None]
    prob[:, 32 * f:38 * f, 2 * f:8 * f] = np.array([0.3, 0.7, 0.0], np.float32)[:, None, None]
    center = np.zeros((2, h, w), np.float32)
    centers = [(20 * f, 30 * f), (20 * f, 45 * f)]
    center[1][centers[0]], center[1][centers[1]] = 0.9, 0.6
    assign = (np.arange(w)[None, :] >= int(37.5 * f)).astype(int).repeat(h, 0)
    return prob, center, perfect_offsets(h, w, centers, assign)


def test_scaled_grouping_sizes():
    p = GroupingParams()
    assert scaled_grouping(p, 1.0) is p
    q = scaled_grouping(p, 2.0)
    assert (q.nms_kernel, q.min_area, q.beta, q.center_threshold) == (83, 200, p.beta, p.center_threshold)
    assert scaled_grouping(p, 0.5).nms_kernel == 21 and scaled_grouping(p, 0.5).min_area == 12
    with pytest.raises(DataError, match="scale"):
        scaled_grouping(p, 0.0)


def test_get_instances_at_twice_the_scale_equals_the_upsampled_result():
    """The same scene drawn twice as large and grouped with scale=2 gives the upsampled instances of scale 1."""
    small = get_instances(*_bar_scene(1))
    # at scale 1 the second peak lies inside the 41 px window of the first, and the 36 px square is below 50 px
    assert small["masks"].shape[0] == 1 and small["labels"].tolist() == [1]
    plain = get_instances(*_bar_scene(2))  # unscaled: the peaks are now 30 px apart, the square 144 px
    assert plain["masks"].shape[0] == 3
    big = get_instances(*_bar_scene(2), scale=2.0)
    np.testing.assert_array_equal(big["labels"], small["labels"])
    np.testing.assert_allclose(big["scores"], small["scores"], rtol=1e-6)
    np.testing.assert_array_equal(big["masks"], small["masks"].repeat(2, axis=1).repeat(2, axis=2))


def test_min_center_support_keeps_converging_centers_and_drops_a_peak_without_votes():
    prob, center, off, bar, sq = make_two_instance_scene()
    base = get_instances(prob, center, off)
    # perfect offsets: every pixel votes exactly on its center, so even a 0.9 share keeps both bar instances
    kept = get_instances(prob, center, off, params=GroupingParams(min_center_support=0.9))
    np.testing.assert_array_equal(kept["masks"], base["masks"])
    np.testing.assert_array_equal(kept["scores"], base["scores"])
    # zero offsets (the head has not learned them): the votes are the pixels themselves, and the two peaks
    # cut the bar at column 55 (a tie goes to the first center). 193 pixels lie closer than 8 px to a
    # center, so the left group (cols 10-55, 920 px) has support 193 / 920 = 0.210, the right one (cols
    # 56-109, 1080 px) 193 / 1080 = 0.179
    zero = np.zeros_like(off)
    cut = get_instances(prob, center, zero, return_sources=True)
    assert cut["masks"].shape[0] == 3
    whole = get_instances(prob, center, zero, params=GroupingParams(min_center_support=0.2), return_sources=True)
    np.testing.assert_array_equal(whole["labels"], [0, 1])
    np.testing.assert_array_equal(whole["masks"][1], bar)
    np.testing.assert_array_equal(whole["sources"], [SOURCE_CENTER, SOURCE_CENTER])
    exp = 0.9 * (50 * 20 * 0.8 + 50 * 20 * 0.6) / (100 * 20)  # the kept center's score x the bar's mean prob
    np.testing.assert_allclose(whole["scores"][1], exp, rtol=1e-6)
    # at 0.17 both shares pass and the cut stays
    part = get_instances(prob, center, zero, params=GroupingParams(min_center_support=0.17))
    np.testing.assert_array_equal(part["masks"], cut["masks"])


def test_supported_centers_shares_radius_and_fallback():
    centers = np.array([[0, 0], [0, 20]], np.int64)
    ly = np.zeros(6, np.float32)
    lx = np.array([0, 1, 9, 20, 30, 40], np.float32)  # group 0: x 0, 1, 9; group 1: x 20, 30, 40
    inst = np.array([0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(supported_centers(ly, lx, centers, inst, 0.5, 8.0), [True, False])  # 2/3, 1/3
    np.testing.assert_array_equal(supported_centers(ly, lx, centers, inst, 0.5, 16.0), [True, True])  # 1, 2/3
    # none reaches the share: the best-supported center stays
    np.testing.assert_array_equal(supported_centers(ly, lx, centers, inst, 0.9, 8.0), [True, False])
    with pytest.raises(ConfigError):
        GroupingParams(min_center_support=1.5)
