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

Two forms (issue 16): :func:`pseudo_instance_components` gives the compact labels the DataLoader ships (an
``int16`` map of the WSSS components, one table row per component, one row per Gaussian), and the dense
``(C, H, W)`` / ``(2, H, W)`` / ``(H, W)`` targets are rendered from them, per sample on the host
(:func:`render_pseudo_targets`, behind :func:`make_pseudo_instance_labels`) or batched on the training
device (:func:`render_targets`, fixed-shape tensor operations, no host sync); both give the same values.

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
    "pseudo_instance_components",
    "render_pseudo_targets",
    "render_targets",
    "MAX_COMPONENTS",
    "paste_gaussians",
    "split_by_points",
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
    comp = pseudo_instance_components(wsss, labels, points, num_classes=num_classes, params=params)
    return render_pseudo_targets(comp, num_classes=num_classes, sigma=params.sigma)


#: the largest component id of :func:`pseudo_instance_components`' ``int16`` map
MAX_COMPONENTS = int(np.iinfo(np.int16).max)


def pseudo_instance_components(
    wsss: np.ndarray,
    labels: Sequence[int],
    points,
    *,
    num_classes: int,
    params: PseudoLabelParams = PseudoLabelParams(),
) -> dict:
    """The compact form of the pseudo instance labels of one sample (what the DataLoader ships, issue 16).

    Every 8-connected component of ``wsss == c + 1`` with at least ``params.min_area`` pixels, for each
    present class ``c`` in ascending order (components in the label order of
    :func:`bestie.postprocess.class_components`), gets an id ``k = 1, 2, ...``; those holding exactly one kept
    point are the pseudo instances (module docstring). With ``params.split_components`` a component holding
    two or more such points is first split into one part per point (:func:`split_by_points`): the first part
    keeps the component's id, the others get ids after all components, and every part of at least
    ``min_area`` pixels is accepted. The same components (or parts) are the units of self-refinement
    (:mod:`bestie.refine`), so the map serves both.

    Args:
        wsss, labels, points, num_classes, params: as :func:`make_pseudo_instance_labels`.

    Returns:
        dict with ``"components"``: ``(H, W)`` ``int16``, 0 off components, ``k`` on component ``k``;
        ``"table"``: ``(K, 4)`` ``int32`` rows ``[class, y, x, accepted]`` of components ``1..K``, where
        ``(y, x)`` is the pixel the offsets of an accepted component point to (image setting: the centroid
        ``floor(v + 0.5)``; point setting: its point's pixel) and ``-1, -1`` for a rejected one;
        ``"gaussians"``: ``(G, 3)`` ``int32`` rows ``[class, y, x]`` of the Gaussians of the centre map
        (image setting: the accepted centroids; point setting: every kept point of a present class);
        ``"num_instances"``: ``int``, accepted components.

    Raises:
        DataError: malformed ``wsss``, ``labels`` or ``points``, or more than :data:`MAX_COMPONENTS` components.
        ConfigError: bad ``num_classes``.
    """
    from bestie.postprocess import class_components

    if int(num_classes) != num_classes or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    num_classes = int(num_classes)
    seg = check_label_map(wsss)
    height, width = seg.shape
    present = check_class_list(labels, num_classes)
    px, py, pcls, pconf, inside = point_pixels(points, height, width, num_classes)
    keep = inside & (pconf >= params.point_threshold) & np.isin(pcls, present)
    px, py, pcls = px[keep], py[keep], pcls[keep]

    comp_map = np.zeros((height, width), dtype=np.int16)
    rows: list[list[int]] = []
    boxes = []
    for c in present.tolist():
        for y0, x0, mask in class_components(seg == c + 1, params.min_area):
            _check_component_count(len(rows), params.min_area)
            rows.append([c, -1, -1, 0])
            boxes.append((y0, x0, mask))
            np.copyto(comp_map[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]], np.int16(len(rows)), where=mask)
    count, first = _points_per_component(comp_map, rows, py, px, pcls)
    merged = np.flatnonzero(count >= 2).tolist() if params.split_components else []
    for k in merged:
        _split_component(k, comp_map, rows, boxes, py, px, pcls, params.min_area)
    if merged:
        count, first = _points_per_component(comp_map, rows, py, px, pcls)
    table = np.array(rows, dtype=np.int32).reshape(-1, 4)
    for k in np.flatnonzero(count == 1).tolist():
        y0, x0, mask = boxes[k]
        if merged and np.count_nonzero(mask) < params.min_area:
            continue  # a split part below min_area stays a component, never an instance
        if params.setting == "image":
            # centroid = mean pixel coordinate (image moments), mapped to the nearest pixel floor(v + 0.5)
            mom = cv2.moments(mask.view(np.uint8), binaryImage=True)
            table[k, 1] = y0 + int(np.floor(mom["m01"] / mom["m00"] + 0.5))
            table[k, 2] = x0 + int(np.floor(mom["m10"] / mom["m00"] + 0.5))
        else:
            j = int(first[k + 1])
            table[k, 1], table[k, 2] = int(py[j]), int(px[j])
        table[k, 3] = 1
    acc = table[:, 3] == 1
    if params.setting == "image":
        gaussians = table[acc][:, :3]
    else:
        gaussians = np.stack([pcls, py, px], axis=1).astype(np.int32).reshape(-1, 3)
    return {"components": comp_map, "table": table, "gaussians": np.ascontiguousarray(gaussians, dtype=np.int32),
            "num_instances": int(acc.sum())}


def _check_component_count(n: int, min_area: int) -> None:
    if n >= MAX_COMPONENTS:
        raise DataError(f"pseudo labels: more than {MAX_COMPONENTS} WSSS components of >= {min_area} px in one crop")


def _points_per_component(comp_map: np.ndarray, rows: list, py, px, pcls) -> tuple[np.ndarray, np.ndarray]:
    """``(count, first)``: per component ``k = 0..K-1`` the number of kept points of its class on it, and per
    id ``0..K`` the index of the first such point (-1: none). A point counts for the component under it only
    when that component is of the point's class."""
    cls = np.array([r[0] for r in rows], dtype=np.int64)
    k_pt = comp_map[py, px].astype(np.int64)
    on = k_pt > 0
    on[on] = cls[k_pt[on] - 1] == pcls[on]
    count = np.bincount(k_pt[on], minlength=len(rows) + 1)[1:]
    first = np.full(len(rows) + 1, -1, dtype=np.int64)
    idx = np.flatnonzero(on)
    first[k_pt[idx[::-1]]] = idx[::-1]
    return count, first


def split_by_points(mask: np.ndarray, ys, xs) -> np.ndarray:
    """Split a region into one part per point: every pixel goes to its nearest point (Euclidean distance
    in pixels; ties to the lower index), a Voronoi partition clipped to the region.

    Args:
        mask: ``(H, W)`` ``bool`` region.
        ys, xs: ``(P,)`` integer pixel coordinates (row, column) of the points, ``P >= 1``; they may lie
            outside ``mask``.

    Returns:
        ``(H, W)`` ``int32``: 0 off the region, ``i + 1`` on the pixels nearest to point ``i``. A part may
        be empty (two points on one pixel) or, for a non-convex region, not connected.

    Raises:
        ValueError: no points, or ``ys`` and ``xs`` of different lengths.
    """
    ys = np.asarray(ys, dtype=np.float32).reshape(-1)
    xs = np.asarray(xs, dtype=np.float32).reshape(-1)
    if ys.size == 0 or ys.size != xs.size:
        raise ValueError(f"split_by_points needs as many ys as xs, at least one; got {ys.size} and {xs.size}")
    pix_y, pix_x = np.nonzero(mask)
    best = np.full(pix_y.shape, np.inf, dtype=np.float32)
    part = np.zeros(pix_y.shape, dtype=np.int32)
    for i in range(ys.size):  # P is small (the points of one component): a loop over points, not pixels
        d = (pix_y - ys[i]) ** 2 + (pix_x - xs[i]) ** 2
        closer = d < best
        best[closer] = d[closer]
        part[closer] = i + 1
    out = np.zeros(mask.shape, dtype=np.int32)
    out[pix_y, pix_x] = part
    return out


def _split_component(k: int, comp_map, rows: list, boxes: list, py, px, pcls, min_area: int) -> None:
    """Split component ``k`` (0-based) in place by its points of its class (:func:`split_by_points`): the first
    part (never empty: it holds its own point and wins ties) keeps id ``k + 1``, the other non-empty parts get
    new ids appended to ``rows`` / ``boxes``."""
    c = rows[k][0]
    y0, x0, mask = boxes[k]
    h, w = mask.shape
    sel = np.flatnonzero((comp_map[py, px] == k + 1) & (pcls == c))
    parts = split_by_points(mask, py[sel] - y0, px[sel] - x0)
    boxes[k] = (y0, x0, parts == 1)
    view = comp_map[y0 : y0 + h, x0 : x0 + w]
    for i in range(2, len(sel) + 1):
        part = parts == i
        if not part.any():
            continue
        _check_component_count(len(rows), min_area)
        rows.append([c, -1, -1, 0])
        boxes.append((y0, x0, part))
        np.copyto(view, np.int16(len(rows)), where=part)


def render_pseudo_targets(comp: dict, *, num_classes: int, sigma: float = PseudoLabelParams.sigma) -> dict:
    """Dense targets of one sample from its compact labels (:func:`pseudo_instance_components`), on the host.

    Args:
        comp: ``{"components", "table", "gaussians", "num_instances"}`` of one sample.
        num_classes: ``C``. sigma: of the Gaussians (pixels).

    Returns:
        ``{"center": (C, H, W), "offset": (2, H, W), "weight": (H, W)}`` ``float32`` and ``"num_instances"``,
        as :func:`make_pseudo_instance_labels` (the batched device version is :func:`render_targets`).
    """
    comp_map, table = comp["components"], comp["table"]
    height, width = comp_map.shape
    center = np.zeros((num_classes, height, width), dtype=np.float32)
    kernel = gaussian_kernel(sigma)
    for c, y, x in comp["gaussians"].tolist():
        draw_gaussian(center[c], x, y, kernel)
    acc = np.concatenate([[0.0], table[:, 3]]).astype(np.float32)
    ty = np.concatenate([[0], table[:, 1]]).astype(np.float32)
    tx = np.concatenate([[0], table[:, 2]]).astype(np.float32)
    weight = acc[comp_map]
    offset = np.zeros((2, height, width), dtype=np.float32)
    on = weight > 0
    if on.any():
        ys, xs = np.nonzero(on)
        k = comp_map[ys, xs]
        offset[0, ys, xs] = ty[k] - ys
        offset[1, ys, xs] = tx[k] - xs
    return {"center": center, "offset": offset, "weight": weight, "num_instances": int(comp["num_instances"])}


@lru_cache(maxsize=8)
def _kernel_on(sigma: float, device: str):
    """:func:`gaussian_kernel` as a tensor on ``device``, made once (a host copy per step would sync)."""
    import torch

    return torch.from_numpy(np.array(gaussian_kernel(sigma))).to(device)


def render_targets(
    components,
    table,
    gaussians,
    first_row,
    *,
    num_classes: int,
    sigma: float = PseudoLabelParams.sigma,
) -> dict:
    """Dense pseudo targets of a batch from its compact labels, rendered on the batch's device (issue 16).

    Equal to :func:`render_pseudo_targets` (:func:`make_pseudo_instance_labels`) per sample: the same kernel
    values pasted with a maximum, the same whole-pixel offsets. Made of fixed-shape tensor operations only
    (no host synchronisation on CUDA).

    Args:
        components: ``(B, H, W)`` integer tensor (``int16``): per sample, 0 or the 1-based row of that
            sample's components.
        table: ``(N, 5)`` integer tensor ``[sample, class, y, x, accepted]``: the components of all samples,
            sample by sample (:func:`bestie.instance_data.collate_compact`).
        gaussians: ``(G, 4)`` integer tensor ``[sample, class, y, x]``.
        first_row: ``(B,)`` int64 tensor, the row of ``table`` where each sample's components start.
        num_classes: ``C``. sigma: of the Gaussians (pixels).

    Returns:
        ``{"center": (B, C, H, W), "offset": (B, 2, H, W), "weight": (B, H, W)}`` ``float32`` tensors on the
        device of ``components``.
    """
    import torch

    dev = components.device
    b_, h, w = components.shape
    local = components.long()
    gid = torch.where(local > 0, local + first_row.to(dev).view(b_, 1, 1), 0)  # row + 1 of table, 0 = none
    tab = table.to(dev).long()
    zero = torch.zeros(1, dtype=torch.float32, device=dev)
    acc = torch.cat([zero, tab[:, 4].float()])
    weight = acc[gid]
    ys = torch.arange(h, device=dev, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, device=dev, dtype=torch.float32).view(1, 1, w)
    oy = (torch.cat([zero, tab[:, 2].float()])[gid] - ys) * weight
    ox = (torch.cat([zero, tab[:, 3].float()])[gid] - xs) * weight
    offset = torch.stack([oy, ox], dim=1)
    if dev.type == "cpu":  # np.zeros is calloc: pages are zeroed lazily, torch.zeros writes all of them
        center = torch.from_numpy(np.zeros((b_, num_classes, h, w), dtype=np.float32))
    else:
        center = torch.zeros((b_, num_classes, h, w), dtype=torch.float32, device=dev)
    paste_gaussians(center, gaussians.to(dev).long(), None, sigma)
    return {"center": center, "offset": offset, "weight": weight}


def paste_gaussians(center, where, valid, sigma: float) -> None:
    """Paste the Gaussian kernel (:func:`gaussian_kernel`) into ``center`` in place with a maximum, batched:
    the device counterpart of :func:`draw_gaussian` (clipped at the border, peaks outside draw nothing).

    Args:
        center: ``(B, C, H, W)`` float32 tensor, values ``>= 0``.
        where: ``(G, 4)`` int64 tensor ``[sample, class, y, x]`` on ``center``'s device.
        valid: ``(G,)`` bool tensor (rows to paste) or None (all rows).
        sigma: of the kernel (pixels).
    """
    import torch

    b_, num_classes, h, w = center.shape
    kernel = _kernel_on(check_sigma(sigma), str(center.device))
    r = kernel.shape[0] // 2
    d = torch.arange(-r, r + 1, device=center.device)
    py = where[:, 2:3, None] + d.view(1, -1, 1)  # (G, 2r+1, 1)
    px = where[:, 3:4, None] + d.view(1, 1, -1)  # (G, 1, 2r+1)
    ok = (py >= 0) & (py < h) & (px >= 0) & (px < w)
    if valid is not None:
        ok = ok & valid.view(-1, 1, 1)
    flat = ((where[:, 0, None, None] * num_classes + where[:, 1, None, None]) * h + py) * w + px
    flat = torch.where(ok, flat, 0)
    vals = torch.where(ok, kernel.unsqueeze(0), 0.0)
    center.view(-1).scatter_reduce_(0, flat.reshape(-1), vals.reshape(-1), reduce="amax")
