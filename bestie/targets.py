"""Semantic knowledge transfer: pseudo instance labels from a WSSS map and points (METHOD.md section 4).

For every class ``c`` of the image label, the WSSS map's region ``wsss == c + 1`` is split into
8-connected components; a component of at least ``min_area`` pixels that holds exactly one point of
class ``c`` becomes a pseudo instance:

- image setting: a Gaussian is drawn on the class-``c`` center map at the component's centroid, and
  every pixel of the component gets the offset ``centroid - pixel`` and weight 1;
- point setting: Gaussians are drawn at *all* kept points of present classes (whether or not their
  component is accepted); the pixels of an accepted component get the offset ``point - pixel`` to the
  one point inside it and weight 1. (METHOD.md; the public code points these offsets to the component
  centroid even in the point setting, away from the Gaussian it draws at the point.)

Pixels outside accepted components keep offset 0 and weight 0 (no center/offset loss: the
"instance-aware guidance" of the paper).

Pixel conventions (shared with :mod:`bestie.refine` and :mod:`bestie.postprocess`):

- A continuous coordinate ``v`` (a point's ``x``/``y`` after augmentation, a component centroid) is
  mapped to the pixel whose centre is nearest, ``floor(v + 0.5)``, the convention of
  :mod:`bestie.data.points`. The public code truncates (``int(v)``); both agree on integer points and on
  centroids whose fractional part is below 0.5. Offsets are therefore whole numbers of pixels and the
  Gaussian peak (value exactly 1.0) sits on the pixel the offsets point to.
- Gaussian kernel: ``exp(-(dx^2 + dy^2) / (2 sigma^2))`` on the integer grid ``|dx|, |dy| <= r`` with
  ``r = round(3 sigma + 1)``, i.e. size ``6 sigma + 3`` (39 for sigma 6) for integer sigma, as in the
  public ``gaussian()``. It is pasted with ``np.maximum`` and clipped at the image border (the part of
  the kernel that falls outside the image is dropped, the peak stays on its pixel).

Fixed faults of the public code: points on row 0 / column 0 count like any other point; any number of
points per class (no fixed-size buffer); plain numpy types only (no ``np.int``/``np.float`` aliases),
object arrays of numbers are accepted as points.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import cv2
import numpy as np

from bestie.errors import ConfigError, DataError
from bestie.params import PseudoLabelParams, check_sigma

__all__ = [
    "gaussian_kernel",
    "draw_gaussian",
    "point_pixels",
    "check_class_list",
    "make_pseudo_instance_labels",
]


@lru_cache(maxsize=16)
def _kernel_cached(sigma: float) -> np.ndarray:
    r = int(round(3.0 * sigma + 1.0))
    d = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2.0 * sigma * sigma)).astype(np.float32)
    g.setflags(write=False)
    return g


def gaussian_kernel(sigma: float = PseudoLabelParams.sigma) -> np.ndarray:
    """The 2-D Gaussian pasted on center maps (METHOD.md section 4: sigma 6, kernel size ``6 sigma + 3``).

    Args:
        sigma: standard deviation in pixels, ``> 0``.

    Returns:
        ``(2r+1, 2r+1)`` ``float32`` read-only array with ``r = round(3 sigma + 1)``; the centre element
        ``[r, r]`` is exactly 1.0 and ``g[r + dy, r + dx] = exp(-(dx^2 + dy^2) / (2 sigma^2))``.

    Raises:
        ConfigError: ``sigma`` not a positive finite number.
    """
    s = check_sigma(sigma)
    return _kernel_cached(s)


def draw_gaussian(heatmap: np.ndarray, x: int, y: int, kernel: np.ndarray) -> None:
    """Paste ``kernel`` centred on pixel ``(y, x)`` into ``heatmap`` in place with ``np.maximum``.

    The kernel is clipped at the image border; a centre outside the image draws nothing (as the public
    ``center_map_gen``).

    Args:
        heatmap: ``(H, W)`` float array, modified in place.
        x, y: integer column / row of the peak (0-based pixels).
        kernel: square odd-sized kernel from :func:`gaussian_kernel`.
    """
    h, w = heatmap.shape
    x = int(x)
    y = int(y)
    if x < 0 or y < 0 or x >= w or y >= h:
        return
    r = kernel.shape[0] // 2
    y0, y1 = max(0, y - r), min(h, y + r + 1)
    x0, x1 = max(0, x - r), min(w, x + r + 1)
    dst = heatmap[y0:y1, x0:x1]
    np.maximum(dst, kernel[y0 - y + r : y1 - y + r, x0 - x + r : x1 - x + r], out=dst)


def point_pixels(points, height: int, width: int, num_classes: int, source: str = "points"):
    """Validate a point set and map it to pixels.

    Args:
        points: ``(N, 4)`` array-like ``x, y, class, conf`` (any numeric dtype, also an object array of
            numbers or a list of rows; ``None`` or an empty array means no point). ``x`` = column,
            ``y`` = row, 0-based pixels.
        height, width: image size in pixels.
        num_classes: ``C``; classes must be integers in ``0..C-1``.
        source: name used in error messages.

    Returns:
        ``(px, py, cls, conf, inside)``: ``int64`` pixel column / row ``floor(v + 0.5)``, ``int64`` class,
        ``float32`` conf, and a bool mask of the points whose pixel lies in the image (all ``(N,)``).

    Raises:
        DataError: wrong shape, non-numeric or non-finite values, a class outside ``0..C-1`` or not an
            integer.
    """
    if points is None:
        arr = np.zeros((0, 4), dtype=np.float32)
    else:
        try:
            arr = np.asarray(points, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{source}: points must be numeric (N, 4) [x, y, class, conf]: {exc}") from exc
        if arr.size == 0:
            arr = arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise DataError(f"{source}: points must have shape (N, 4) [x, y, class, conf], got {arr.shape}")
    if not np.isfinite(arr).all():
        raise DataError(f"{source}: {int((~np.isfinite(arr)).any(axis=1).sum())} point(s) with non-finite values")
    cls_f = arr[:, 2]
    bad = (cls_f != np.round(cls_f)) | (cls_f < 0) | (cls_f > num_classes - 1)
    if bad.any():
        raise DataError(
            f"{source}: point class value(s) {np.unique(cls_f[bad])[:10].tolist()} outside 0..{num_classes - 1} "
            f"(or not integers)"
        )
    px = np.floor(arr[:, 0] + 0.5).astype(np.int64)
    py = np.floor(arr[:, 1] + 0.5).astype(np.int64)
    inside = (px >= 0) & (py >= 0) & (px < width) & (py < height)
    return px, py, cls_f.astype(np.int64), arr[:, 3].astype(np.float32), inside


def check_class_list(labels, num_classes: int, source: str = "labels") -> np.ndarray:
    """Validate the present classes of one image.

    Args:
        labels: sequence / array of 0-based class indices (any integer dtype, numpy scalars, a tensor).
        num_classes: ``C``.
        source: name used in error messages.

    Returns:
        Sorted unique ``int64`` array of classes in ``0..C-1``.

    Raises:
        DataError: a value that is not an integer in ``0..C-1``.
    """
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    try:
        arr = np.asarray(labels, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{source}: class labels must be integers, got {labels!r}") from exc
    bad = ~np.isfinite(arr) | (arr != np.round(arr)) | (arr < 0) | (arr > num_classes - 1)
    if bad.any():
        raise DataError(f"{source}: class label(s) {arr[bad][:10].tolist()} outside 0..{num_classes - 1}")
    return np.unique(arr.astype(np.int64))


def check_label_map(wsss, source: str = "wsss") -> np.ndarray:
    """Validate a semantic label map and return it as a ``(H, W)`` ``uint8`` array (no copy if already).

    Raises:
        DataError: not 2-D, not an integer/bool array, or values outside 0..255.
    """
    if hasattr(wsss, "detach"):
        wsss = wsss.detach().cpu().numpy()
    arr = np.asarray(wsss)
    if arr.ndim != 2:
        raise DataError(f"{source}: expected a (H, W) label map, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise DataError(f"{source}: label map must have an integer dtype, got {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise DataError(f"{source}: label map values must lie in 0..255, got {arr.min()}..{arr.max()}")
    return arr.astype(np.uint8)


def make_pseudo_instance_labels(
    wsss: np.ndarray,
    labels: Sequence[int],
    points,
    *,
    num_classes: int,
    params: PseudoLabelParams = PseudoLabelParams(),
) -> dict:
    """Pseudo instance labels of one (augmented) sample (METHOD.md section 4, "semantic knowledge transfer").

    Args:
        wsss: ``(H, W)`` integer map (``uint8`` preferred): 0 background, ``c + 1`` class ``c``, 255 ignore.
        labels: present classes, 0-based (sequence, array or tensor of integers).
        points: ``(N, 4)`` ``x, y, class, conf`` (see :func:`point_pixels`). Points with
            ``conf < params.point_threshold``, whose class is not in ``labels`` or whose pixel lies outside
            the image are ignored.
        num_classes: ``C``, number of dataset classes (channels of the center map). Not in the stage-4
            contract signature, which has no other way to know ``C``.
        params: :class:`~bestie.params.PseudoLabelParams`: ``setting`` ``"image"`` (Gaussian at the
            component centroid, offsets to it) or ``"point"`` (Gaussians at all kept points of present
            classes, offsets to the component's one point); ``sigma`` of the Gaussians in pixels (kernel
            size ``6 sigma + 3``); components with fewer than ``min_area`` pixels are dropped; minimum point
            confidence ``point_threshold`` (0.7 in the reference).

    Returns:
        dict with
        ``"center"``: ``(C, H, W)`` ``float32`` Gaussian heatmaps (max where kernels overlap);
        ``"offset"``: ``(2, H, W)`` ``float32`` ``(dy, dx)`` = center - pixel, whole pixels, 0 off instances;
        ``"weight"``: ``(H, W)`` ``float32``, 1 on pixels of accepted components, else 0;
        ``"num_instances"``: ``int``, number of accepted components.

    Raises:
        DataError: malformed ``wsss``, ``labels`` or ``points``.
        ConfigError: bad ``num_classes`` (the parameters are checked when ``params`` is made).
    """
    if int(num_classes) != num_classes or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    num_classes = int(num_classes)
    setting, min_area = params.setting, params.min_area
    seg = check_label_map(wsss)
    height, width = seg.shape
    present = check_class_list(labels, num_classes)
    px, py, pcls, pconf, inside = point_pixels(points, height, width, num_classes)
    keep = inside & (pconf >= params.point_threshold) & np.isin(pcls, present)
    px, py, pcls = px[keep], py[keep], pcls[keep]

    center = np.zeros((num_classes, height, width), dtype=np.float32)
    offset = np.zeros((2, height, width), dtype=np.float32)
    weight = np.zeros((height, width), dtype=np.float32)
    kernel = gaussian_kernel(params.sigma)

    if setting == "point":
        for x, y, c in zip(px.tolist(), py.tolist(), pcls.tolist()):
            draw_gaussian(center[c], x, y, kernel)

    num_instances = 0
    for c in present.tolist():
        sel = pcls == c
        if not sel.any():
            continue  # a component without a point is never an instance
        cpx, cpy = px[sel], py[sel]
        region = seg == (c + 1)
        on_class = np.flatnonzero(region[cpy, cpx])
        if on_class.size == 0:
            continue
        # The 8-connected component of each point, found by flood fill from the point (cost ~ component
        # size, not image size; equal to the component of cv2.connectedComponents(connectivity=8)).
        # Filled pixels take the value 2 + component index, so a later point in the same component sees it.
        work = region.astype(np.float32)
        comps: list[list] = []  # [area, (x0, y0, w, h), first point index, point count]
        for j in on_class.tolist():
            x, y = int(cpx[j]), int(cpy[j])
            v = work[y, x]
            if v == 1.0:
                area, _, _, rect = cv2.floodFill(
                    work, None, (x, y), float(2 + len(comps)), 0, 0, 8 | cv2.FLOODFILL_FIXED_RANGE
                )
                comps.append([int(area), rect, j, 1])
            else:
                comps[int(v) - 2][3] += 1
        for k, (area, rect, j, count) in enumerate(comps):
            if count != 1 or area < min_area:
                continue
            x0, y0, w, h = (int(v) for v in rect)
            sub = work[y0 : y0 + h, x0 : x0 + w] == float(2 + k)
            if setting == "image":
                # centroid = mean pixel coordinate (image moments m10/m00, m01/m00 of the component),
                # mapped to the nearest pixel floor(v + 0.5)
                mom = cv2.moments(sub.view(np.uint8), binaryImage=True)
                cx = x0 + int(np.floor(mom["m10"] / mom["m00"] + 0.5))
                cy = y0 + int(np.floor(mom["m01"] / mom["m00"] + 0.5))
                draw_gaussian(center[c], cx, cy, kernel)
            else:
                cx, cy = int(cpx[j]), int(cpy[j])
            dy = (cy - np.arange(y0, y0 + h, dtype=np.float32))[:, None]
            dx = (cx - np.arange(x0, x0 + w, dtype=np.float32))[None, :]
            np.copyto(offset[0, y0 : y0 + h, x0 : x0 + w], dy, where=sub)
            np.copyto(offset[1, y0 : y0 + h, x0 : x0 + w], dx, where=sub)
            np.copyto(weight[y0 : y0 + h, x0 : x0 + w], np.float32(1.0), where=sub)
            num_instances += 1

    return {"center": center, "offset": offset, "weight": weight, "num_instances": num_instances}
