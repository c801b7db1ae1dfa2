"""Instance grouping from the network's semantic, center and offset maps (METHOD.md section 4, "Inference").

The algorithm follows the public BESTIE code (``get_ins_map``), which builds on Panoptic-DeepLab's
post-processing, rewritten vectorised (numpy + OpenCV, one image on the CPU):

1. semantic map = argmax of the class probabilities; for each predicted class ``c`` and each of its
   8-connected components with at least ``min_area`` pixels:
2. **center NMS** (:func:`find_instance_centers`): the class-``c`` center map restricted to the
   component (0 outside); values ``<= threshold`` are discarded, a pixel is a center when it equals the
   maximum of its ``nms_kernel x nms_kernel`` window (plateaus keep every tied pixel, as max-pool NMS does);
3. **center clustering** (:func:`cluster_centers`, "beta"): the pixels of the component whose predicted
   offset is shorter than 2.5 px form 4-connected regions; a region whose area lies strictly between
   ``21 - beta`` and ``21 + beta`` (21 = pixels within 2.5 px of a pixel centre, the disc a perfect offset
   map draws around its center) gives a center at its centroid (truncated to whole pixels) if the center
   map there exceeds 0.05. If NMS found no center these become the centers; otherwise one is added only
   if it lies more than 100 px from every NMS center. Added centers are marked with score 1.0 in the
   component's center map;
4. **grouping** (:func:`group_pixels`): each pixel of the component goes to the center nearest to
   ``pixel + offset`` (Euclidean; ties go to the center listed first: NMS centers in row-major order,
   then clustered ones);
5. each non-empty group is an instance: its center pixel is the argmax of the (marked) center map over
   its pixels (first in row-major order on ties), ``score = center score x mean probability of c``; when
   that pixel is a clustered center the score is the mean probability alone (METHOD.md; the public code
   tests ``center score >= 1`` instead, which also catches real predictions >= 1, and then multiplies the
   probability by itself).

6. optional, off by default (``min_center_support``, a departure from the paper): in a component with
   several centers, a center whose group's pixels mostly vote far from it (fewer than
   ``min_center_support`` of them land within :data:`SUPPORT_RADIUS` of it) is dropped and its pixels
   regrouped among the others (:func:`supported_centers`). Offsets that do not converge on a second peak of
   the center map mean that peak cuts an object rather than marks one.

A component without any center becomes one instance scored ``max center x mean probability`` (the
public default ``val_ignore=False``); with ``ignore_centerless=True`` it is dropped.

Scale: the pixel sizes above (NMS window, ``min_area``, the clustering radius 2.5 px, area 21 +- beta and
distance 100 px) are those of the network's input. When the maps are upsampled to an image ``scale`` times
larger (inference with ``instances.resize``), :func:`get_instances` multiplies lengths by ``scale`` and areas by
``scale ** 2``, so that the grouping sees the objects as it would at the training scale (the paper trains and
infers at about the same scale; its window 41 is in those pixels).

Conventions: offsets are ``(dy, dx)`` in pixels from a pixel to its center, as written by
:mod:`bestie.targets`; centers are ``(y, x)`` integer pixels. Flip averaging and offset rescaling to the
output size are the caller's job.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import cv2
import numpy as np

from bestie.errors import DataError
from bestie.params import GroupingParams

__all__ = [
    "find_instance_centers",
    "cluster_centers",
    "group_pixels",
    "semantic_argmax",
    "get_instances",
    "group_component",
    "scaled_grouping",
    "instance_peaks",
    "class_components",
    "nearest_center",
    "supported_centers",
    "SUPPORT_RADIUS",
    "CLUSTER_MAGNITUDE",
    "CLUSTER_AREA",
    "CLUSTER_MIN_SCORE",
    "CLUSTER_MIN_DISTANCE",
    "SOURCE_CENTER",
    "SOURCE_CLUSTER",
    "SOURCE_FALLBACK",
]

#: where an instance of :func:`get_instances` came from (``"sources"``, with ``return_sources=True``):
#: a center of the center map above the threshold (NMS), a clustered center (weak-offset region), or a
#: component without any center kept whole (the fallback)
SOURCE_CENTER, SOURCE_CLUSTER, SOURCE_FALLBACK = 0, 1, 2

#: offsets shorter than this (pixels) make the "weak offset" regions of center clustering
CLUSTER_MAGNITUDE = 2.5
#: ideal region area: integer (dy, dx) with dy^2 + dx^2 < 2.5^2
CLUSTER_AREA = 21
#: a clustered center needs a center score above this
CLUSTER_MIN_SCORE = 0.05
#: a clustered center joins existing NMS centers only farther than this (pixels) from all of them
CLUSTER_MIN_DISTANCE = 100.0
#: a center's votes count as support within this distance of it (pixels at the network input's scale)
SUPPORT_RADIUS = 8.0
#: elements per chunk of the (pixels x centers) distance matrix in nearest-center assignment
_CHUNK = 1 << 20


def _to_numpy(x, name: str, ndim: int) -> np.ndarray:
    """A detached CPU ``float32`` numpy view/copy of a tensor or array, with a dimension check."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != ndim:
        raise DataError(f"{name}: expected {ndim} dimensions, got shape {arr.shape}")
    if arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    return arr


@lru_cache(maxsize=8)
def _rect(k: int) -> np.ndarray:
    return np.ones((k, k), dtype=np.uint8)


def _nms(scores: np.ndarray, threshold: float, nms_kernel: int) -> np.ndarray:
    """``(K, 2)`` int64 ``(y, x)`` of pixels ``> threshold`` and ``> 0`` equal to their window maximum, in
    row-major order (the reference sets scores ``<= threshold`` to -1, then keeps maxima ``> 0``)."""
    cand = (scores > threshold) & (scores > 0)
    if not cand.any():
        return np.zeros((0, 2), dtype=np.int64)
    t = np.where(cand, scores, np.float32(-1.0)).astype(np.float32, copy=False)
    # cv2.dilate with a full rectangle = max filter; pixels beyond the border never win (treated as -inf),
    # the same as max_pool2d(kernel, stride 1, padding (kernel-1)//2).
    pooled = cv2.dilate(t, _rect(nms_kernel))
    return np.argwhere(cand & (t == pooled)).astype(np.int64)


def find_instance_centers(center, params: GroupingParams = GroupingParams(), *, top_k: int | None = None):
    """Center candidates of one center map by max-pool NMS (Panoptic-DeepLab ``find_instance_center``).

    Args:
        center: ``(H, W)`` float tensor or array, center scores.
        params: scores ``<= params.center_threshold`` (and ``<= 0``) are never centers; the window is
            ``params.nms_kernel`` pixels square (``beta`` and ``min_area`` are not used here).
        top_k: keep at most this many centers, the highest scores first (ties at the cut are kept);
            ``None`` keeps all.

    Returns:
        ``(K, 2)`` ``int64`` array of ``(y, x)`` pixels in row-major order.

    Raises:
        DataError: ``center`` is not 2-D.
    """
    scores = _to_numpy(center, "center", 2)
    ctr = _nms(scores, float(params.center_threshold), int(params.nms_kernel))
    if top_k is not None and ctr.shape[0] > top_k:
        vals = scores[ctr[:, 0], ctr[:, 1]]
        cut = np.sort(vals)[::-1][int(top_k) - 1]
        ctr = ctr[vals >= cut]
    return ctr


def cluster_centers(
    offset,
    fg,
    *,
    beta: float = GroupingParams.beta,
    magnitude_threshold: float = CLUSTER_MAGNITUDE,
    ideal_area: int = CLUSTER_AREA,
) -> np.ndarray:
    """Centers from regions of near-zero predicted offset ("center clustering" of the BESTIE code).

    Args:
        offset: ``(2, H, W)`` float ``(dy, dx)`` in pixels.
        fg: ``(H, W)`` bool mask of the pixels considered (one component).
        beta: area tolerance; a 4-connected region of ``fg & |offset| < magnitude_threshold`` counts when
            ``ideal_area - beta < area < ideal_area + beta``. ``beta <= 0`` gives no center.
        magnitude_threshold: offset length threshold in pixels (2.5).
        ideal_area: expected region area (21).

    Returns:
        ``(M, 2)`` ``int64`` ``(y, x)``: the region centroids truncated to whole pixels, in label order.
        (Unlike the public code, the region outside the weak mask, label 0, is never a candidate.)
    """
    off = _to_numpy(offset, "offset", 3)
    mask = np.asarray(fg.detach().cpu().numpy() if hasattr(fg, "detach") else fg, dtype=bool)
    if off.shape[0] != 2 or off.shape[1:] != mask.shape:
        raise DataError(f"cluster_centers: offset {off.shape} does not match fg {mask.shape}")
    if beta <= 0:
        return np.zeros((0, 2), dtype=np.int64)
    weak = mask & (off[0] * off[0] + off[1] * off[1] < magnitude_threshold * magnitude_threshold)
    if not weak.any():
        return np.zeros((0, 2), dtype=np.int64)
    bx, by, bw, bh = cv2.boundingRect(weak.view(np.uint8))
    sub = np.ascontiguousarray(weak[by : by + bh, bx : bx + bw])
    n, _, stats, cents = cv2.connectedComponentsWithStats(sub.view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    area = stats[1:, cv2.CC_STAT_AREA]
    ok = (area > ideal_area - beta) & (area < ideal_area + beta)
    sel = cents[1:][ok]
    if sel.size == 0:
        return np.zeros((0, 2), np.int64)
    # truncation of the centroid as the reference (np.int32 of the float centroid), in full coordinates
    return np.stack([by + sel[:, 1].astype(np.int64), bx + sel[:, 0].astype(np.int64)], axis=1)


def nearest_center(ly: np.ndarray, lx: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the center nearest to each location (Euclidean; the first center on ties).

    Args:
        ly, lx: ``(n,)`` float32 row / column of the locations (pixels, may be fractional).
        centers: ``(K, 2)`` ``(y, x)`` centers, ``K >= 1``.

    Returns:
        ``(n,)`` int64 indices into ``centers``.
    """
    k = centers.shape[0]
    n = ly.shape[0]
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    cy = centers[:, 0].astype(np.float32)[None, :]
    cx = centers[:, 1].astype(np.float32)[None, :]
    out = np.empty(n, dtype=np.int64)
    step = max(1, _CHUNK // k)  # bounds the (pixels x centers) distance matrix to _CHUNK elements
    for s in range(0, n, step):
        dy = ly[s : s + step, None] - cy
        dx = lx[s : s + step, None] - cx
        out[s : s + step] = np.argmin(dy * dy + dx * dx, axis=1)
    return out


def group_pixels(centers, offset, fg=None) -> np.ndarray:
    """Instance id of every pixel: the nearest center to ``pixel + offset`` (Panoptic-DeepLab ``group_pixels``).

    Args:
        centers: ``(K, 2)`` ``(y, x)`` pixel coordinates (array, tensor or list).
        offset: ``(2, H, W)`` float ``(dy, dx)``.
        fg: optional ``(H, W)`` bool; pixels outside get id 0.

    Returns:
        ``(H, W)`` ``int32``: ``1 + index`` of the nearest center (first on ties), 0 outside ``fg`` or when
        ``K == 0``.
    """
    off = _to_numpy(offset, "offset", 3)
    if off.shape[0] != 2:
        raise DataError(f"group_pixels: offset must be (2, H, W), got {off.shape}")
    ctr = np.asarray(centers.detach().cpu().numpy() if hasattr(centers, "detach") else centers, dtype=np.float64)
    ctr = ctr.reshape(-1, 2)
    h, w = off.shape[1:]
    ids = np.zeros((h, w), dtype=np.int32)
    if ctr.shape[0] == 0:
        return ids
    if fg is None:
        mask = np.ones((h, w), dtype=bool)
    else:
        mask = np.asarray(fg.detach().cpu().numpy() if hasattr(fg, "detach") else fg, dtype=bool)
    ys, xs = np.nonzero(mask)
    ly = ys.astype(np.float32) + off[0, ys, xs]
    lx = xs.astype(np.float32) + off[1, ys, xs]
    ids[ys, xs] = nearest_center(ly, lx, ctr) + 1
    return ids


def semantic_argmax(prob: np.ndarray) -> np.ndarray:
    """Argmax over axis 0 of a ``(K, H, W)`` float32 array (first index on ties), as ``(H, W)`` int64.

    Implemented as one max reduction plus per-channel equality tests, ~7x faster than ``np.argmax(axis=0)``.
    """
    k = prob.shape[0]
    best = prob.max(axis=0)
    eq = prob == best
    dt = np.uint8 if k <= 256 else np.int32
    idx = np.zeros(best.shape, dtype=dt)
    for i in range(1, k):
        idx += eq[i].view(np.uint8) * dt(i)
    ties = eq.sum(axis=0, dtype=np.int32) > 1
    out = idx.astype(np.int64)
    if ties.any():
        out[ties] = np.argmax(prob[:, ties], axis=0)
    return out


def scaled_grouping(params: GroupingParams, scale: float) -> GroupingParams:
    """``params`` for maps ``scale`` times the network input's size: ``nms_kernel`` x scale (rounded, made
    odd), ``min_area`` x scale ** 2; ``params`` itself for ``scale == 1``. (The clustering sizes, ``beta``
    included, are scaled by :func:`group_component`.)

    Raises:
        DataError: ``scale`` not finite and > 0.
    """
    if not (np.isfinite(scale) and scale > 0):
        raise DataError(f"scaled_grouping: scale must be a finite number > 0, got {scale!r}")
    if scale == 1.0:
        return params
    kernel = max(1, int(round(params.nms_kernel * scale)))
    return dataclasses.replace(params, nms_kernel=kernel + 1 - kernel % 2,
                               min_area=int(round(params.min_area * scale * scale)))


def group_component(
    scores: np.ndarray,
    comp: np.ndarray,
    offset: np.ndarray,
    params: GroupingParams,
    scale: float,
):
    """Centers and pixel grouping inside one component (steps 2-4 and 6 of the module docstring).

    Args:
        scores: ``(h, w)`` float32 center scores of the component's class, already 0 outside ``comp``;
            modified in place: clustered centers are marked 1.0.
        comp: ``(h, w)`` bool component mask.
        offset: ``(2, h, w)`` float32 ``(dy, dx)`` on the same pixels.
        params: ``center_threshold``, ``nms_kernel``, ``beta`` as in :func:`get_instances` (``min_area`` is
            the caller's: it selects the components); ``nms_kernel`` already at this resolution
            (:func:`scaled_grouping`), ``beta`` at the network input's.
        scale: these maps' size over the network input's: the clustering radius (2.5 px) and minimum distance
            (100 px) are scaled by it, its ideal area (21) and tolerance ``beta`` by its square (module docstring),
            and so is :data:`SUPPORT_RADIUS` of ``params.min_center_support`` (0 = off; self-refinement's
            grouping leaves it off).

    Returns:
        ``(centers, clustered, ys, xs, inst)``: ``(K, 2)`` int64 ``(y, x)`` centers (NMS first, then
        clustered), ``(K,)`` bool clustered flags, ``(n,)`` int64 row / column of the component pixels
        (row-major) and ``(n,)`` int64 index of each pixel's center; the last three are ``None`` when
        ``K == 0``.
    """
    centers = _nms(scores, params.center_threshold, int(params.nms_kernel))
    clustered = np.zeros(centers.shape[0], dtype=bool)
    if params.beta > 0:
        cl = cluster_centers(offset, comp, beta=params.beta * scale * scale,
                             magnitude_threshold=CLUSTER_MAGNITUDE * scale, ideal_area=CLUSTER_AREA * scale * scale)
        if cl.shape[0]:
            cl = cl[scores[cl[:, 0], cl[:, 1]] > CLUSTER_MIN_SCORE]
        if cl.shape[0] and centers.shape[0]:
            d2 = ((cl[:, None, :] - centers[None, :, :]).astype(np.float64) ** 2).sum(-1)
            cl = cl[np.sqrt(d2.min(axis=1)) > CLUSTER_MIN_DISTANCE * scale]
        if cl.shape[0]:
            scores[cl[:, 0], cl[:, 1]] = 1.0
            centers = np.concatenate([centers, cl], axis=0)
            clustered = np.concatenate([clustered, np.ones(cl.shape[0], dtype=bool)])
    if centers.shape[0] == 0:
        return centers, clustered, None, None, None
    ys, xs = np.nonzero(comp)
    ly = ys.astype(np.float32) + offset[0, ys, xs]
    lx = xs.astype(np.float32) + offset[1, ys, xs]
    inst = nearest_center(ly, lx, centers)
    if params.min_center_support > 0 and centers.shape[0] > 1:
        keep = supported_centers(ly, lx, centers, inst, params.min_center_support, SUPPORT_RADIUS * scale)
        if not keep.all():
            centers, clustered = centers[keep], clustered[keep]
            inst = nearest_center(ly, lx, centers)
    return centers, clustered, ys, xs, inst


def supported_centers(ly: np.ndarray, lx: np.ndarray, centers: np.ndarray, inst: np.ndarray, min_support: float,
                      radius: float) -> np.ndarray:
    """Which centers the offsets support (step 6 of the module docstring; a departure from the paper).

    Args:
        ly, lx: ``(n,)`` float32 votes ``pixel + offset`` (row, column) of the component's pixels.
        centers: ``(K, 2)`` int64 ``(y, x)`` centers. inst: ``(n,)`` int64 center of each pixel (nearest vote).
        min_support: share in ``[0, 1]`` of a group's pixels that must vote within ``radius`` of its center.
        radius: pixels, at the maps' resolution.

    Returns:
        ``(K,)`` bool: centers whose share reaches ``min_support``; when none does, the best-supported one
        (first on ties), so a component keeps at least one center.
    """
    near = (ly - centers[inst, 0]) ** 2 + (lx - centers[inst, 1]) ** 2 < radius * radius
    k = centers.shape[0]
    share = np.bincount(inst, weights=near, minlength=k) / np.maximum(np.bincount(inst, minlength=k), 1)
    keep = share >= min_support
    if not keep.any():
        keep[int(np.argmax(share))] = True
    return keep


def instance_peaks(values: np.ndarray, inst: np.ndarray, k: int) -> np.ndarray:
    """Per group, the position (index into ``values``) of its maximum, first on ties; -1 for empty groups
    (a group whose scores are all NaN gets its first element).

    Args:
        values: ``(n,)`` scores in row-major pixel order. inst: ``(n,)`` group index in ``0..k-1``.
    """
    out = np.full(k, -1, dtype=np.int64)
    if values.size == 0:
        return out
    if k == 1:
        out[0] = int(np.argmax(values))
        return out
    best = np.full(k, -np.inf, dtype=np.float64)
    np.fmax.at(best, inst, values.astype(np.float64))  # fmax: NaN scores never win
    hit = np.flatnonzero(values == best[inst])
    groups, first = np.unique(inst[hit], return_index=True)
    out[groups] = hit[first]
    missed = np.bincount(inst, minlength=k).astype(bool) & (out < 0)  # only with NaN scores
    if missed.any():
        grp, first_any = np.unique(inst, return_index=True)
        sel = missed[grp]
        out[grp[sel]] = first_any[sel]
    return out


def class_components(region: np.ndarray, min_area: int):
    """8-connected components of a bool mask with at least ``min_area`` pixels.

    Args:
        region: ``(H, W)`` bool mask (e.g. one class of a semantic map).
        min_area: smallest component kept, pixels.

    Returns:
        list of ``(y0, x0, comp)``: top-left corner and the ``(h, w)`` bool mask of the component inside
        its bounding box (label order of ``cv2.connectedComponents``).
    """
    rows = np.flatnonzero(region.any(axis=1))
    if rows.size == 0:
        return []
    cols = np.flatnonzero(region.any(axis=0))
    ry, rx = int(rows[0]), int(cols[0])
    sub = region[ry : int(rows[-1]) + 1, rx : int(cols[-1]) + 1]
    # Grana's block-based algorithm: same labels, about 2x faster with statistics than OpenCV's default
    n, lab, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(sub.view(np.uint8), 8, cv2.CV_32S, cv2.CCL_GRANA)
    out = []
    for k in np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= min_area).tolist():
        if k == 0:
            continue
        x0, y0, w, h = (int(v) for v in stats[k, :4])
        out.append((ry + y0, rx + x0, lab[y0 : y0 + h, x0 : x0 + w] == k))
    return out


def get_instances(
    seg_prob,
    center,
    offset,
    *,
    params: GroupingParams = GroupingParams(),
    ignore_centerless: bool = False,
    return_sources: bool = False,
    scale: float = 1.0,
) -> dict:
    """Instances of one image from softmax probabilities, center maps and offsets (METHOD.md section 4).

    Args:
        seg_prob: ``(C+1, H, W)`` float softmax probabilities (channel 0 background), tensor or array;
            flip averaging / label cleaning, if any, done by the caller.
        center: ``(C, H, W)`` float center heatmaps.
        offset: ``(2, H, W)`` float ``(dy, dx)`` in pixels at this resolution.
        params: :class:`~bestie.params.GroupingParams`: NMS score threshold ``center_threshold`` (0.1 at
            inference), odd NMS window ``nms_kernel`` (41), clustering tolerance ``beta`` (3; ``<= 0``
            disables clustering); components of the semantic argmax with fewer than ``min_area`` pixels
            are ignored (50).
        ignore_centerless: drop components without any center instead of keeping them whole.
        return_sources: also return ``"sources"``: ``(N,)`` int8, :data:`SOURCE_CENTER` /
            :data:`SOURCE_CLUSTER` / :data:`SOURCE_FALLBACK` per instance (the learning probe of BESTIE
            training and the prediction metrics count how many instances the center head produced).
        scale: the maps' size over the network input's (> 0; 1 = the maps are at the input's size): the
            pixel sizes of ``params`` and of the clustering are those of the network input, scaled here
            (:func:`scaled_grouping`, module docstring).

    Returns:
        ``{"masks": (N, H, W) bool, "labels": (N,) int64 0-based class, "scores": (N,) float32}``, ordered by
        class, then component (OpenCV label order), then center. ``N`` may be 0 (the public code returns a
        dummy instance, class 0 with an empty mask and score 0, instead).

    Raises:
        DataError: shapes that do not match; ``scale`` not finite and > 0.
    """
    prob = _to_numpy(seg_prob, "seg_prob", 3)
    ctr = _to_numpy(center, "center", 3)
    off = _to_numpy(offset, "offset", 3)
    c1, h, w = prob.shape
    if ctr.shape != (c1 - 1, h, w) or off.shape != (2, h, w):
        raise DataError(
            f"get_instances: seg_prob {prob.shape}, center {ctr.shape} and offset {off.shape} do not match "
            f"(expected (C+1,H,W), (C,H,W), (2,H,W))"
        )
    params = scaled_grouping(params, float(scale))
    seg = semantic_argmax(prob)
    present = np.flatnonzero(np.bincount(seg.ravel(), minlength=c1)[1:])
    found = []  # (class, y0, x0, local mask, score, source)
    for c in present.tolist():
        for y0, x0, comp in class_components(seg == c + 1, params.min_area):
            hh, ww = comp.shape
            win = (slice(y0, y0 + hh), slice(x0, x0 + ww))
            scores = np.where(comp, ctr[c][win], np.float32(0.0))
            pc = prob[c + 1][win]
            centers, clustered, ys, xs, inst = group_component(
                scores, comp, off[(slice(None),) + win], params, float(scale)
            )
            if ys is None:
                if not ignore_centerless:
                    found.append((c, y0, x0, comp, float(scores[comp].max()) * float(pc[comp].mean()),
                                  SOURCE_FALLBACK))
                continue
            vals = scores[ys, xs]
            peaks = instance_peaks(vals, inst, centers.shape[0])
            cnt = np.bincount(inst, minlength=centers.shape[0])
            psum = np.bincount(inst, weights=pc[ys, xs], minlength=centers.shape[0])
            cl_set = {(int(a), int(b)) for a, b in centers[clustered]}
            for i in np.flatnonzero(cnt).tolist():
                p = int(peaks[i])
                mean_prob = float(psum[i] / cnt[i])
                if (int(ys[p]), int(xs[p])) in cl_set:
                    score, source = mean_prob, SOURCE_CLUSTER
                else:
                    score, source = float(vals[p]) * mean_prob, SOURCE_CENTER
                m = np.zeros((hh, ww), dtype=bool)
                sel = inst == i
                m[ys[sel], xs[sel]] = True
                found.append((c, y0, x0, m, score, source))
    masks = np.zeros((len(found), h, w), dtype=bool)
    for j, (_, y0, x0, m, _, _) in enumerate(found):
        masks[j, y0 : y0 + m.shape[0], x0 : x0 + m.shape[1]] = m
    out = {
        "masks": masks,
        "labels": np.array([f[0] for f in found], dtype=np.int64),
        "scores": np.array([f[4] for f in found], dtype=np.float32),
    }
    if return_sources:
        out["sources"] = np.array([f[5] for f in found], dtype=np.int8)
    return out
