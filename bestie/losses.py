"""Losses of BESTIE training (METHOD.md section 4, "Loss"), after the public ``utils/loss.py``.

``total = seg_weight * DeepLabCE(seg)
        + 0.5 * (MSE_w(center, pseudo) + MSE_w(center, refined)) * center_weight
        + 0.5 * (L1_w(offset, pseudo) + L1_w(offset, refined)) * offset_weight``

with ``seg_weight = 1``, ``center_weight = 200``, ``offset_weight = 0.01``. Without refined targets
(before ``refine_iter`` or with refinement off) the refined terms equal the pseudo terms, so the pseudo
term takes the full weight; in the point setting (refined targets without a center map,
``has_center = False``) only the center term does.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bestie.errors import ConfigError, DataError

__all__ = ["DeepLabCE", "weighted_mse", "weighted_l1", "BestieLoss", "CENTER_SUPPORT_MIN"]

#: a pixel whose center target exceeds this lies on a Gaussian's support (``center_support_weight``)
CENTER_SUPPORT_MIN = 0.01

#: label of pixels the semantic loss ignores (the WSSS maps' uncertain pixels; ARCHITECTURE conventions)
IGNORE_LABEL = 255
#: share of the hardest pixels the semantic CE keeps (Panoptic-DeepLab's hard-pixel mining, METHOD.md)
TOP_K_PERCENT = 0.2


class DeepLabCE(nn.Module):
    """Cross entropy with hard-pixel mining (TensorFlow DeepLab / Panoptic-DeepLab ``DeepLabCE``).

    Per-pixel cross entropy (pixels labelled ``ignore_label`` contribute a loss of 0 but still count as
    pixels, as in the reference), flattened over the batch; when ``top_k_percent < 1`` only the
    ``int(top_k_percent * B * H * W)`` largest pixel losses are averaged (at least one pixel).

    Args:
        ignore_label: label value without loss (255).
        top_k_percent: fraction in ``(0, 1]`` of pixels kept (0.2).

    Forward:
        ``logits`` ``(B, C+1, H, W)`` float, ``labels`` ``(B, H, W)`` integer -> scalar tensor.

    Raises:
        ConfigError: ``top_k_percent`` outside ``(0, 1]``. DataError: mismatched shapes.
    """

    def __init__(self, ignore_label: int = IGNORE_LABEL, top_k_percent: float = TOP_K_PERCENT):
        super().__init__()
        if not 0.0 < float(top_k_percent) <= 1.0:
            raise ConfigError(f"DeepLabCE: top_k_percent must lie in (0, 1], got {top_k_percent!r}")
        self.ignore_label = int(ignore_label)
        self.top_k_percent = float(top_k_percent)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 4 or labels.shape != (logits.shape[0],) + tuple(logits.shape[2:]):
            raise DataError(
                f"DeepLabCE: logits (B, C+1, H, W) and labels (B, H, W) expected, got {tuple(logits.shape)} "
                f"and {tuple(labels.shape)}"
            )
        pixel = F.cross_entropy(logits, labels.long(), ignore_index=self.ignore_label, reduction="none").reshape(-1)
        if self.top_k_percent >= 1.0:
            return pixel.mean()
        k = max(1, int(self.top_k_percent * pixel.numel()))
        return torch.topk(pixel, k, sorted=False).values.mean()


def _pixel_weight(weight: torch.Tensor, pred: torch.Tensor, name: str) -> torch.Tensor:
    """``weight`` as ``(B, 1, H, W)`` in ``pred``'s dtype; DataError when it does not fit ``pred`` ``(B, K, H, W)``."""
    if weight.ndim == pred.ndim - 1:
        weight = weight.unsqueeze(1)
    if weight.ndim != pred.ndim or weight.shape[1] != 1 or weight.shape[0] != pred.shape[0] or \
            weight.shape[2:] != pred.shape[2:]:
        raise DataError(f"{name}: weight {tuple(weight.shape)} does not match prediction {tuple(pred.shape)} "
                        f"(expected (B, H, W) or (B, 1, H, W))")
    return weight.to(pred.dtype)


def _weighted(err: torch.Tensor, weight: torch.Tensor, name: str) -> torch.Tensor:
    weight = _pixel_weight(weight, err, name)
    total = (err * weight).sum()
    return total / _weighted_count(weight)


def _weighted_count(weight: torch.Tensor) -> torch.Tensor:
    # With no positive weight the sum is 0 (weights are >= 0), so clamping the count to 1 returns 0 with a
    # live graph (zero gradients), like the reference's ``sum * 0``, without a device-to-host sync.
    return (weight > 0).sum().clamp(min=1)


class _WeightedSquareSum(torch.autograd.Function):
    """``sum(w * (pred - target)^2)`` with ``w`` ``(B, 1, H, W)`` broadcast over the channels: forward
    ``d = pred - target``, ``r = w d`` (kept), ``sum(d r)`` in place; backward ``2 g r`` in one pass. Autograd's
    ``(pred - target) ** 2 * w`` makes about twice as many passes over the ``(B, K, H, W)`` maps. Float32
    throughout (AMP-safe: the inputs are cast). Gradients flow to ``pred`` only."""

    @staticmethod
    def forward(ctx, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        diff = pred.float() - target.float()
        r = diff * weight.float()
        ctx.save_for_backward(r)
        return diff.mul_(r).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (r,) = ctx.saved_tensors
        return r * (2.0 * grad), None, None


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted squared error: ``sum(w * (pred - target)^2) / #(pixels with w > 0)``, 0 when none.

    Args:
        pred, target: ``(B, K, H, W)`` float (center heatmaps, K = C).
        weight: ``(B, H, W)`` or ``(B, 1, H, W)`` per-pixel weight, broadcast over the K channels; the count
            is of pixels, not pixel-channels (public ``Weighted_MSELoss``).

    Returns:
        Scalar tensor; differentiable w.r.t. ``pred`` (zero gradient when no weight is positive).

    Raises:
        DataError: shapes that do not match.
    """
    if pred.shape != target.shape:
        raise DataError(f"weighted_mse: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    w = _pixel_weight(weight, pred, "weighted_mse")
    return _WeightedSquareSum.apply(pred, target, w) / _weighted_count(w)


def weighted_l1(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted absolute error: ``sum(w * |pred - target|) / #(pixels with w > 0)``, 0 when none.

    Args:
        pred, target: ``(B, K, H, W)`` float (offsets, K = 2).
        weight: ``(B, H, W)`` or ``(B, 1, H, W)``, broadcast over channels, count of pixels
            (public ``Weighted_L1_Loss``).

    Returns:
        Scalar tensor; differentiable w.r.t. ``pred``.

    Raises:
        DataError: shapes that do not match.
    """
    if pred.shape != target.shape:
        raise DataError(f"weighted_l1: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    return _weighted((pred - target).abs(), weight, "weighted_l1")


class BestieLoss(nn.Module):
    """The BESTIE training loss (module docstring).

    Args:
        seg_weight, center_weight, offset_weight: term weights (1, 200, 0.01).
        ignore_label, top_k_percent: of the :class:`DeepLabCE` semantic loss (255, 0.2).

    Forward:
        outputs: ``{"seg": (B, C+1, H, W), "center": (B, C, H, W), "offset": (B, 2, H, W)}`` network outputs.
        pseudo: ``{"center", "offset", "weight"}`` pseudo targets (:mod:`bestie.targets`, batched; weight
            ``(B, H, W)`` or ``(B, 1, H, W)``).
        refined: ``None`` or the dict of :func:`bestie.refine.refine_targets` (``"has_center": False``
            means no refined center target).
        semantic_target: ``(B, H, W)`` integer WSSS labels (255 ignored).

    Returns:
        dict of scalar tensors: ``"seg"``, ``"center_pseudo"``, ``"center_refined"``, ``"offset_pseudo"``,
        ``"offset_refined"`` (each already multiplied by its weight; a refined term equals the pseudo term
        when there is no refined target), ``"center"``, ``"offset"`` (the 0.5-averaged pairs) and
        ``"total"`` = ``seg + center + offset``.
    """

    def __init__(
        self,
        seg_weight: float = 1.0,
        center_weight: float = 200.0,
        offset_weight: float = 0.01,
        ignore_label: int = IGNORE_LABEL,
        top_k_percent: float = TOP_K_PERCENT,
        center_agnostic: bool = False,
        center_support_weight: float = 1.0,
    ):
        super().__init__()
        if not float(center_support_weight) >= 1.0:
            raise ConfigError(f"BestieLoss: center_support_weight must be >= 1, got {center_support_weight!r}")
        self.center_agnostic = bool(center_agnostic)
        self.center_support_weight = float(center_support_weight)
        for name, v in (("seg_weight", seg_weight), ("center_weight", center_weight), ("offset_weight", offset_weight)):
            if not float(v) >= 0.0:
                raise ConfigError(f"BestieLoss: {name} must be >= 0, got {v!r}")
        self.seg_weight = float(seg_weight)
        self.center_weight = float(center_weight)
        self.offset_weight = float(offset_weight)
        self.seg_loss = DeepLabCE(ignore_label=ignore_label, top_k_percent=top_k_percent)

    def center_term(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``center_weight x`` the weighted MSE of one center target, as the loss computes it (class-wise or
        agnostic, with the support weight): ``pred`` / ``target`` ``(B, C, H, W)``, ``weight`` ``(B, H, W)``
        or ``(B, 1, H, W)`` -> scalar tensor. Raises DataError on mismatched shapes."""
        if self.center_agnostic:
            if pred.shape != target.shape:
                raise DataError(f"BestieLoss: center {tuple(pred.shape)} and target {tuple(target.shape)} differ")
            pred, target = pred[:, :1], target.amax(dim=1, keepdim=True)
        if self.center_support_weight == 1.0:
            return weighted_mse(pred, target, weight) * self.center_weight
        # the boost keeps the set of weighted pixels (factor >= 1), so weighted_mse's count is unchanged
        w = weight.unsqueeze(1) if weight.ndim == target.ndim - 1 else weight
        support = (target > CENTER_SUPPORT_MIN).any(dim=1, keepdim=True)
        boosted = torch.where(support, w * self.center_support_weight, w)
        return weighted_mse(pred, target, boosted) * self.center_weight

    def forward(self, outputs: dict, pseudo: dict, refined: dict | None, semantic_target: torch.Tensor) -> dict:
        for key in ("seg", "center", "offset"):
            if key not in outputs:
                raise DataError(f"BestieLoss: outputs lack {key!r} (have {sorted(outputs)})")
        for key in ("center", "offset", "weight"):
            if key not in pseudo:
                raise DataError(f"BestieLoss: pseudo targets lack {key!r} (have {sorted(pseudo)})")
        seg = self.seg_loss(outputs["seg"], semantic_target) * self.seg_weight
        c1 = self.center_term(outputs["center"], pseudo["center"], pseudo["weight"])
        o1 = weighted_l1(outputs["offset"], pseudo["offset"], pseudo["weight"]) * self.offset_weight
        c2, o2 = c1, o1
        if refined is not None:
            if refined.get("has_center", True):
                c2 = self.center_term(outputs["center"], refined["center"], refined["weight"])
            o2 = weighted_l1(outputs["offset"], refined["offset"], refined["weight"]) * self.offset_weight
        center = 0.5 * (c1 + c2)
        offset = 0.5 * (o1 + o2)
        return {
            "seg": seg,
            "center_pseudo": c1,
            "center_refined": c2,
            "offset_pseudo": o1,
            "offset_refined": o2,
            "center": center,
            "offset": offset,
            "total": seg + center + offset,
        }
