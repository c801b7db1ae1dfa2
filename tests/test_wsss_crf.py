"""Tests of bestie.wsss.crf: the dense-CRF WSSS baseline (METHOD.md section 3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bestie.errors import ConfigError, DataError
from bestie.wsss.crf import CrfParams, cams_to_wsss, dense_crf, mark_uncertain, seed_map, threshold_argmax

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco128-voc"

RED = (200, 40, 40)
BLUE = (40, 40, 200)


def two_region_image(h: int = 40, w: int = 60, edge: int = 30) -> np.ndarray:
    """Columns ``< edge`` red, the rest blue."""
    img = np.empty((h, w, 3), np.uint8)
    img[:, :edge] = RED
    img[:, edge:] = BLUE
    return img


def blurry_cam(h: int = 40, w: int = 60, centre: float = 36.0, width: float = 4.0) -> np.ndarray:
    """A CAM that falls off smoothly around column ``centre``: ``1 / (1 + exp((x - centre) / width))``."""
    x = np.arange(w, dtype=np.float32)
    row = 1.0 / (1.0 + np.exp((x - centre) / width))
    return np.broadcast_to(row, (h, w)).astype(np.float32)[None].copy()


def first_bg_column(labels: np.ndarray) -> int:
    """Column where the middle row first turns background."""
    row = labels[labels.shape[0] // 2]
    return int(np.argmax(row == 0))


def test_crf_snaps_blurry_cam_to_colour_edge():
    img = two_region_image()
    cam = blurry_cam()
    thr = 0.35
    # Without CRF the map ends where the CAM crosses 0.35: 1 / (1 + e^((x - 36) / 4)) > 0.35 for
    # x < 36 + 4 ln(0.65 / 0.35) = 38.48, so the first background column is 39, nine columns past the
    # colour edge (the test is not trivial).
    plain = cams_to_wsss(img, cam, [2], bg_threshold=thr, crf=False, fg_seed=None, bg_seed=None)
    assert first_bg_column(plain) == 39
    out = cams_to_wsss(img, cam, [2], bg_threshold=thr, crf=True, fg_seed=None, bg_seed=None)
    assert set(np.unique(out).tolist()) <= {0, 3}
    # every row: class 3 (= class 2 + 1) left of the colour edge, background right of it (+-1 px)
    for row in out:
        edge = int(np.argmax(row == 0))
        assert abs(edge - 30) <= 1, row
        assert (row[: edge] == 3).all() and (row[edge:] == 0).all()


def test_crf_labels_unary_also_snaps():
    img = two_region_image()
    out = cams_to_wsss(img, blurry_cam(), [0], bg_threshold=0.35, crf_params=CrfParams(unary="labels"),
                       fg_seed=None, bg_seed=None)
    assert abs(first_bg_column(out) - 30) <= 1


def test_output_classes_are_image_labels_plus_one():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    cams = rng.random((2, 48, 64)).astype(np.float32)
    classes = [7, 12]
    out = cams_to_wsss(img, cams, classes, bg_threshold=0.3)
    values = set(np.unique(out).tolist())
    assert values <= {0, 8, 13, 255}
    assert {8, 13} <= values  # both classes win somewhere with uniform random CAMs
    # the dense map (before the uncertain rule) never holds 255
    _, dense = cams_to_wsss(img, cams, classes, bg_threshold=0.3, return_dense=True)
    assert set(np.unique(dense).tolist()) <= {0, 8, 13}


def test_no_class_gives_background():
    img = np.zeros((10, 12, 3), np.uint8)
    out = cams_to_wsss(img, np.zeros((0, 10, 12), np.float32), [], bg_threshold=0.3)
    assert out.shape == (10, 12) and out.dtype == np.uint8 and not out.any()


def test_uncertain_rule_hand_made():
    # one row of pixels, no CRF: max CAM 0.90 / 0.32 / 0.20 / 0.01 / 0.40 (second class) per pixel
    cam_a = np.array([[0.90, 0.32, 0.20, 0.01, 0.10]], np.float32)
    cam_b = np.array([[0.10, 0.00, 0.00, 0.00, 0.40]], np.float32)
    img = np.zeros((1, 5, 3), np.uint8)
    out, dense = cams_to_wsss(img, np.stack([cam_a, cam_b]), [4, 9], bg_threshold=0.35, crf=False,
                              fg_seed=0.30, bg_seed=0.05, return_dense=True)
    # argmax with bg 0.35: class 5 (4+1), bg (0.32 <= 0.35), bg, bg, class 10 (9+1)
    assert dense.tolist() == [[5, 0, 0, 0, 10]]
    # the foreground seed threshold is max(0.30, 0.35): pixel 1 (0.32) is no seed -> kept (it was 255 while
    # the seed sat below the background threshold); pixel 2: no seed -> kept; pixel 3: bg seed (0.01 < 0.05)
    # agreeing -> 0; pixels 0 and 4: fg seeds agreeing -> kept. Without the CRF no seed can disagree with the
    # argmax: only the CRF makes pixels uncertain.
    assert out.tolist() == [[5, 0, 0, 0, 10]]
    # a CRF-like relabelling that flips pixel 0 to background and pixel 3 to class 5 makes both uncertain
    seeds = seed_map(None, np.stack([cam_a, cam_b]), [4, 9], fg_seed=0.35, bg_seed=0.05)
    assert mark_uncertain(np.array([[0, 0, 0, 5, 10]], np.uint8), seeds).tolist() == [[255, 0, 0, 255, 10]]


def test_seed_map_raw_and_mark_uncertain():
    cams = np.array([[[0.5, 0.04, 0.2]], [[0.6, 0.0, 0.1]]], np.float32)
    seeds = seed_map(None, cams, [0, 1], fg_seed=0.3, bg_seed=0.05)
    assert seeds.tolist() == [[2, 0, 255]]
    labels = np.array([[1, 0, 2]], np.uint8)
    assert mark_uncertain(labels, seeds).tolist() == [[255, 0, 2]]


def test_seed_map_crf_mode_on_two_regions():
    # IRN's rule: foreground where the CRF at bg score 0.30 says fg, background where both CRFs say bg.
    img = two_region_image()
    cam = blurry_cam(centre=36.0, width=4.0) * 0.6  # peak 0.6: the CRF at bg 0.05 calls everything fg
    seeds = seed_map(img, cam, [1], fg_seed=0.30, bg_seed=0.05, mode="crf")
    row = seeds[20]
    assert set(np.unique(seeds).tolist()) <= {0, 2, 255}
    assert (row[:29] == 2).all()  # confident foreground inside the red region
    assert (row[31:] != 2).all()  # never foreground across the colour edge
    # the blue region is fg for the bg=0.05 CRF near the edge (CAM > 0.05 up to x = 36 + 4 ln(11) = 45.6)
    assert (row[31:40] == 255).all()


def test_threshold_argmax_ties_go_to_background():
    cams = np.array([[[0.3, 0.31]]], np.float32)
    assert threshold_argmax(cams, np.array([0]), 0.3).tolist() == [[0, 1]]


def test_dense_crf_without_pairwise_returns_input_distribution():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    p = rng.random((3, 20, 30)).astype(np.float32) + 0.05
    p /= p.sum(axis=0, keepdims=True)
    q = dense_crf(img, p, 5, params=CrfParams(gaussian_compat=0.0, bilateral_compat=0.0))
    assert q.shape == (3, 20, 30) and q.dtype == np.float32
    np.testing.assert_allclose(q, p, atol=1e-4)
    q2 = dense_crf(img, p, 5)
    np.testing.assert_allclose(q2.sum(axis=0), 1.0, atol=1e-4)


def test_dense_crf_accepts_read_only_inputs():
    img = two_region_image()
    img.setflags(write=False)
    p = np.stack([np.full((40, 60), 0.5, np.float32)] * 2)
    p.setflags(write=False)
    assert dense_crf(img, p, 2).shape == (2, 40, 60)


def test_crf_scale_half_resolution_still_snaps():
    img = two_region_image(80, 120, 60)
    cam = blurry_cam(80, 120, centre=70.0, width=8.0)
    out = cams_to_wsss(img, cam, [0], bg_threshold=0.35, crf_params=CrfParams(scale=0.5), fg_seed=None, bg_seed=None)
    assert abs(first_bg_column(out) - 60) <= 2


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"cams": np.zeros((1, 5, 5), np.float32)}, DataError),  # wrong size
        ({"classes": [1, 1]}, DataError),  # duplicate class
        ({"classes": [-1, 2]}, DataError),  # negative class
        ({"classes": [1]}, DataError),  # K mismatch
        ({"cams": np.full((2, 10, 12), np.nan, np.float32)}, DataError),
        ({"bg_threshold": 1.5}, ConfigError),
        ({"fg_seed": 0.01, "bg_seed": 0.05}, ConfigError),
        ({"image": np.zeros((10, 12), np.uint8)}, DataError),
    ],
)
def test_bad_inputs_raise(kwargs, exc):
    args = {"image": np.zeros((10, 12, 3), np.uint8), "cams": np.zeros((2, 10, 12), np.float32),
            "classes": [1, 2], "bg_threshold": 0.3}
    args.update(kwargs)
    image, cams, classes = args.pop("image"), args.pop("cams"), args.pop("classes")
    with pytest.raises(exc):
        cams_to_wsss(image, cams, classes, crf=False, **args)


def test_crf_params_validation():
    with pytest.raises(ConfigError):
        CrfParams(unary="softmax")
    with pytest.raises(ConfigError):
        CrfParams(bilateral_srgb=0)
    with pytest.raises(ConfigError):
        CrfParams(scale=1.5)


@pytest.mark.skipif(not DATA.is_dir(), reason=f"real data folder {DATA} is absent")
def test_crf_on_real_image_respects_labels_and_improves_coarse_cam():
    """A coarse (stride-16, blurred) CAM made from the GT mask of a real image: the CRF map keeps only the
    labelled classes and is closer to the GT than the coarse CAM's own argmax."""
    import cv2

    from bestie.data.voc import VOCDataset

    ds = VOCDataset(DATA, "train")
    img_id = ds.ids[0]
    image, gt, labels = ds.image(img_id), ds.semantic_gt(img_id), ds.labels(img_id)
    h, w = gt.shape
    cams = []
    for c in labels:
        m = (gt == c + 1).astype(np.float32)
        small = cv2.resize(m, (w // 16, h // 16), interpolation=cv2.INTER_AREA)
        cams.append(cv2.resize(cv2.GaussianBlur(small, (0, 0), 1.5), (w, h), interpolation=cv2.INTER_LINEAR))
    cams = np.stack(cams)
    cams /= cams.reshape(len(labels), -1).max(axis=1).reshape(-1, 1, 1) + 1e-5
    out, dense = cams_to_wsss(image, cams, labels, bg_threshold=0.35, return_dense=True)
    assert set(np.unique(out).tolist()) <= {0, 255} | {c + 1 for c in labels}
    valid = gt != 255
    acc_crf = (dense[valid] == gt[valid]).mean()
    acc_cam = (threshold_argmax(cams, np.array(labels), 0.35)[valid] == gt[valid]).mean()
    assert acc_crf > acc_cam


def test_uncertain_rule_seeds_sit_on_the_right_side_of_the_background_threshold():
    # bg_threshold 0.75 above fg_seed 0.30 (the demo's "auto" threshold): max CAM 0.90 / 0.50 / 0.20 / 0.01.
    # The seeds are taken at max(0.30, 0.75) and min(0.05, 0.75): pixel 1 (0.50) is background for the argmax
    # and no seed, so it stays 0 (with a 0.30 foreground seed it became 255).
    cam = np.array([[[0.90, 0.50, 0.20, 0.01]]], np.float32)
    img = np.zeros((1, 4, 3), np.uint8)
    out = cams_to_wsss(img, cam, [1], bg_threshold=0.75, crf=False, fg_seed=0.30, bg_seed=0.05)
    assert out.tolist() == [[2, 0, 0, 0]]
    # bg_threshold 0.02 below bg_seed 0.05: pixel 3 (0.03) is foreground for the argmax and no seed (< 0.02
    # would be), so it keeps its class; with a 0.05 background seed it became 255.
    cam = np.array([[[0.90, 0.50, 0.03, 0.01]]], np.float32)
    out = cams_to_wsss(img, cam, [1], bg_threshold=0.02, crf=False, fg_seed=0.30, bg_seed=0.05)
    assert out.tolist() == [[2, 2, 2, 0]]
