"""Peak points from CAMs (docs/METHOD.md section 2; reference: BESTIE ``PAM/point_extraction.py``).

Each class map is smoothed with a ``smooth x smooth`` mean filter; a pixel is a peak when it equals the
maximum of the ``kernel x kernel`` window around it; the ``top_k`` strongest peaks per class are kept if
their smoothed value (the confidence) is ``>= threshold``.

Two details the reference leaves implicit are fixed here:

- borders: the mean filter averages over the pixels inside the image (the reference pads with zeros,
  which lowers a peak on row 0 / column 0 by up to 5/9 and can drop it below the threshold);
- plateaus: when several pixels of one window tie for the maximum (e.g. the 2x2 block that bilinear
  upsampling by an even factor makes around a coarse maximum), only the first in row-major order is
  kept, so one maximum gives one point.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["extract_peaks"]


def extract_peaks(
    cams: np.ndarray,
    classes: Sequence[int] | np.ndarray,
    kernel: int = 15,
    smooth: int = 3,
    top_k: int = 25,
    threshold: float = 0.1,
) -> np.ndarray:
    """Peak points of ``K`` class maps.

    Args:
        cams: ``(K, H, W)`` float CAMs (any float dtype), normally in ``[0, 1]``.
        classes: ``(K,)`` 0-based class index of each map.
        kernel: odd side of the max filter (local-maximum window), in pixels of ``cams``.
        smooth: odd side of the mean filter (1 = no smoothing).
        top_k: most peaks kept per map.
        threshold: minimum confidence (smoothed CAM value) of a kept peak.

    Returns:
        ``(N, 4)`` float32 rows ``x, y, class, conf``: ``x`` column and ``y`` row (0-based pixels of
        ``cams``), class index, smoothed CAM value at the peak; sorted by class ascending, then conf
        descending (ties: row-major position; at the top-k cut a tie is broken arbitrarily).

    Raises:
        ValueError: ``cams`` not 3-D, ``classes`` of another length, even or non-positive ``kernel`` /
            ``smooth``, or ``top_k < 1``.
    """
    cams = np.asarray(cams)
    classes_arr = np.asarray(classes, dtype=np.int64).reshape(-1)
    if cams.ndim != 3:
        raise ValueError(f"extract_peaks: cams must be (K, H, W), got shape {cams.shape}")
    if classes_arr.shape[0] != cams.shape[0]:
        raise ValueError(f"extract_peaks: {cams.shape[0]} maps but {classes_arr.shape[0]} classes")
    for name, value in (("kernel", kernel), ("smooth", smooth)):
        if value < 1 or value % 2 == 0:
            raise ValueError(f"extract_peaks: {name} must be a positive odd integer, got {value}")
    if top_k < 1:
        raise ValueError(f"extract_peaks: top_k must be >= 1, got {top_k}")
    num, height, width = cams.shape
    if num == 0 or height == 0 or width == 0:
        return np.zeros((0, 4), np.float32)

    heat = np.ascontiguousarray(cams, dtype=np.float32)
    if smooth > 1:  # mean over the in-image pixels of each window
        size = (1, smooth, smooth)
        heat = ndimage.uniform_filter(heat, size, mode="constant", cval=0.0)
        count = ndimage.uniform_filter(np.ones((1, height, width), np.float32), size, mode="constant", cval=0.0)
        heat = heat / count
    win = (1, kernel, kernel)
    # 'nearest' repeats edge pixels, which are inside the window anyway: the max over the in-image part.
    cand = heat == ndimage.maximum_filter(heat, win, mode="nearest")
    # Plateaus: all candidates in one window share its maximum; keep the one with the smallest
    # row-major index (max filter of the negated index over candidates).
    index = np.arange(height * width, dtype=np.float64).reshape(1, height, width)
    neg = np.where(cand, -index, -float(height * width))
    cand &= -ndimage.maximum_filter(neg, win, mode="nearest") == index

    score = np.where(cand, heat, -np.inf).reshape(num, -1)  # (K, H*W)
    k = min(top_k, height * width)
    # top-k per map without a full sort, then a stable order: conf descending, then row-major position
    part = np.argpartition(-score, k - 1, axis=1)[:, :k] if k < score.shape[1] else np.tile(
        np.arange(score.shape[1]), (num, 1))
    part.sort(axis=1)
    vals = np.take_along_axis(score, part, axis=1)
    order = np.take_along_axis(part, np.argsort(-vals, axis=1, kind="stable"), axis=1)
    conf = np.take_along_axis(score, order, axis=1)
    rows, cols = np.nonzero(conf >= threshold)
    flat = order[rows, cols]
    out = np.stack(
        [flat % width, flat // width, classes_arr[rows], conf[rows, cols]], axis=1
    ).astype(np.float32)
    if out.shape[0]:
        # rows come per map in conf-descending order; a stable sort by class keeps that within a class
        out = out[np.argsort(out[:, 2], kind="stable")]
    return out
