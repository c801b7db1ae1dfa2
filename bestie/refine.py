"""Online self-refinement: refined center/offset/weight targets from the network's own outputs.

METHOD.md section 4 ("Self-refinement"), after the public ``refine_label_generation`` and
``refine_label_generation_with_point``, rewritten vectorised, in two implementations with the same results:

- the host path (numpy + OpenCV per sample and component; the softmax on the input device, only on pixels
  of present classes), used on the CPU, where it is the fastest;
- the device path (on CUDA, issue 16; :func:`_refine_device_point` in the point setting, a loop over the
  point slots): the whole batch at once in fixed-shape tensor
  operations, no host round-trip or sync. The WSSS components come from the DataLoader
  (:func:`bestie.targets.pseudo_instance_components`, the same components as the pseudo labels); NMS is a
  separable max pool over one map per component; the weak-offset regions of centre clustering are labelled
  by min-propagation for a fixed ``ceil(21 + beta)`` steps (enough for every region of an accepted size);
  the centres of each component (at most :data:`DEVICE_MAX_CENTERS`; a component with more is skipped) are
  ordered by a sort, the grouping is a loop over the centre slots, the group statistics are scatter
  reductions. The tests run every hand-made case on both paths.

Image setting, for each sample, each present class ``c`` and each 8-connected component of
``wsss == c + 1`` with at least ``min_area`` pixels:

1. the component's pixels are grouped by :func:`bestie.postprocess.group_component` on the class-``c``
   center map restricted to the component (:class:`~bestie.params.RefineParams`: center threshold 0.3, NMS
   kernel 41, center clustering with beta 3; clustered centers are marked 1.0 in that map);
2. a component with more than ``max_instances`` non-empty groups is skipped (no target: weight 0). The
   public code compares the largest group id instead, which can differ when the last center gets no pixel;
3. for each non-empty group: ``(py, px)`` = argmax of the (marked) center map over its pixels (first in
   row-major order on ties), center score = the map there, ``p`` = mean softmax probability of ``c`` over
   the group; ``conf = center score x p``;
4. **fallback** when the center score is below ``center_threshold`` (the group holds no confident center
   pixel): ``conf = p`` and the target center is the group's *own* center, i.e. the NMS / clustered center
   its pixels were assigned to. Decision: the public code takes the centroid of the whole WSSS
   component instead, which is wrong as soon as the component holds more than one group (the centroid
   may lie inside another instance or outside the component, so the offsets of this group would point
   into its neighbour). The own center is where the network's offsets of these pixels already point,
   so the target stays consistent with the grouping; for a one-group component the two differ only by
   how far the network's center is from the centroid;
5. ``conf`` is clipped to ``[0, 1]``; a Gaussian (sigma, size ``6 sigma + 3``, see
   :mod:`bestie.targets`) is drawn at ``(py, px)`` on channel ``c`` of the refined center map, and every
   pixel of the group gets the offset ``(py, px) - pixel`` and weight ``conf``.

Components without any center give no target. Point setting: every pixel of ``wsss == c + 1`` (all
components, no size filter, as in the public code) of a class with kept points goes to the point of class
``c`` nearest to ``pixel + predicted offset``; its offset points to that point, weight 1; there is no
refined center target (``has_center = False``, center map all zero).

Fixed faults of the public point code: points on row 0 or column 0 count (it dropped ``x == 0`` or
``y == 0`` as padding), any number of points per class (it used a 128-slot buffer).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bestie.errors import DataError
from bestie.params import GroupingParams, PseudoLabelParams, RefineParams
from bestie.postprocess import (
    CLUSTER_AREA,
    CLUSTER_MAGNITUDE,
    CLUSTER_MIN_DISTANCE,
    CLUSTER_MIN_SCORE,
    class_components,
    group_component,
    instance_peaks,
    nearest_center,
)
from bestie.targets import (
    paste_gaussians,
    check_class_list,
    check_label_map,
    draw_gaussian,
    gaussian_kernel,
    point_pixels,
)

__all__ = ["refine_targets", "own_class_probability"]


def own_class_probability(seg_logits: torch.Tensor, seg: list[np.ndarray], present: list[np.ndarray]) -> np.ndarray:
    """Softmax probability of each pixel's WSSS class, on pixels whose class is present.

    Evaluated as ``p = 1 / sum_j exp(l_j - l_own)`` on the device of ``seg_logits`` and only on the pixels
    of present classes. This is exact and safe: the sum is ``>= 1`` (own term), an overflow to ``inf``
    gives ``p = 0``, the correct limit.

    Args:
        seg_logits: ``(B, C+1, H, W)`` float logits (any device).
        seg: per sample, ``(H, W)`` ``uint8`` WSSS map (0 background, ``c + 1`` class ``c``, 255 ignore).
        present: per sample, ``int64`` array of present classes (0-based).

    Returns:
        ``(B, H, W)`` ``float32`` numpy: the probability of channel ``seg[b][y, x]`` where
        ``seg[b][y, x] - 1`` is a present class, else 0.
    """
    b_, c1, h, w = seg_logits.shape
    device = seg_logits.device
    out = _zeros_np((b_, h * w))
    for b in range(b_):
        cls = present[b]
        if cls.size == 0:
            continue
        lut = np.zeros(256, dtype=bool)
        lut[cls + 1] = True
        flat = seg[b].reshape(-1)
        idx = np.flatnonzero(lut[flat])
        if idx.size == 0:
            continue
        idx_t = torch.from_numpy(idx).to(device)
        own_ch = torch.from_numpy(flat[idx].astype(np.int64)).to(device)
        lg = seg_logits[b].reshape(c1, h * w).index_select(1, idx_t).float()  # (C+1, n), a fresh tensor
        own = lg.gather(0, own_ch.unsqueeze(0))
        p = lg.sub_(own).exp_().sum(dim=0).reciprocal_()
        out[b, idx] = p.cpu().numpy()
    return out.reshape(b_, h, w)


def _zeros_np(shape) -> np.ndarray:
    """Zero ``float32`` array from ``np.zeros`` (calloc: pages are zeroed lazily by the OS, unlike
    ``torch.zeros`` on the CPU, which writes every byte; ~100x faster for a 110 MB target that is mostly
    never written)."""
    return np.zeros(shape, dtype=np.float32)


def _dense_host_buffers(device: torch.device) -> bool:
    """Whether the image-setting center target is written straight into a host array (CPU device) rather
    than gathered per (sample, class) pair and scattered on the device (a separate function so that tests
    can run the device path on the CPU)."""
    return device.type == "cpu"


def _zeros_like_target(shape, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return torch.from_numpy(_zeros_np(shape))
    return torch.zeros(shape, dtype=torch.float32, device=device)


def _refine_sample_image(
    prob: np.ndarray,
    center_of,
    offset: np.ndarray,
    seg: np.ndarray,
    present: np.ndarray,
    out_center_of,
    out_offset: np.ndarray,
    out_weight: np.ndarray,
    *,
    kernel: np.ndarray,
    grouping: GroupingParams,
    max_instances: int,
) -> None:
    """Image-setting refinement of one sample into the given output arrays (module docstring, steps 1-5)."""
    threshold = grouping.center_threshold
    for c in present.tolist():
        comps = class_components(seg == c + 1, grouping.min_area)
        if not comps:
            continue
        ctr = center_of(c)
        for y0, x0, comp in comps:
            hh, ww = comp.shape
            win = (slice(y0, y0 + hh), slice(x0, x0 + ww))
            scores = np.where(comp, ctr[win], np.float32(0.0))
            centers, _, ys, xs, inst = group_component(scores, comp, offset[(slice(None),) + win], grouping,
                                                       1.0)  # training crops: the network's own scale
            if ys is None:
                continue
            k = centers.shape[0]
            cnt = np.bincount(inst, minlength=k)
            if int((cnt > 0).sum()) > max_instances:
                continue
            vals = scores[ys, xs]
            peaks = instance_peaks(vals, inst, k)
            mean_prob = np.bincount(inst, weights=prob[win][ys, xs], minlength=k) / np.maximum(cnt, 1)
            ty = centers[:, 0].copy()
            tx = centers[:, 1].copy()
            conf = mean_prob.copy()
            nonempty = cnt > 0
            pk = np.where(nonempty, peaks, 0)
            cscore = vals[pk]
            confident = nonempty & (cscore >= threshold)
            ty[confident] = ys[pk[confident]]
            tx[confident] = xs[pk[confident]]
            conf[confident] = cscore[confident] * mean_prob[confident]
            conf = np.clip(conf, 0.0, 1.0).astype(np.float32)
            heat = out_center_of(c)
            for i in np.flatnonzero(nonempty).tolist():
                draw_gaussian(heat, x0 + int(tx[i]), y0 + int(ty[i]), kernel)
            oy = out_offset[(0,) + win]
            ox = out_offset[(1,) + win]
            oy[ys, xs] = (ty[inst] - ys).astype(np.float32)
            ox[ys, xs] = (tx[inst] - xs).astype(np.float32)
            out_weight[win][ys, xs] = conf[inst]


def _refine_sample_point(
    offset: np.ndarray,
    seg: np.ndarray,
    present: np.ndarray,
    px: np.ndarray,
    py: np.ndarray,
    pcls: np.ndarray,
    out_offset: np.ndarray,
    out_weight: np.ndarray,
) -> None:
    """Point-setting refinement of one sample: nearest given point after shifting by the predicted offset."""
    for c in present.tolist():
        sel = pcls == c
        if not sel.any():
            continue
        ys, xs = np.nonzero(seg == c + 1)
        if ys.size == 0:
            continue
        pts = np.stack([py[sel], px[sel]], axis=1)
        ly = ys.astype(np.float32) + offset[0, ys, xs]
        lx = xs.astype(np.float32) + offset[1, ys, xs]
        near = nearest_center(ly, lx, pts)
        out_offset[0, ys, xs] = (pts[near, 0] - ys).astype(np.float32)
        out_offset[1, ys, xs] = (pts[near, 1] - xs).astype(np.float32)
        out_weight[ys, xs] = 1.0


@torch.no_grad()
def refine_targets(
    seg_logits: torch.Tensor,
    center: torch.Tensor | None,
    offset: torch.Tensor,
    wsss: torch.Tensor,
    labels,
    points=None,
    *,
    pseudo: PseudoLabelParams = PseudoLabelParams(),
    refine: RefineParams = RefineParams(),
    components: tuple | None = None,
) -> dict:
    """Refined targets of a batch from detached network outputs (METHOD.md section 4, "Self-refinement").

    Args:
        seg_logits: ``(B, C+1, H, W)`` semantic logits (softmax is taken here).
        center: ``(B, C, H, W)`` predicted center heatmaps (unused, may be ``None``, in the point setting).
        offset: ``(B, 2, H, W)`` predicted ``(dy, dx)`` offsets in pixels.
        wsss: ``(B, H, W)`` integer WSSS maps (0 background, ``c + 1`` class ``c``, 255 ignore), any device.
        labels: per sample, the present classes (0-based; list, array or tensor of integers).
        points: per sample, ``(N, 4)`` ``x, y, class, conf`` (tensor or array); only read in the point
            setting, where points with ``conf < pseudo.point_threshold``, a class not in the sample's labels or
            a pixel ``floor(v + 0.5)`` outside the image are ignored.
        pseudo: the pseudo labels' :class:`~bestie.params.PseudoLabelParams`: ``setting`` (``"image"`` or
            ``"point"``), ``sigma`` of the refined center Gaussians (pixels), ``min_area`` (WSSS components
            with fewer pixels are ignored, image setting), ``point_threshold`` (point setting).
        refine: :class:`~bestie.params.RefineParams`: NMS and fallback threshold ``center_threshold`` (0.3),
            odd NMS window ``nms_kernel`` (41), center clustering tolerance ``beta`` (3; ``<= 0`` disables
            clustering), ``max_instances``: components with more groups are skipped (5).
        components: the batch's WSSS components as the DataLoader ships them (``(components (B, H, W) int16,
            table (N, 5), first_row (B,))`` of :func:`bestie.instance_data.collate_compact`), used by the
            device path; None: computed from ``wsss`` on the host when needed.

    On a CUDA device both settings run batched on the device, without a host round-trip or sync
    (:func:`_refine_device_image`, :func:`_refine_device_point`; the host path's targets within float
    rounding, except that a component with more than :data:`DEVICE_MAX_CENTERS` centres is skipped); on
    the CPU per sample on the host.

    Returns:
        ``{"center": (B, C, H, W), "offset": (B, 2, H, W), "weight": (B, H, W)}`` ``float32`` tensors on the
        device of ``seg_logits``, plus ``"has_center"``: ``True`` in the image setting, ``False`` in the
        point setting (then ``"center"`` is all zero and must not be used as a target).

    Raises:
        DataError: mismatched shapes, bad labels / points / WSSS values. (Bad parameters raise ConfigError
        when the parameter groups are made.)
    """
    setting = pseudo.setting
    _check_inputs(seg_logits, center, offset, wsss, labels, points, setting)
    b_, c1, h, w = seg_logits.shape
    ncls = c1 - 1
    device = seg_logits.device
    present = [check_class_list(labels[b], ncls, f"labels[{b}]") for b in range(b_)]
    if _device_path(device):
        if setting == "point":
            return _refine_device_point(offset.detach(), wsss, present, points, ncls, pseudo.point_threshold)
        if components is None:
            components = host_components(wsss, present, int(pseudo.min_area), device)
        return _refine_device_image(seg_logits.detach(), center.detach(), offset.detach(), components, pseudo,
                                    refine)
    wsss_cpu = wsss.detach().cpu()
    seg = [check_label_map(wsss_cpu[b], f"wsss[{b}]") for b in range(b_)]
    off_np = offset.detach().float().cpu().numpy()

    on_cpu = _dense_host_buffers(device)
    out_offset = _zeros_np((b_, 2, h, w))
    out_weight = _zeros_np((b_, h, w))

    if setting == "point":
        _refine_points(points, off_np, seg, present, ncls, pseudo.point_threshold, out_offset, out_weight)
        center_t = _zeros_like_target((b_, ncls, h, w), device)
        has_center = False
    else:
        kernel = gaussian_kernel(pseudo.sigma)
        prob = own_class_probability(seg_logits.detach(), seg, present)
        pairs = [(b, c) for b in range(b_) for c in present[b].tolist()]
        centers = _CenterBuffers(center, pairs, on_cpu, device)
        grouping = refine.grouping(int(pseudo.min_area))
        for b in range(b_):
            _refine_sample_image(
                prob[b],
                lambda c, b=b: centers.predicted[(b, c)],
                off_np[b],
                seg[b],
                present[b],
                lambda c, b=b: centers.target[(b, c)],
                out_offset[b],
                out_weight[b],
                kernel=kernel,
                grouping=grouping,
                max_instances=int(refine.max_instances),
            )
        center_t = centers.result()
        has_center = True
    return {
        "center": center_t,
        "offset": torch.from_numpy(out_offset).to(device),
        "weight": torch.from_numpy(out_weight).to(device),
        "has_center": has_center,
    }


def _check_inputs(seg_logits: torch.Tensor, center: torch.Tensor | None, offset: torch.Tensor, wsss: torch.Tensor,
                  labels: Any, points: Any, setting: str) -> None:
    """The shape checks of :func:`refine_targets` (DataError naming the argument and the expected shape)."""
    if seg_logits.ndim != 4:
        raise DataError(f"refine_targets: seg_logits must be (B, C+1, H, W), got {tuple(seg_logits.shape)}")
    b_, c1, h, w = seg_logits.shape
    ncls = c1 - 1
    if tuple(offset.shape) != (b_, 2, h, w):
        raise DataError(f"refine_targets: offset must be {(b_, 2, h, w)}, got {tuple(offset.shape)}")
    if setting == "image" and (center is None or tuple(center.shape) != (b_, ncls, h, w)):
        got = None if center is None else tuple(center.shape)
        raise DataError(f"refine_targets: center must be {(b_, ncls, h, w)}, got {got}")
    if tuple(wsss.shape) != (b_, h, w):
        raise DataError(f"refine_targets: wsss must be {(b_, h, w)}, got {tuple(wsss.shape)}")
    if len(labels) != b_:
        raise DataError(f"refine_targets: {len(labels)} label lists for a batch of {b_}")
    if setting == "point" and (points is None or len(points) != b_):
        raise DataError(f"refine_targets: the point setting needs one point set per sample (batch {b_})")


def _refine_points(points: Any, off_np: np.ndarray, seg: list[np.ndarray], present: list[np.ndarray], ncls: int,
                   point_threshold: float, out_offset: np.ndarray, out_weight: np.ndarray) -> None:
    """Point setting: fill ``out_offset`` ``(B, 2, H, W)`` and ``out_weight`` ``(B, H, W)`` from each sample's
    points (those with ``conf >= point_threshold``, a class of ``present`` and a pixel inside the image)."""
    b_, _, h, w = off_np.shape
    for b in range(b_):
        pts = points[b]
        if hasattr(pts, "detach"):
            pts = pts.detach().cpu().numpy()
        px, py, pcls, pconf, inside = point_pixels(pts, h, w, ncls, f"points[{b}]")
        keep = inside & (pconf >= point_threshold) & np.isin(pcls, present[b])
        _refine_sample_point(off_np[b], seg[b], present[b], px[keep], py[keep], pcls[keep],
                             out_offset[b], out_weight[b])


class _CenterBuffers:
    """Host views of the predicted centre maps and of the refined centre targets, per (sample, class) pair.

    On a device whose dense host buffers are cheap (:func:`_dense_host_buffers`) the whole ``(B, C, H, W)``
    maps are copied; else only the maps of the present ``pairs`` travel (one gather, one scatter).
    :meth:`result` is the ``(B, C, H, W)`` float32 target tensor on ``device`` (the logits').
    """

    def __init__(self, center: torch.Tensor, pairs: list[tuple[int, int]], on_cpu: bool, device: torch.device) -> None:
        b_, ncls, h, w = center.shape
        self.shape, self.device, self.on_cpu, self.pairs = (b_, ncls, h, w), device, on_cpu, pairs
        if on_cpu:
            ctr_np = center.detach().float().numpy()
            self.out = _zeros_np((b_, ncls, h, w))
            self.predicted = {p: ctr_np[p[0], p[1]] for p in pairs}
            self.target = {p: self.out[p[0], p[1]] for p in pairs}
            return
        if pairs:
            self.bi = torch.tensor([p[0] for p in pairs], device=self.device)
            self.ci = torch.tensor([p[1] for p in pairs], device=self.device)
            ctr_pairs = center.detach()[self.bi, self.ci].float().cpu().numpy()
        else:
            ctr_pairs = np.zeros((0, h, w), dtype=np.float32)
        self.out = np.zeros((len(pairs), h, w), dtype=np.float32)
        self.predicted = {p: ctr_pairs[j] for j, p in enumerate(pairs)}
        self.target = {p: self.out[j] for j, p in enumerate(pairs)}

    def result(self) -> torch.Tensor:
        """The refined centre targets ``(B, C, H, W)`` float32 (zero outside the present pairs)."""
        if self.on_cpu:
            return torch.from_numpy(self.out)
        center_t = torch.zeros(self.shape, dtype=torch.float32, device=self.device)
        if self.pairs:
            center_t[self.bi, self.ci] = torch.from_numpy(self.out).to(self.device)
        return center_t


# ------------------------------------------------------------------------------------- the device path
#: centres per component the batched device path holds (NMS + clustered); a component with more is skipped
DEVICE_MAX_CENTERS = 64


def _device_path(device: torch.device) -> bool:
    """Whether :func:`refine_targets` runs batched on the device (CUDA) rather than per sample on the host (the
    CPU, where numpy + OpenCV per component is faster); a separate function so that tests run the device path
    on the CPU."""
    return device.type != "cpu"


def host_components(wsss: torch.Tensor, present: list[np.ndarray], min_area: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The components of self-refinement computed on the host from the WSSS maps, in the form the DataLoader
    ships them (:func:`bestie.instance_data.collate_compact`): ``(components (B, H, W) int16, table (N, 5)
    int32 [sample, class, -1, -1, 0], first_row (B,) int64)`` on ``device`` (for callers without them)."""
    seg = wsss.detach().cpu().numpy()
    maps, rows, first = np.zeros(seg.shape, np.int16), [], []
    for b in range(seg.shape[0]):
        first.append(len(rows))
        for c in present[b].tolist():
            for y0, x0, mask in class_components(seg[b] == c + 1, min_area):
                rows.append([b, c, -1, -1, 0])
                k = len(rows) - first[-1]
                np.copyto(maps[b, y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]], np.int16(k), where=mask)
    table = np.array(rows, np.int32).reshape(-1, 5)
    return (torch.from_numpy(maps).to(device), torch.from_numpy(table).to(device),
            torch.tensor(first, dtype=torch.int64).to(device))


def _scores_and_prob(seg_logits: torch.Tensor, center: torch.Tensor, gid: torch.Tensor,
                     cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel of a component: the centre score of the component's class and the softmax probability of that
    class (:func:`own_class_probability`'s formula); 0 elsewhere. ``(B, H, W)`` float32 each."""
    on = gid > 0
    c_map = torch.cat([cls.new_zeros(1), cls])[gid]  # class of the pixel's component (0 off components)
    scores = center.float().gather(1, c_map.unsqueeze(1)).squeeze(1) * on
    lg = seg_logits.float()
    own = lg.gather(1, (c_map + 1).unsqueeze(1))
    prob = (lg - own).exp_().sum(dim=1).reciprocal_() * on
    return scores, prob


def _nms_peaks(scores: torch.Tensor, gid: torch.Tensor, smp: torch.Tensor, threshold: float,
               kernel: int) -> torch.Tensor:
    """``(B, H, W)`` bool: the pixels equal to the maximum of their ``kernel`` window among the candidate pixels
    (score above ``threshold`` and 0) of their own component (:func:`bestie.postprocess.find_instance_centers`
    per component, as separable max pools over one map per component)."""
    n = smp.shape[0]
    cand = (gid > 0) & (scores > threshold) & (scores > 0)
    t = torch.where(cand, scores, -1.0)
    own = gid[smp] == torch.arange(1, n + 1, device=gid.device).view(n, 1, 1)
    tn = torch.where(own, t[smp], float("-inf")).unsqueeze(1)
    r = kernel // 2
    pooled = F.max_pool2d(F.max_pool2d(tn, (1, kernel), 1, (0, r)), (kernel, 1), 1, (r, 0)).squeeze(1)
    peak = (own & (tn.squeeze(1) == pooled)).float()
    hit = torch.zeros(scores.shape, device=scores.device).index_add_(0, smp, peak) > 0
    return hit & cand


def _to_pixels(pair: torch.Tensor, dim: int, fill) -> tuple[torch.Tensor, torch.Tensor]:
    """A value per pair of neighbours along ``dim`` (size ``n - 1``) given to the first and to the second pixel
    of each pair (size ``n``; ``fill`` where a pixel has no such pair)."""
    pad_end = (0, 0, 0, 1) if dim == 1 else (0, 1)
    pad_start = (0, 0, 1, 0) if dim == 1 else (1, 0)
    return F.pad(pair, pad_end, value=fill), F.pad(pair, pad_start, value=fill)


def _weak_regions(offset: torch.Tensor, gid: torch.Tensor, beta: float) -> tuple[torch.Tensor, ...]:
    """The 4-connected regions of short predicted offsets (``|offset| < 2.5``) inside each component, labelled
    by their first pixel (flat index over the batch) with a fixed number of min-propagation steps; returns
    ``(root (B, H, W) bool: the first pixel of a complete region of area strictly between 21 - beta and
    21 + beta, cy, cx (B, H, W) int64: that region's centroid truncated to whole pixels)``. A region is
    complete when no neighbour of it carries another label; regions too large to converge in
    ``ceil(21 + beta)`` steps are larger than ``21 + beta`` pixels, so no region of a valid size is missed."""
    b_, h, w = gid.shape
    dev = gid.device
    off = offset.float()
    weak = (gid > 0) & (off[:, 0] * off[:, 0] + off[:, 1] * off[:, 1] < CLUSTER_MAGNITUDE * CLUSTER_MAGNITUDE)
    big = b_ * h * w
    idx = torch.arange(big, device=dev).view(b_, h, w)
    lab = torch.where(weak, idx, big)
    key = torch.where(weak, gid.long(), -1)
    same = {1: key[:, 1:, :] == key[:, :-1, :], 2: key[:, :, 1:] == key[:, :, :-1]}
    for _ in range(int(np.ceil(CLUSTER_AREA + beta))):
        for dim, sm in same.items():
            n = lab.shape[dim] - 1
            m = torch.where(sm, torch.minimum(lab.narrow(dim, 0, n), lab.narrow(dim, 1, n)), big)
            first, second = _to_pixels(m, dim, big)
            lab = torch.minimum(lab, torch.minimum(first, second))
    open_ = torch.zeros((b_, h, w), dtype=torch.int64, device=dev)
    for dim, sm in same.items():
        n = lab.shape[dim] - 1
        diff = (sm & (lab.narrow(dim, 0, n) != lab.narrow(dim, 1, n))).long()
        first, second = _to_pixels(diff, dim, 0)
        open_ = open_ + first + second
    at = torch.where(weak, lab, 0).view(-1)
    wk = weak.long()
    ys, xs = (idx // w) % h, idx % w

    def total(values: torch.Tensor) -> torch.Tensor:  # per region, at its label
        return torch.zeros(big, dtype=torch.int64, device=dev).index_add_(0, at, (values * wk).view(-1)).view(b_, h, w)

    area, bad = total(torch.ones_like(idx)), total(open_)
    root = weak & (lab == idx) & (bad == 0) & (area > CLUSTER_AREA - beta) & (area < CLUSTER_AREA + beta)
    safe = area.clamp(min=1)
    return root, total(ys) // safe, total(xs) // safe


def _per_component(keys: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, n: int, stride: int,
                   k_max: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entries ``(key, y, x)`` with ``key = component * stride + rank`` (``n * stride`` = none) into per-component
    tables in key order: ``(ty (n, k_max), tx (n, k_max), count (n,))`` int64; a component may count more
    than ``k_max`` entries (the table holds the first ``k_max``). Fixed shapes, no host sync."""
    dev = keys.device
    order = torch.argsort(keys)
    k_sorted = keys[order]
    comp = torch.clamp(k_sorted // stride, max=n)
    valid = comp < n
    count = torch.zeros(n + 1, dtype=torch.int64, device=dev).index_add_(0, comp, valid.long())[:n]
    start = torch.cumsum(count, 0) - count
    pos = torch.arange(keys.numel(), device=dev) - torch.cat([start, start.new_zeros(1)])[comp]
    slot = torch.where(valid & (pos < k_max), comp * k_max + pos, n * k_max)
    ty = torch.zeros(n * k_max + 1, dtype=torch.int64, device=dev).scatter_(0, slot, ys[order])
    tx = torch.zeros(n * k_max + 1, dtype=torch.int64, device=dev).scatter_(0, slot, xs[order])
    return ty[:-1].view(n, k_max), tx[:-1].view(n, k_max), count


def _centers(scores: torch.Tensor, offset: torch.Tensor, gid: torch.Tensor, smp: torch.Tensor,
             grouping: GroupingParams) -> tuple[torch.Tensor, ...]:
    """Each component's centres (:func:`bestie.postprocess.group_component`, steps 2-3): NMS peaks in row-major
    order, then the clustered centres (beta) in the order of their regions' first pixels, those within
    100 px of an NMS peak dropped. Returns ``(ty, tx (n, K) int64, count (n,) int64, marked (B, H, W))``:
    ``marked`` = ``scores`` with the clustered centres set to 1.0; ``K`` = :data:`DEVICE_MAX_CENTERS`."""
    b_, h, w = gid.shape
    big, k_max, dev, n = b_ * h * w, DEVICE_MAX_CENTERS, gid.device, smp.shape[0]
    comp = (gid.long() - 1).view(-1)
    flat = torch.arange(big, device=dev)
    ys, xs = (flat // w) % h, flat % w
    nms = _nms_peaks(scores, gid, smp, grouping.center_threshold, int(grouping.nms_kernel)).view(-1)
    stride = 2 * big
    nms_key = torch.where(nms, comp * stride + flat, n * stride)
    ny, nx, ncount = _per_component(nms_key, ys, xs, n, stride, k_max)
    marked = scores.clone()
    if grouping.beta <= 0:
        return ny, nx, ncount, marked
    root, cy, cx = (t.view(-1) for t in _weak_regions(offset, gid, float(grouping.beta)))
    at = (flat // (h * w)) * (h * w) + cy * w + cx
    gflat = gid.view(-1)
    keep = root & (scores.view(-1)[at] * (gflat[at] == gflat) > CLUSTER_MIN_SCORE)
    safe_comp = comp.clamp(min=0)
    for k in range(k_max):  # drop clustered centres within CLUSTER_MIN_DISTANCE of an NMS peak
        d2 = (cy - ny[safe_comp, k]) ** 2 + (cx - nx[safe_comp, k]) ** 2
        keep = keep & ~((k < ncount[safe_comp]) & (d2 <= CLUSTER_MIN_DISTANCE ** 2))
    ext = torch.cat([marked.view(-1), marked.new_zeros(1)])  # slot ``big``: where the others are written
    marked = ext.scatter_(0, torch.where(keep, at, big), 1.0)[:big].view(b_, h, w)
    key = torch.cat([nms_key, torch.where(keep, comp * stride + big + flat, n * stride)])
    ty, tx, count = _per_component(key, torch.cat([ys, cy]), torch.cat([xs, cx]), n, stride, k_max)
    return ty, tx, count, marked


def _group(offset: torch.Tensor, gid: torch.Tensor, ty: torch.Tensor, tx: torch.Tensor,
           count: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` int64: each component pixel's centre index in its component's table, the centre nearest to
    ``pixel + offset`` (first on ties, :func:`bestie.postprocess.nearest_center`); -1 off components, in a
    component without a centre or with more than :data:`DEVICE_MAX_CENTERS`."""
    b_, h, w = gid.shape
    dev = gid.device
    comp = (gid.long() - 1).clamp(min=0)
    ly = torch.arange(h, device=dev, dtype=torch.float32).view(1, h, 1) + offset[:, 0].float()
    lx = torch.arange(w, device=dev, dtype=torch.float32).view(1, 1, w) + offset[:, 1].float()
    best = torch.full((b_, h, w), float("inf"), device=dev)
    arg = torch.full((b_, h, w), -1, dtype=torch.int64, device=dev)
    n_here = torch.where((gid > 0) & (count[comp] <= ty.shape[1]), count[comp], 0)
    cyf, cxf = ty.float(), tx.float()
    for k in range(ty.shape[1]):
        dy = ly - cyf[comp, k]
        dx = lx - cxf[comp, k]
        d = dy * dy + dx * dx
        better = (k < n_here) & (d < best)
        best = torch.where(better, d, best)
        arg = torch.where(better, k, arg)
    return arg


def _group_targets(gid: torch.Tensor, arg: torch.Tensor, marked: torch.Tensor, prob: torch.Tensor,
                   ty: torch.Tensor, tx: torch.Tensor, threshold: float, max_instances: int) -> dict:
    """Targets of each group (steps 2-5 of the module docstring): per group ``(ty, tx)``, ``conf`` and whether
    it is drawn; per pixel its group's flat index (``n K`` = none). Returns ``{"slot" (B, H, W), "y", "x",
    "conf" (n K + 1,), "draw" (n K,) bool}``."""
    n, k_max = ty.shape
    b_, h, w = gid.shape
    dev = gid.device
    none = n * k_max
    on = (gid > 0) & (arg >= 0)
    slot = torch.where(on, (gid.long() - 1).clamp(min=0) * k_max + arg, none).view(-1)
    cnt = torch.zeros(none + 1, dtype=torch.int64, device=dev).index_add_(0, slot, on.view(-1).long())
    nonempty = cnt[:none].view(n, k_max) > 0
    skip = nonempty.sum(dim=1) > max_instances
    val = marked.view(-1)
    top = torch.full((none + 1,), float("-inf"), device=dev).scatter_reduce(0, slot, val, "amax")
    flat = torch.arange(b_ * h * w, device=dev)
    first = torch.where(on.view(-1) & (val == top[slot]), flat, b_ * h * w)
    pk = torch.full((none + 1,), b_ * h * w, dtype=torch.int64, device=dev).scatter_reduce(0, slot, first, "amin")
    psum = torch.zeros(none + 1, dtype=torch.float64, device=dev).index_add_(0, slot, prob.view(-1).double())
    mean_prob = psum / cnt.clamp(min=1)
    cscore = top.double()
    confident = (cnt > 0) & (cscore >= threshold)
    pkc = pk.clamp(max=b_ * h * w - 1)
    gy = torch.cat([ty.view(-1), ty.new_zeros(1)])
    gx = torch.cat([tx.view(-1), tx.new_zeros(1)])
    y = torch.where(confident, (pkc // w) % h, gy)
    x = torch.where(confident, pkc % w, gx)
    conf = torch.where(confident, cscore * mean_prob, mean_prob).clamp(0.0, 1.0).float()
    keep = torch.cat([(~skip).repeat_interleave(k_max), torch.zeros(1, dtype=torch.bool, device=dev)])
    slot = torch.where(keep[slot], slot, none)
    return {"slot": slot.view(b_, h, w), "y": y, "x": x, "conf": conf, "draw": (nonempty & ~skip[:, None]).view(-1)}


def _refine_device_image(seg_logits: torch.Tensor, center: torch.Tensor, offset: torch.Tensor, comps: tuple,
                         pseudo: PseudoLabelParams, refine: RefineParams) -> dict:
    """Image-setting refinement of the whole batch on its device (module docstring, steps 1-5), from the
    components ``(map (B, H, W), table (N, 5), first_row (B,))``: fixed-shape tensor operations only."""
    comp_map, table, first_row = comps
    b_, c1, h, w = seg_logits.shape
    dev = seg_logits.device
    if table.shape[0] == 0:  # no component in the batch (a shape: known on the host)
        return {"center": torch.zeros((b_, c1 - 1, h, w), device=dev), "offset": torch.zeros((b_, 2, h, w), device=dev),
                "weight": torch.zeros((b_, h, w), device=dev), "has_center": True}
    local = comp_map.to(dev).long()
    gid = torch.where(local > 0, local + first_row.to(dev).view(b_, 1, 1), 0)
    tab = table.to(dev).long()
    smp, cls = tab[:, 0], tab[:, 1]
    grouping = refine.grouping(int(pseudo.min_area))
    scores, prob = _scores_and_prob(seg_logits, center, gid, cls)
    ty, tx, count, marked = _centers(scores, offset, gid, smp, grouping)
    arg = _group(offset, gid, ty, tx, count)
    g = _group_targets(gid, arg, marked, prob, ty, tx, grouping.center_threshold, int(refine.max_instances))
    slot = g["slot"]
    on = slot < ty.numel()
    yy = torch.arange(h, device=dev).view(1, h, 1)
    xx = torch.arange(w, device=dev).view(1, 1, w)
    out_offset = torch.stack([torch.where(on, g["y"][slot] - yy, 0), torch.where(on, g["x"][slot] - xx, 0)], dim=1)
    out_weight = torch.where(on, g["conf"][slot], 0.0)
    out_center = torch.zeros((b_, c1 - 1, h, w), dtype=torch.float32, device=dev)
    k_max = ty.shape[1]
    where = torch.stack([smp.repeat_interleave(k_max), cls.repeat_interleave(k_max), g["y"][:-1], g["x"][:-1]], 1)
    paste_gaussians(out_center, where, g["draw"], pseudo.sigma)
    return {"center": out_center, "offset": out_offset.float(), "weight": out_weight, "has_center": True}


def _refine_device_point(offset: torch.Tensor, wsss: torch.Tensor, present: list[np.ndarray], points: Any,
                         ncls: int, point_threshold: float) -> dict:
    """Point-setting refinement of the whole batch on its device (module docstring; :func:`_refine_points`
    per sample on the host): every pixel of a present class with kept points goes to the kept point of its
    class nearest to ``pixel + offset`` (first in the sample's point order on ties), weight 1. The points
    and present classes travel to the device once (small, no sync); a loop over the point slots."""
    b_, _, h, w = offset.shape
    dev = offset.device
    rows = [torch.as_tensor(np.asarray(p.detach().cpu() if hasattr(p, "detach") else p, dtype=np.float32))
            .reshape(-1, 4) for p in points]
    for b, r in enumerate(rows):  # the host path's checks (finite, classes in range)
        point_pixels(r.numpy(), h, w, ncls, f"points[{b}]")
    slots = max([r.shape[0] for r in rows] + [1])
    pts = torch.zeros((b_, slots, 4), dtype=torch.float32)
    pts[..., 3] = -1.0  # empty slots are never kept
    for b, r in enumerate(rows):
        pts[b, : r.shape[0]] = r
    pres = torch.zeros((b_, ncls + 1), dtype=torch.bool)
    for b, cls in enumerate(present):
        pres[b, torch.as_tensor(cls, dtype=torch.int64)] = True
    pts, pres = pts.to(dev, non_blocking=True), pres.to(dev, non_blocking=True)
    px, py = torch.floor(pts[..., 0] + 0.5).long(), torch.floor(pts[..., 1] + 0.5).long()
    pc = pts[..., 2].long().clamp(0, ncls - 1)
    bidx = torch.arange(b_, device=dev).view(b_, 1)
    keep = ((px >= 0) & (py >= 0) & (px < w) & (py < h) & (pts[..., 3] >= point_threshold)
            & pres.gather(1, pc))
    seg = wsss.to(dev).long()
    cls_pix = (seg - 1).clamp(0, ncls - 1)
    has = torch.zeros((b_, ncls + 1), dtype=torch.int64, device=dev).index_put_(
        (bidx.expand_as(pc), torch.where(keep, pc, ncls)), torch.ones_like(pc), accumulate=True)[:, :ncls] > 0
    active = (seg >= 1) & (seg <= ncls) & has.gather(1, cls_pix.view(b_, -1)).view(b_, h, w)
    ly = torch.arange(h, device=dev, dtype=torch.float32).view(1, h, 1) + offset[:, 0].float()
    lx = torch.arange(w, device=dev, dtype=torch.float32).view(1, 1, w) + offset[:, 1].float()
    best = torch.full((b_, h, w), float("inf"), device=dev)
    ty = torch.zeros((b_, h, w), dtype=torch.int64, device=dev)
    tx = torch.zeros_like(ty)
    for j in range(slots):
        same = keep[:, j].view(b_, 1, 1) & (cls_pix == pc[:, j].view(b_, 1, 1))
        dy = ly - py[:, j].float().view(b_, 1, 1)
        dx = lx - px[:, j].float().view(b_, 1, 1)
        d = dy * dy + dx * dx
        better = same & (d < best)
        best = torch.where(better, d, best)
        ty = torch.where(better, py[:, j].view(b_, 1, 1), ty)
        tx = torch.where(better, px[:, j].view(b_, 1, 1), tx)
    yy = torch.arange(h, device=dev).view(1, h, 1)
    xx = torch.arange(w, device=dev).view(1, 1, w)
    out_offset = torch.stack([torch.where(active, ty - yy, 0), torch.where(active, tx - xx, 0)], dim=1).float()
    return {"center": torch.zeros((b_, ncls, h, w), device=dev), "offset": out_offset,
            "weight": active.float(), "has_center": False}
