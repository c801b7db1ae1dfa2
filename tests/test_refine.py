"""Tests of bestie.refine (online self-refinement, METHOD.md section 4) on crafted network outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bestie.refine as refine_mod
from bestie.errors import ConfigError, DataError
from bestie.params import PseudoLabelParams, RefineParams
from bestie.refine import own_class_probability, refine_targets
from bestie.targets import make_pseudo_instance_labels

torch.set_num_threads(1)


@pytest.fixture(autouse=True, params=["host", "device"])
def path(request, monkeypatch):
    """Every test runs on the host path and on the batched device path (run on the CPU here): the same
    targets."""
    if request.param == "device":
        monkeypatch.setattr(refine_mod, "_device_path", lambda device: True)
    return request.param


def gauss_at(h, w, cy, cx, sigma=6.0):
    yy, xx = np.mgrid[0:h, 0:w]
    g = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    g[(np.abs(yy - cy) > 19) | (np.abs(xx - cx) > 19)] = 0
    return g.astype(np.float32)


def logits_from_prob(prob):
    """Logits whose softmax over axis 0 is ``prob`` (all entries > 0)."""
    return torch.from_numpy(np.log(prob).astype(np.float32))


def offsets_to(h, w, centers, assign):
    yy, xx = np.mgrid[0:h, 0:w]
    c = np.asarray(centers)[assign]
    return np.stack([c[..., 0] - yy, c[..., 1] - xx]).astype(np.float32)


def two_instance_scene():
    h, w = 20, 100
    wsss = np.zeros((h, w), np.uint8)
    wsss[5:15, 5:95] = 2  # class 1, 10 x 90 px
    comp = wsss == 2
    left = comp.copy()
    left[:, 48:] = False
    right = comp & ~left
    prob = np.full((3, h, w), 1 / 3, np.float32)
    prob[:, left] = np.array([0.15, 0.15, 0.7], np.float32)[:, None]
    prob[:, right] = np.array([0.25, 0.25, 0.5], np.float32)[:, None]
    center = np.zeros((2, h, w), np.float32)
    center[1, 10, 20] = 0.9
    center[1, 11, 20] = 0.5
    center[1, 10, 75] = 0.8
    center[0, 10, 50] = 0.95  # other class: must be ignored
    assign = np.zeros((h, w), int)
    assign[:, 48:] = 1
    off = offsets_to(h, w, [(10, 20), (10, 75)], assign)
    return wsss, prob, center, off, comp, left, right


def groups(**kw):
    """Loose keywords as the two parameter groups of refine_targets (pseudo-label fields, the rest)."""
    pseudo = {k: kw.pop(k) for k in ("setting", "sigma", "min_area", "point_threshold") if k in kw}
    return {"pseudo": PseudoLabelParams(**pseudo), "refine": RefineParams(**kw)}


def run(wsss, prob, center, off, labels, **kw):
    return refine_targets(
        logits_from_prob(prob)[None],
        torch.from_numpy(center)[None],
        torch.from_numpy(off)[None],
        torch.from_numpy(wsss)[None],
        [labels],
        **groups(**kw),
    )


def test_two_instances_in_one_component():
    wsss, prob, center, off, comp, left, right = two_instance_scene()
    out = run(wsss, prob, center, off, [1])
    assert out["has_center"] is True
    assert out["center"].shape == (1, 2, 20, 100) and out["center"].dtype == torch.float32
    yy, xx = np.mgrid[0:20, 0:100]
    exp_w = np.where(left, 0.9 * 0.7, 0) + np.where(right, 0.8 * 0.5, 0)
    np.testing.assert_allclose(out["weight"][0].numpy(), exp_w, rtol=1e-5, atol=1e-7)
    exp_dy = np.where(comp, 10 - yy, 0)
    exp_dx = np.where(left, 20 - xx, 0) + np.where(right, 75 - xx, 0)
    np.testing.assert_array_equal(out["offset"][0, 0].numpy(), exp_dy)
    np.testing.assert_array_equal(out["offset"][0, 1].numpy(), exp_dx)
    exp_heat = np.maximum(gauss_at(20, 100, 10, 20), gauss_at(20, 100, 10, 75))
    np.testing.assert_allclose(out["center"][0, 1].numpy(), exp_heat, rtol=1e-6)
    assert not out["center"][0, 0].any()


def test_fallback_uses_the_instance_own_center():
    """Pixel (10, 75) is grouped with the left instance, so the right one holds no confident center pixel:
    fallback with conf = mean probability and the target center at its own (grouping) center (10, 75), not
    at the component centroid (9.5, 49.5) as in the public code."""
    wsss, prob, center, off, comp, left, right = two_instance_scene()
    off[:, 10, 75] = [0.0, -55.0]
    out = run(wsss, prob, center, off, [1])
    a = left.copy()
    a[10, 75] = True
    b = right.copy()
    b[10, 75] = False
    mean_a = (left.sum() * 0.7 + 0.5) / (left.sum() + 1)
    exp_w = np.where(a, 0.9 * mean_a, 0) + np.where(b, 0.5, 0)
    np.testing.assert_allclose(out["weight"][0].numpy(), exp_w, rtol=1e-5, atol=1e-7)
    yy, xx = np.mgrid[0:20, 0:100]
    exp_dx = np.where(a, 20 - xx, 0) + np.where(b, 75 - xx, 0)
    np.testing.assert_array_equal(out["offset"][0, 1].numpy(), exp_dx)
    heat = out["center"][0, 1].numpy()
    assert heat[10, 75] == 1.0 and heat[10, 20] == 1.0
    assert heat[9, 49] == 0.0 and heat[10, 50] == 0.0  # nothing at the component centroid


def test_too_many_instances_skip_the_component():
    h, w = 40, 160
    wsss = np.zeros((h, w), np.uint8)
    wsss[5:15, 0:160] = 1  # class 0 bar with six instances
    wsss[25:35, 10:30] = 2  # class 1 square with one
    xs = [12, 37, 62, 87, 112, 137]
    center = np.zeros((2, h, w), np.float32)
    for x in xs:
        center[0, 10, x] = 0.9
    center[1, 30, 20] = 0.7
    assign = np.abs(np.arange(w)[None, :, None] - np.array(xs)[None, None, :]).argmin(-1).repeat(h, 0)
    off = offsets_to(h, w, [(10, x) for x in xs] + [(30, 20)], assign)
    sq = wsss == 2
    off[:, sq] = offsets_to(h, w, [(30, 20)], np.zeros((h, w), int))[:, sq]
    prob = np.full((3, h, w), 0.1, np.float32)
    prob[:, wsss == 1] = np.array([0.2, 0.6, 0.2], np.float32)[:, None]
    prob[:, sq] = np.array([0.1, 0.1, 0.8], np.float32)[:, None]
    prob /= prob.sum(0, keepdims=True)
    out = run(wsss, prob, center, off, [0, 1])
    wt = out["weight"][0].numpy()
    assert wt[wsss == 1].max() == 0 and not out["center"][0, 0].any()
    np.testing.assert_allclose(wt[sq], 0.7 * 0.8, rtol=1e-5)
    out6 = run(wsss, prob, center, off, [0, 1], max_instances=6)
    np.testing.assert_allclose(out6["weight"][0].numpy()[wsss == 1], 0.9 * 0.6, rtol=1e-5)
    peaks = out6["center"][0, 0].numpy()[10, xs]
    np.testing.assert_array_equal(peaks, np.ones(6, np.float32))


def test_component_without_center_and_small_component_give_nothing():
    wsss, prob, center, off, comp, left, right = two_instance_scene()
    out = run(wsss, prob, np.zeros_like(center), np.full_like(off, 40.0), [1])
    assert not out["weight"].any() and not out["center"].any() and not out["offset"].any()
    out = run(wsss, prob, center, off, [1], min_area=901)  # the component has 900 px
    assert not out["weight"].any()
    out = run(wsss, prob, center, off, [0])  # class 1 not in the labels
    assert not out["weight"].any()


def test_clustered_center_conf_is_mean_probability():
    h, w = 30, 30
    wsss = np.zeros((h, w), np.uint8)
    wsss[3:25, 3:25] = 1
    center = np.zeros((1, h, w), np.float32)
    center[0, wsss == 1] = 0.1  # below the 0.3 threshold, above 0.05
    off = offsets_to(h, w, [(14, 14)], np.zeros((h, w), int))
    prob = np.full((2, h, w), 0.5, np.float32)
    prob[1, wsss == 1], prob[0, wsss == 1] = 0.8, 0.2
    out = run(wsss, prob, center, off, [0])
    np.testing.assert_allclose(out["weight"][0].numpy(), np.where(wsss == 1, 0.8, 0), rtol=1e-5)
    np.testing.assert_allclose(out["center"][0, 0].numpy(), gauss_at(h, w, 14, 14), rtol=1e-6)
    assert not run(wsss, prob, center, off, [0], beta=0)["weight"].any()


def ellipse_scene(h=160, w=200):
    wsss = np.zeros((h, w), np.uint8)
    pts = []
    for (y, x, hh, ww, c) in [(5, 5, 50, 60, 0), (5, 120, 60, 70, 0), (95, 10, 50, 80, 2), (100, 130, 45, 60, 1)]:
        yy, xx = np.ogrid[:hh, :ww]
        ell = ((yy - (hh - 1) / 2) / (hh / 2)) ** 2 + ((xx - (ww - 1) / 2) / (ww / 2)) ** 2 <= 1
        wsss[y : y + hh, x : x + ww][ell] = c + 1
        pts.append([x + ww / 2, y + hh / 2, c, 1.0])
    wsss[0:3, :] = 255
    return wsss, np.array(pts, np.float32)


def test_perfect_predictions_reproduce_pseudo_targets():
    wsss, pts = ellipse_scene()
    tgt = make_pseudo_instance_labels(wsss, [0, 1, 2], pts, num_classes=3)
    assert tgt["num_instances"] == 4
    onehot = np.zeros((4,) + wsss.shape, np.float32)
    s = wsss.astype(int).copy()
    s[s == 255] = 0
    np.put_along_axis(onehot, s[None], 1.0, axis=0)
    logits = torch.from_numpy(onehot * 12.0)[None]
    out = refine_targets(logits, torch.from_numpy(tgt["center"])[None], torch.from_numpy(tgt["offset"])[None],
                         torch.from_numpy(wsss)[None], [[0, 1, 2]])
    p = 1 / (1 + 3 * np.exp(-12.0))
    np.testing.assert_allclose(out["weight"][0].numpy(), tgt["weight"] * p, rtol=1e-5)
    np.testing.assert_array_equal(out["offset"][0].numpy(), tgt["offset"])
    np.testing.assert_array_equal(out["center"][0].numpy(), tgt["center"])


def test_batch_equals_single_samples_and_device_path(monkeypatch):
    wsss1, pts1 = ellipse_scene()
    wsss2 = np.ascontiguousarray(wsss1[::-1, ::-1])
    rng = np.random.default_rng(3)
    center = torch.from_numpy(rng.random((2, 3, 160, 200), dtype=np.float32) ** 8)
    offset = torch.from_numpy(rng.normal(0, 4, (2, 2, 160, 200)).astype(np.float32))
    logits = torch.from_numpy(rng.normal(0, 2, (2, 4, 160, 200)).astype(np.float32))
    wsss = torch.from_numpy(np.stack([wsss1, wsss2]))
    labels = [[0, 2], [0, 1, 2]]
    batch = refine_targets(logits, center, offset, wsss, labels, **groups(beta=3.0))
    assert batch["weight"].sum() > 0
    for b in range(2):
        one = refine_targets(logits[b : b + 1], center[b : b + 1], offset[b : b + 1], wsss[b : b + 1], [labels[b]])
        for key in ("center", "offset", "weight"):
            torch.testing.assert_close(batch[key][b : b + 1], one[key], rtol=0, atol=0)
    monkeypatch.setattr(refine_mod, "_dense_host_buffers", lambda device: False)
    pair = refine_targets(logits, center, offset, wsss.long(), labels, **groups(beta=3.0))
    for key in ("center", "offset", "weight"):
        torch.testing.assert_close(pair[key], batch[key], rtol=0, atol=0)


def test_point_setting_nearest_point_after_offset():
    h, w = 30, 60
    wsss = np.zeros((h, w), np.uint8)
    wsss[0:20, 0:40] = 1  # class 0, one region with two points
    wsss[22:30, 45:60] = 2  # class 1: no point -> no target
    pts = np.array([[0, 0, 0, 1.0], [30, 10, 0, 1.0], [50, 25, 1, 0.5], [5, 5, 2, 1.0]], np.float32)
    off = np.zeros((2, h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    blk = (yy < 5) & (xx >= 25) & (xx < 30)
    off[0][blk], off[1][blk] = -yy[blk], -xx[blk]  # these pixels point at (0, 0)
    prob = np.full((4, h, w), 0.25, np.float32)
    out = refine_targets(logits_from_prob(prob)[None], None, torch.from_numpy(off)[None],
                         torch.from_numpy(wsss)[None], [[0, 1]], [torch.from_numpy(pts)], **groups(setting="point"))
    assert out["has_center"] is False and not out["center"].any()
    region = wsss == 1
    ly, lx = yy + off[0], xx + off[1]
    d0 = ly**2 + lx**2
    d1 = (ly - 10) ** 2 + (lx - 30) ** 2
    to0 = region & (d0 <= d1)
    to1 = region & (d1 < d0)
    assert to0[blk].all() and to1.any()
    np.testing.assert_array_equal(out["weight"][0].numpy(), region.astype(np.float32))
    np.testing.assert_array_equal(out["offset"][0, 0].numpy(), np.where(to0, -yy, 0) + np.where(to1, 10 - yy, 0))
    np.testing.assert_array_equal(out["offset"][0, 1].numpy(), np.where(to0, -xx, 0) + np.where(to1, 30 - xx, 0))


def test_point_setting_two_hundred_points():
    wsss = np.zeros((90, 180), np.uint8)
    pts = []
    for i in range(10):
        for j in range(20):
            wsss[9 * i : 9 * i + 8, 9 * j : 9 * j + 8] = 4
            pts.append([9 * j + 3, 9 * i + 4, 3, 1.0])
    pts = np.array(pts, np.float32)
    off = np.zeros((1, 2, 90, 180), np.float32)
    logits = torch.zeros((1, 5, 90, 180))
    out = refine_targets(logits, None, torch.from_numpy(off), torch.from_numpy(wsss)[None], [[3]], [pts],
                         **groups(setting="point"))
    yy, xx = np.mgrid[0:90, 0:180]
    block = wsss == 4
    np.testing.assert_array_equal(out["weight"][0].numpy(), block.astype(np.float32))
    exp_dy = np.where(block, 9 * (yy // 9) + 4 - yy, 0)
    exp_dx = np.where(block, 9 * (xx // 9) + 3 - xx, 0)
    np.testing.assert_array_equal(out["offset"][0, 0].numpy(), exp_dy)
    np.testing.assert_array_equal(out["offset"][0, 1].numpy(), exp_dx)


def test_own_class_probability_matches_softmax_and_is_overflow_safe():
    rng = np.random.default_rng(5)
    logits = torch.from_numpy(rng.normal(0, 3, (2, 5, 12, 14)).astype(np.float32))
    logits[0, 2, 0, 0] = 1000.0
    logits[0, 3, 0, 1] = 1000.0
    seg = [rng.integers(0, 5, (12, 14)).astype(np.uint8) for _ in range(2)]
    seg[0][0, 0] = 3  # own class 2, another logit at 1000 -> p = exp(-1000) = 0... here channel 2 is huge
    seg[0][0, 1] = 1  # own class 0 while channel 3 is huge: p -> 0
    seg[1][0, 0] = 255
    present = [np.array([0, 2]), np.array([0, 1, 2, 3])]
    got = own_class_probability(logits, seg, present)
    sm = torch.softmax(logits.double(), dim=1).numpy()
    for b in range(2):
        ok = np.isin(seg[b], present[b] + 1)
        ch = np.where(ok, seg[b], 0).astype(int)
        exp = np.take_along_axis(sm[b], ch[None], 0)[0]
        np.testing.assert_allclose(got[b][ok], exp[ok], rtol=1e-5, atol=1e-7)
        assert not got[b][~ok].any()
    assert got[0][0, 0] == pytest.approx(0.0) and got[0][0, 1] == pytest.approx(0.0)
    assert np.isfinite(got).all()


def test_bad_inputs():
    wsss, prob, center, off, *_ = two_instance_scene()
    with pytest.raises(DataError):
        refine_targets(logits_from_prob(prob)[None], torch.from_numpy(center)[None],
                       torch.from_numpy(off)[None, :, :10], torch.from_numpy(wsss)[None], [[1]])
    with pytest.raises(DataError):
        run(wsss, prob, center, off, [5])
    with pytest.raises(ConfigError):
        run(wsss, prob, center, off, [1], nms_kernel=40)
    with pytest.raises(ConfigError):
        run(wsss, prob, center, off, [1], setting="boxes")
    with pytest.raises(DataError):
        run(wsss, prob, center, off, [1], setting="point")  # no points


def test_numpy_scalar_labels_object_points_and_uint8_maps():
    h, w = 30, 60
    wsss = np.zeros((h, w), np.uint8)
    wsss[0:20, 0:40] = 1
    off = torch.zeros((1, 2, h, w))
    logits = torch.zeros((1, 2, h, w))
    pts_obj = np.array([[0, 0, np.int64(0), 1.0], [30, 10, 0, np.float64(1.0)]], dtype=object)
    ref = refine_targets(logits, None, off, torch.from_numpy(wsss)[None], [[0]],
                         [np.array([[0, 0, 0, 1.0], [30, 10, 0, 1.0]], np.float32)], **groups(setting="point"))
    for labels, pts in (
        ([np.array([0], np.uint8)], [pts_obj]),
        ([torch.tensor([0])], [torch.tensor(pts_obj.astype(np.float32))]),
        ([(np.int32(0),)], [pts_obj.tolist()]),
    ):
        out = refine_targets(logits, None, off, torch.from_numpy(wsss.astype(np.int64))[None], labels, pts,
                             **groups(setting="point"))
        for key in ("offset", "weight"):
            torch.testing.assert_close(out[key], ref[key], rtol=0, atol=0)
    assert ref["weight"].sum() == 800


def test_device_path_equals_host_path_on_trained_like_outputs(path):
    """Pseudo targets + noise as the network's outputs (centres found by NMS, offsets that make the weak
    regions of centre clustering), random logits, three samples: the batched device path gives the host
    path's targets (offsets and centres exactly, weights to float rounding), with and without clustering."""
    if path == "device":
        pytest.skip("compares the two paths itself")
    wsss1, pts1 = ellipse_scene()
    scenes = [(wsss1, pts1), (np.ascontiguousarray(wsss1[:, ::-1]), None), (np.ascontiguousarray(wsss1[::-1]), None)]
    rng = np.random.default_rng(8)
    ws, cs, os_ = [], [], []
    for wsss, pts in scenes:
        pts = ellipse_points(wsss) if pts is None else pts
        t = make_pseudo_instance_labels(wsss, [0, 1, 2], pts, num_classes=3)
        ws.append(wsss)
        cs.append(t["center"] + rng.random(t["center"].shape, dtype=np.float32) * 0.05)
        os_.append(t["offset"] + rng.normal(0, 1, t["offset"].shape).astype(np.float32))
    cs[2][:] = np.clip(cs[2] * 0.2, 0, None)  # below the NMS threshold: clustered centres only
    logits = torch.from_numpy(rng.normal(0, 2, (3, 4) + wsss1.shape).astype(np.float32))
    center, offset = torch.from_numpy(np.stack(cs)), torch.from_numpy(np.stack(os_))
    wsss = torch.from_numpy(np.stack(ws))
    labels = [[0, 1, 2]] * 3
    for beta in (3.0, 0.0):
        host = refine_targets(logits, center, offset, wsss, labels, **groups(beta=beta))
        refine_mod_device = refine_mod._device_path
        try:
            refine_mod._device_path = lambda device: True
            dev = refine_targets(logits, center, offset, wsss, labels, **groups(beta=beta))
        finally:
            refine_mod._device_path = refine_mod_device
        assert float((host["weight"] > 0).float().mean()) > 0.1
        torch.testing.assert_close(dev["offset"], host["offset"], rtol=0, atol=0)
        torch.testing.assert_close(dev["center"], host["center"], rtol=0, atol=0)
        torch.testing.assert_close(dev["weight"], host["weight"], rtol=1e-5, atol=1e-7)


def ellipse_points(wsss):
    """One point per component of the ellipse scene (its pixel of median row-major index)."""
    import cv2

    pts = []
    for c in (0, 1, 2):
        n, lab = cv2.connectedComponents((wsss == c + 1).astype(np.uint8), connectivity=8)
        for k in range(1, n):
            ys, xs = np.nonzero(lab == k)
            j = len(ys) // 2
            pts.append([xs[j], ys[j], c, 1.0])
    return np.array(pts, np.float32)


def test_device_point_path_equals_host_path_on_random_points(path):
    """Point setting: random offsets, points of several classes (some below the threshold, some of absent
    classes, some off the image), three samples with different point counts: device path = host path."""
    if path == "device":
        pytest.skip("compares the two paths itself")
    rng = np.random.default_rng(4)
    wsss1, _ = ellipse_scene()
    wsss = torch.from_numpy(np.stack([wsss1, wsss1[:, ::-1].copy(), wsss1[::-1].copy()]))
    h, w = wsss1.shape
    offset = torch.from_numpy(rng.normal(0, 6, (3, 2, h, w)).astype(np.float32))
    logits = torch.zeros((3, 4, h, w))
    points = []
    for n in (7, 1, 12):
        p = np.stack([rng.uniform(-3, w + 3, n), rng.uniform(0, h - 1, n), rng.integers(0, 3, n),
                      rng.choice([0.5, 0.9], n)], axis=1).astype(np.float32)
        points.append(torch.from_numpy(p))
    labels = [[0, 2], [0, 1, 2], [1, 2]]
    kw = groups(setting="point")
    host = refine_targets(logits, None, offset, wsss, labels, points, **kw)
    saved = refine_mod._device_path
    try:
        refine_mod._device_path = lambda device: True
        dev = refine_targets(logits, None, offset, wsss, labels, points, **kw)
    finally:
        refine_mod._device_path = saved
    assert dev["has_center"] is False and float(host["weight"].sum()) > 1000
    for key in ("center", "offset", "weight"):
        torch.testing.assert_close(dev[key], host[key], rtol=0, atol=0)
