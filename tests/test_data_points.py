"""Point records: public-code text format, validation, GT centers."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from bestie.data.points import centers_from_instances, read_points_txt, validate_points, write_points_txt
from bestie.errors import DataError


def test_write_exact_public_format_and_read_back(tmp_path):
    pts = np.array([[3.4, 0, 2, 0.91234], [10.6, 7.0, 0, 1.0], [0, 5, 19, 0.1]], np.float32)
    path = tmp_path / "Peak_points" / "2007_000032.txt"
    write_points_txt(path, pts)
    # "%d %d %d %.3f": x, y rounded to integer pixels, conf with 3 decimals, single spaces
    assert path.read_text() == "3 0 2 0.912\n11 7 0 1.000\n0 5 19 0.100\n"
    back = read_points_txt(path)
    assert back.dtype == np.float32 and back.shape == (3, 4)
    np.testing.assert_allclose(back, [[3, 0, 2, 0.912], [11, 7, 0, 1.0], [0, 5, 19, 0.1]], atol=1e-6)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_empty_and_lenient_reading(tmp_path):
    write_points_txt(tmp_path / "e.txt", np.zeros((0, 4), np.float32))
    assert (tmp_path / "e.txt").read_text() == ""
    assert read_points_txt(tmp_path / "e.txt").shape == (0, 4)
    (tmp_path / "f.txt").write_text("1.5\t2.25  3 0.5\n\n4 5 6 0.25")
    np.testing.assert_array_equal(read_points_txt(tmp_path / "f.txt"), [[1.5, 2.25, 3, 0.5], [4, 5, 6, 0.25]])


def test_read_errors_name_file_and_line(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_text("1 2 3 0.5\n1 2 3\n")
    with pytest.raises(DataError, match=r"bad\.txt, line 2: expected 'x y class conf'"):
        read_points_txt(p)
    p.write_text("1 2 x 0.5\n")
    with pytest.raises(DataError, match=r"bad\.txt, line 1: not a number"):
        read_points_txt(p)
    p.write_text("1 2 3.5 0.5\n")
    with pytest.raises(DataError, match=r"bad\.txt, line 1: class must be an integer"):
        read_points_txt(p)
    with pytest.raises(DataError, match=r"not found.*none\.txt"):
        read_points_txt(tmp_path / "none.txt")


def test_write_rejects_bad_points(tmp_path):
    with pytest.raises(DataError, match="non-finite"):
        write_points_txt(tmp_path / "a.txt", np.array([[np.nan, 1, 0, 1]]))
    with pytest.raises(DataError, match=r"shape \(N, 4\)"):
        write_points_txt(tmp_path / "a.txt", np.zeros((2, 3)))
    with pytest.raises(DataError, match="integers"):
        write_points_txt(tmp_path / "a.txt", np.array([[1, 1, 0.5, 1]]))
    assert not (tmp_path / "a.txt").exists()


def test_validate_keeps_borders_drops_off_image(caplog):
    h, w = 5, 8
    pts = np.array(
        [
            [0, 0, 1, 0.9],  # row 0, column 0: valid
            [7, 4, 0, 0.5],  # last column / row: valid
            [8, 2, 0, 0.5],  # x == W: off image
            [2, 5, 0, 0.5],  # y == H: off image
            [-1, 2, 0, 0.5],  # negative
            [np.nan, 1, 0, 0.5],
            [3, np.inf, 0, 0.5],
            [6.5, 3.2, 2, 0.3],  # fractional, inside
            [7.5, 1, 2, 0.3],  # fractional, its pixel floor(7.5 + 0.5) = 8 is off the image
        ],
        np.float32,
    )
    with caplog.at_level(logging.WARNING, logger="bestie.data.points"):
        kept, n_drop = validate_points(pts, h, w, num_classes=3, source="Peak_points/img7.txt")
    assert n_drop == 6
    np.testing.assert_array_equal(kept, pts[[0, 1, 7]])
    assert "Peak_points/img7.txt" in caplog.text and "dropped 6 of 9" in caplog.text
    kept, n_drop = validate_points(pts[:2], h, w, 3, "x")
    assert n_drop == 0 and kept.shape == (2, 4)
    kept, n_drop = validate_points(np.zeros((0, 4)), h, w, 3, "x")
    assert n_drop == 0 and kept.shape == (0, 4) and kept.dtype == np.float32


def test_validate_class_is_a_fault():
    with pytest.raises(DataError, match=r"peaks of img9.*\[3\.0\] outside 0\.\.2"):
        validate_points(np.array([[1, 1, 3, 0.5]]), 5, 5, 3, "peaks of img9")
    with pytest.raises(DataError, match=r"\[-1\.0\]"):
        validate_points(np.array([[1, 1, -1, 0.5]]), 5, 5, 3, "s")
    with pytest.raises(DataError, match=r"\[1\.5\]"):
        validate_points(np.array([[1, 1, 1.5, 0.5]]), 5, 5, 3, "s")
    # class faults are reported even for a point that is also off the image
    with pytest.raises(DataError):
        validate_points(np.array([[-9, 1, 7, 0.5]]), 5, 5, 3, "s")


def test_centers_convex_and_non_convex():
    masks = np.zeros((3, 8, 10), bool)
    masks[0, 2:7, 3:8] = True  # 5x5 square rows 2..6, cols 3..7: centroid (y 4, x 5)
    # L shape: column x=0 rows 0..5 (6 px) + row y=5 x=1..3 (3 px): centroid x = 6/9, y = 30/9 lies off the
    # mask (pixel (1, 3) is empty); nearest mask pixel is (x 0, y 3): d2 = 0.444 + 0.111
    masks[1, 0:6, 0] = True
    masks[1, 5, 1:4] = True
    masks[2, 7, 9] = True  # a single pixel in the corner
    pts = centers_from_instances(masks, np.array([4, 1, 0]))
    assert pts.dtype == np.float32 and pts.shape == (3, 4)
    np.testing.assert_array_equal(pts, [[5, 4, 4, 1], [0, 3, 1, 1], [9, 7, 0, 1]])
    assert all(masks[i, int(p[1]), int(p[0])] for i, p in enumerate(pts))
    # chunked evaluation gives the same answer
    np.testing.assert_array_equal(centers_from_instances(masks, np.array([4, 1, 0]), max_elements=1), pts)


def test_centers_ring_lies_inside_mask():
    yy, xx = np.mgrid[0:41, 0:41]
    r = np.hypot(yy - 20, xx - 20)
    ring = (r >= 10) & (r <= 14)
    pts = centers_from_instances(ring[None], np.array([2]))
    x, y = int(pts[0, 0]), int(pts[0, 1])
    assert ring[y, x] and abs(np.hypot(y - 20, x - 20) - 10) < 0.5  # on the inner rim, nearest to (20, 20)


def test_centers_errors_and_empty():
    assert centers_from_instances(np.zeros((0, 4, 4), bool), np.zeros(0)).shape == (0, 4)
    with pytest.raises(DataError, match="empty mask"):
        centers_from_instances(np.zeros((1, 4, 4), bool), np.array([0]))
    with pytest.raises(DataError, match="2 masks but 1 labels"):
        centers_from_instances(np.ones((2, 4, 4), bool), np.array([0]))
