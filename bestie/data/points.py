"""Point records ``(x, y, class, conf)``: the text form of the public code, validation, GT centers.

A point set is an ``np.ndarray`` of shape ``(N, 4)``, dtype ``float32``, columns

- ``x``: column, ``y``: row, in pixels, 0-based; a point denotes the pixel whose centre it is, so the
  pixel of a point is ``(floor(y + 0.5), floor(x + 0.5))`` and a valid point has ``0 <= x <= W - 1``,
  ``0 <= y <= H - 1``;
- ``class``: 0-based class index (integer-valued);
- ``conf``: confidence (peak score of the CAM, METHOD.md section 2; 1.0 for given / GT points).

The text form is the ``Peak_points/<id>.txt`` (``Center_points/<id>.txt``) file of the public BESTIE
code: one point per line, ``"%d %d %d %.3f"`` = integer x, integer y, integer class, conf with three
decimals, single spaces, ``\\n`` line ends; an image without points has an empty file.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from bestie.io.atomic import atomic_write
from bestie.errors import DataError
from bestie.data.textfiles import read_text

__all__ = [
    "POINT_COLUMNS",
    "empty_points",
    "read_points_txt",
    "write_points_txt",
    "validate_points",
    "centers_from_instances",
]

log = logging.getLogger(__name__)

POINT_COLUMNS = ("x", "y", "class", "conf")


def empty_points() -> np.ndarray:
    """An empty point set: ``(0, 4)`` ``float32``."""
    return np.zeros((0, 4), dtype=np.float32)


def _atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`bestie.io.atomic.atomic_write`)."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def _as_points(points: np.ndarray, source: str) -> np.ndarray:
    arr = np.asarray(points)
    if arr.ndim == 1 and arr.size == 0:
        return empty_points()
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise DataError(f"{source}: points must have shape (N, 4) [x, y, class, conf], got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise DataError(f"{source}: points must be numeric, got dtype {arr.dtype}")
    return arr.astype(np.float32, copy=True)


def read_points_txt(path: str | os.PathLike) -> np.ndarray:
    """Read a ``Peak_points/<id>.txt`` file (format in the module docstring).

    Reading is lenient about whitespace (any run of spaces/tabs, blank lines skipped) and accepts
    fractional x / y, but each line must hold exactly four numbers and the class must be an integer.

    Args:
        path: the text file.

    Returns:
        ``(N, 4)`` ``float32`` points in file order (``(0, 4)`` for an empty file).

    Raises:
        DataError: missing / unreadable file, or a line that is not four numbers with an integer class;
            the message names the file, the line number (1-based) and the text.
    """
    p = Path(path)
    text = read_text(p, "point file")
    rows: list[tuple[float, float, float, float]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 4:
            raise DataError(f"{p}, line {lineno}: expected 'x y class conf' (4 fields), got {line.strip()!r}")
        try:
            x, y, c, conf = (float(v) for v in fields)
        except ValueError as exc:
            raise DataError(f"{p}, line {lineno}: not a number in {line.strip()!r}") from exc
        if not math.isfinite(c) or c != int(c):
            raise DataError(f"{p}, line {lineno}: class must be an integer, got {fields[2]!r}")
        rows.append((x, y, c, conf))
    if not rows:
        return empty_points()
    return np.asarray(rows, dtype=np.float32)


def write_points_txt(path: str | os.PathLike, points: np.ndarray) -> None:
    """Write points in the public code's ``"%d %d %d %.3f"`` line format, atomically.

    x and y are rounded to the nearest integer pixel (``np.rint``), as the text form holds integer pixel
    positions (the public code writes integer peak positions); keep float positions in memory or HDF5.

    Args:
        path: target file (parent directories are created). Written via a temp file in the same
            directory and ``os.replace``, so readers never see a half-written file.
        points: ``(N, 4)`` array ``x, y, class, conf``; ``N`` may be 0 (empty file).

    Raises:
        DataError: wrong shape, a non-finite value, or a non-integer / negative class (names ``path``).
    """
    pts = _as_points(points, str(path))
    if pts.shape[0] and not np.isfinite(pts).all():
        bad = np.flatnonzero(~np.isfinite(pts).all(axis=1))
        raise DataError(f"{path}: cannot write non-finite point values (rows {bad[:10].tolist()})")
    cls = pts[:, 2]
    if pts.shape[0] and (np.any(cls != np.round(cls)) or np.any(cls < 0)):
        raise DataError(f"{path}: classes must be non-negative integers, got {np.unique(cls)[:10].tolist()}")
    xy = np.rint(pts[:, :2]).astype(np.int64)
    lines = [
        "%d %d %d %.3f\n" % (x, y, c, conf)
        for (x, y), c, conf in zip(xy.tolist(), cls.astype(np.int64).tolist(), pts[:, 3].tolist())
    ]
    _atomic_write_bytes(path, "".join(lines).encode("utf-8"))


def validate_points(
    points: np.ndarray, height: int, width: int, num_classes: int, source: str
) -> tuple[np.ndarray, int]:
    """Check points against their image: skip points off the image, fail on impossible classes.

    A point is kept when its x and y are finite and ``0 <= x <= width - 1``, ``0 <= y <= height - 1``
    (row 0 and column 0 are valid). Dropped points are reported once with a logged warning
    (``logging`` module) naming ``source`` and the count.

    Args:
        points: ``(N, 4)`` array ``x, y, class, conf`` (any numeric dtype).
        height, width: image size in pixels.
        num_classes: ``C``; classes must be integers in ``0..C-1``.
        source: what the points came from (e.g. the file path or ``"<id> peaks"``), used in messages.

    Returns:
        ``(kept, n_dropped)``: ``kept`` is ``(M, 4)`` ``float32`` in the input order, ``n_dropped = N - M``.

    Raises:
        DataError: wrong shape, a class that is not an integer in ``0..C-1`` (message names ``source``
            and the offending values), or a non-finite confidence.
    """
    pts = _as_points(points, source)
    if pts.shape[0] == 0:
        return pts, 0
    cls = pts[:, 2]
    bad_cls = ~np.isfinite(cls) | (cls != np.round(cls)) | (cls < 0) | (cls > num_classes - 1)
    if bad_cls.any():
        vals = np.unique(cls[bad_cls])[:10].tolist()
        raise DataError(
            f"{source}: point class value(s) {vals} outside 0..{num_classes - 1} (or not integers); "
            f"{int(bad_cls.sum())} point(s) affected"
        )
    if not np.isfinite(pts[:, 3]).all():
        raise DataError(f"{source}: non-finite point confidence in {int((~np.isfinite(pts[:, 3])).sum())} point(s)")
    x, y = pts[:, 0], pts[:, 1]
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(x) & np.isfinite(y) & (x >= 0) & (y >= 0) & (x <= width - 1) & (y <= height - 1)
    n_drop = int((~ok).sum())
    if n_drop:
        log.warning(
            "%s: dropped %d of %d point(s) outside the %dx%d (WxH) image or with non-finite coordinates",
            source, n_drop, pts.shape[0], width, height,
        )
    return pts[ok], n_drop


def centers_from_instances(masks: np.ndarray, labels: np.ndarray, *, max_elements: int = 1 << 24) -> np.ndarray:
    """One GT center point per instance, for the point-supervised setting (METHOD.md section 2).

    The center of an instance is **the mask pixel nearest (Euclidean) to the mask's centroid**, so it
    always lies inside the mask, even for non-convex or ring-shaped objects whose centroid falls outside.
    Ties go to the first pixel in row-major order. ``conf`` is 1.0. Computed with array operations,
    ``max_elements`` bounding the size of the distance array per chunk of instances.

    Args:
        masks: ``(N, H, W)`` bool (or 0/1) instance masks.
        labels: ``(N,)`` 0-based class indices.

    Returns:
        ``(N, 4)`` ``float32`` points ``x, y, class, 1.0`` in instance order (integer x, y).

    Raises:
        DataError: shape mismatch, or an empty mask (it has no center).
    """
    m = np.asarray(masks)
    lab = np.asarray(labels).reshape(-1)
    if m.ndim != 3:
        raise DataError(f"centers_from_instances: masks must be (N, H, W), got shape {m.shape}")
    n, h, w = m.shape
    if lab.shape[0] != n:
        raise DataError(f"centers_from_instances: {n} masks but {lab.shape[0]} labels")
    if n == 0:
        return empty_points()
    m = m.astype(bool, copy=False)
    area = m.sum(axis=(1, 2), dtype=np.int64)
    if (area == 0).any():
        raise DataError(f"centers_from_instances: empty mask(s) at index {np.flatnonzero(area == 0)[:10].tolist()}")
    ys = np.arange(h, dtype=np.float64)
    xs = np.arange(w, dtype=np.float64)
    cy = (m.sum(axis=2, dtype=np.int64) @ ys) / area  # (N,)
    cx = (m.sum(axis=1, dtype=np.int64) @ xs) / area
    out = np.empty((n, 4), dtype=np.float32)
    chunk = max(1, int(max_elements // max(1, h * w)))
    ys32, xs32 = ys.astype(np.float32), xs.astype(np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        dy2 = (ys32[None, :] - cy[s:e, None].astype(np.float32)) ** 2  # (k, H)
        dx2 = (xs32[None, :] - cx[s:e, None].astype(np.float32)) ** 2  # (k, W)
        d2 = dy2[:, :, None] + dx2[:, None, :]
        d2[~m[s:e]] = np.inf
        idx = d2.reshape(e - s, -1).argmin(axis=1)
        out[s:e, 0] = idx % w
        out[s:e, 1] = idx // w
    out[:, 2] = lab.astype(np.float32)
    out[:, 3] = 1.0
    return out
