"""Peak extraction (METHOD.md section 2): 3x3 mean filter, local maxima of a kxk max filter, top-k per
class, conf >= threshold; rows (x, y, class, conf) sorted by class, then conf descending."""

import numpy as np
import pytest

from bestie.peaks import extract_peaks


def _block(m: np.ndarray, x: int, y: int, v: float) -> None:
    """A 3x3 block of value v centred on column x, row y (clipped at the border).

    After the 3x3 mean filter its centre keeps exactly v (mean over in-image pixels) and every other
    pixel is lower, so the centre is the peak with confidence v.
    """
    m[max(y - 1, 0): y + 2, max(x - 1, 0): x + 2] = v


def _maps():
    h, w = 40, 50
    a = np.zeros((h, w), np.float32)  # class 7
    _block(a, 10, 5, 0.9)
    _block(a, 35, 25, 0.6)
    _block(a, 45, 35, 0.05)  # below the 0.1 threshold
    b = np.zeros((h, w), np.float32)  # class 2
    _block(b, 0, 0, 0.7)  # corner: only its 2x2 part is inside the image
    _block(b, 20, 20, 0.8)
    _block(b, 25, 20, 0.5)  # 5 px from a stronger peak: inside its 15x15 window
    return np.stack([a, b]), np.array([7, 2])


def test_peaks_positions_order_and_border():
    cams, classes = _maps()
    pts = extract_peaks(cams, classes, kernel=15, smooth=3, top_k=25, threshold=0.1)
    assert pts.dtype == np.float32 and pts.shape == (4, 4)
    # class 2 first (sorted by class although its map comes second), conf descending within a class
    np.testing.assert_array_equal(pts[:, :3], [[20, 20, 2], [0, 0, 2], [10, 5, 7], [35, 25, 7]])
    np.testing.assert_allclose(pts[:, 3], [0.8, 0.7, 0.9, 0.6], rtol=1e-6)


def test_corner_peak_keeps_its_value():
    # with zero padding (count_include_pad) the corner block would smooth to 4/9 * 0.2 < 0.1 and vanish
    m = np.zeros((1, 20, 20), np.float32)
    _block(m[0], 0, 0, 0.2)
    pts = extract_peaks(m, [0], threshold=0.1)
    assert pts.shape == (1, 4)
    np.testing.assert_allclose(pts[0], [0, 0, 0, 0.2], rtol=1e-6)


def test_small_kernel_separates_close_peaks_and_top_k_limits():
    cams, classes = _maps()
    pts = extract_peaks(cams, classes, kernel=3)
    cls2 = pts[pts[:, 2] == 2]
    np.testing.assert_array_equal(cls2[:, :2], [[20, 20], [0, 0], [25, 20]])
    top1 = extract_peaks(cams, classes, kernel=15, top_k=1)
    np.testing.assert_array_equal(top1[:, :3], [[20, 20, 2], [10, 5, 7]])


def test_threshold_and_empty_inputs():
    cams, classes = _maps()
    pts = extract_peaks(cams, classes, threshold=0.75)
    np.testing.assert_array_equal(pts[:, :3], [[20, 20, 2], [10, 5, 7]])
    assert extract_peaks(np.zeros((0, 8, 8), np.float32), []).shape == (0, 4)
    assert extract_peaks(np.zeros((2, 8, 8), np.float32), [0, 1]).shape == (0, 4)  # all-zero maps


def test_plateau_gives_one_point():
    # a 2x2 tie (what bilinear x2 upsampling makes around a coarse maximum) -> one peak, the first pixel
    m = np.zeros((1, 12, 12), np.float32)
    m[0, 4:6, 6:8] = 1.0
    pts = extract_peaks(m, [5], kernel=5, smooth=1)
    np.testing.assert_array_equal(pts, [[6, 4, 5, 1.0]])


def test_gaussian_bumps_on_real_sized_map():
    # two Gaussian objects of one class on a 480x640 map: one peak each, at the centres
    yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
    m = np.exp(-((xx - 100) ** 2 + (yy - 300) ** 2) / (2 * 30.0**2))
    m += 0.5 * np.exp(-((xx - 500) ** 2 + (yy - 120) ** 2) / (2 * 40.0**2))
    pts = extract_peaks(m[None].astype(np.float32), [3])
    np.testing.assert_array_equal(pts[:, :3], [[100, 300, 3], [500, 120, 3]])
    assert pts[0, 3] > 0.99 and 0.49 < pts[1, 3] < 0.5


def test_bad_arguments():
    with pytest.raises(ValueError):
        extract_peaks(np.zeros((8, 8), np.float32), [0])
    with pytest.raises(ValueError):
        extract_peaks(np.zeros((2, 8, 8), np.float32), [0])
    with pytest.raises(ValueError):
        extract_peaks(np.zeros((1, 8, 8), np.float32), [0], kernel=4)
