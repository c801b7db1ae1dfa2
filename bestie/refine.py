"""Online self-refinement: refined center/offset/weight targets from the network's own outputs.

METHOD.md section 4 ("Self-refinement"), after the public ``refine_label_generation`` and
``refine_label_generation_with_point``, rewritten vectorised (numpy + OpenCV on the CPU per sample; the
softmax is evaluated on the input device, only on pixels of present classes).

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

from bestie.errors import DataError
from bestie.params import GroupingParams, PseudoLabelParams, RefineParams
from bestie.postprocess import class_components, group_component, instance_peaks, nearest_center
from bestie.targets import (
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
            centers, _, ys, xs, inst = group_component(scores, comp, offset[(slice(None),) + win], grouping)
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
    wsss_cpu = wsss.detach().cpu()
    seg = [check_label_map(wsss_cpu[b], f"wsss[{b}]") for b in range(b_)]
    present = [check_class_list(labels[b], ncls, f"labels[{b}]") for b in range(b_)]
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
