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
        pixel = _PixelCrossEntropy.apply(logits, labels, self.ignore_label).reshape(-1)
        if self.top_k_percent >= 1.0:
            return pixel.mean()
        k = max(1, int(self.top_k_percent * pixel.numel()))
        return torch.topk(pixel, k, sorted=False).values.mean()


class _PixelCrossEntropy(torch.autograd.Function):
    """Per-pixel cross entropy ``logsumexp(x) - x[label]`` (0 on ``ignore`` pixels), ``(B, K, H, W)`` logits
    and ``(B, H, W)`` labels -> ``(B, H, W)`` float32, as ``F.cross_entropy(..., reduction="none")`` but with one
    ``(B, K, H, W)`` allocation instead of three: the forward's ``exp(x - max)`` is kept and becomes the
    gradient ``softmax x g - onehot x g`` in place. One backward only; float32 (AMP-safe: the logits are cast)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore: int) -> torch.Tensor:
        x = logits.float()
        valid = labels != ignore
        lab = torch.where(valid, labels.long(), 0).unsqueeze(1)
        top = x.amax(dim=1, keepdim=True)
        e = torch.sub(x, top).exp_()
        total = e.sum(dim=1, keepdim=True)
        pixel = (total.log() + top - x.gather(1, lab)).squeeze(1) * valid
        ctx.save_for_backward(e, total, lab, valid)
        return pixel

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if getattr(ctx, "consumed", False):
            raise RuntimeError("BESTIE loss: the cross entropy can be back-propagated only once")
        ctx.consumed = True
        e, total, lab, valid = ctx.saved_tensors
        g = (grad * valid).unsqueeze(1)
        e.mul_(g / total).scatter_add_(1, lab, -g)
        return e, None, None


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
    ``d = pred - target``, ``r = w d`` (kept), ``sum(d r)`` in place; backward ``2 g r`` in place. Autograd's
    ``(pred - target) ** 2 * w`` makes about twice as many passes and allocations over the ``(B, K, H, W)``
    maps (on the CPU each fresh allocation of such a map costs as much as a pass: its pages are faulted in).
    Float32 throughout (AMP-safe: the inputs are cast). Gradients flow to ``pred`` only; the graph can be
    back-propagated once (the kept tensor becomes the gradient)."""

    @staticmethod
    def forward(ctx, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        diff = pred.float() - target.float()
        r = diff * weight.float()
        ctx.save_for_backward(r)
        return diff.mul_(r).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _consume(ctx).mul_(2.0 * grad), None, None


class _WeightedSquarePair(torch.autograd.Function):
    """``(L1 + L2, L1, L2)`` with ``Li = sum(ai * (pred - ti)^2)``, ``ai`` ``(B, 1, H, W)``: two weighted squared
    errors of one prediction in two allocations (a difference buffer and ``q = a1 d1 + a2 d2``, the gradient
    ``2 g q`` up to the upstream factor, made in place in backward). Only ``L1 + L2`` is differentiable;
    ``L1``, ``L2`` are the values of the two terms. Float32, gradients to ``pred`` only, one backward."""

    @staticmethod
    def forward(ctx, pred: torch.Tensor, t1: torch.Tensor, a1: torch.Tensor, t2: torch.Tensor,
                a2: torch.Tensor):
        p = pred.float()
        d = p - t1.float()
        q = d * a1
        l1 = d.mul_(q).sum()
        torch.sub(p, t2.float(), out=d)
        q.addcmul_(d, a2)
        l2 = d.square_().mul_(a2).sum()
        ctx.save_for_backward(q)
        ctx.mark_non_differentiable(l1, l2)
        return l1 + l2, l1, l2

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _g1: torch.Tensor, _g2: torch.Tensor):
        return _consume(ctx).mul_(2.0 * grad), None, None, None, None


def _consume(ctx) -> torch.Tensor:
    """The saved tensor of a one-backward function, handed over (RuntimeError on a second backward)."""
    if getattr(ctx, "consumed", False):
        raise RuntimeError("BESTIE loss: the weighted squared error can be back-propagated only once")
    ctx.consumed = True
    (kept,) = ctx.saved_tensors
    return kept


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
        ``"total"`` = ``seg + center + offset``. Each term is computed once; with a refined center target
        the two center terms come from one fused pass (:meth:`center_pair`) and ``center_pseudo`` /
        ``center_refined`` are then values without a graph (back-propagate ``total`` or ``center``), and the
        graph can be back-propagated once.
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
        pred, target, w = self._center_inputs(pred, target, weight)
        return weighted_mse(pred, target, w) * self.center_weight

    def center_pair(self, pred: torch.Tensor, t1: torch.Tensor, w1: torch.Tensor, t2: torch.Tensor,
                    w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pseudo and refined center terms in one pass: ``(0.5 (c1 + c2), c1, c2)`` with ``ci`` =
        :meth:`center_term` ``(pred, ti, wi)``; only the first is differentiable (``c1``, ``c2`` are their
        values, for the log). Shapes as :meth:`center_term`; DataError on mismatched shapes."""
        pred1, t1, w1 = self._center_inputs(pred, t1, w1)
        pred2, t2, w2 = self._center_inputs(pred, t2, w2)
        if pred1.shape != t1.shape or pred2.shape != t2.shape:
            raise DataError(f"BestieLoss: center {tuple(pred1.shape)} and targets {tuple(t1.shape)}, "
                            f"{tuple(t2.shape)} differ")
        w1 = _pixel_weight(w1, pred1, "center_pair")
        w2 = _pixel_weight(w2, pred2, "center_pair")
        half = 0.5 * self.center_weight
        a1 = w1 * (half / _weighted_count(w1))
        a2 = w2 * (half / _weighted_count(w2))
        center, l1, l2 = _WeightedSquarePair.apply(pred1, t1, a1, t2, a2)
        return center, 2.0 * l1, 2.0 * l2

    def _center_inputs(self, pred: torch.Tensor, target: torch.Tensor,
                       weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prediction, target and per-pixel weight of a center term: the first channel against the class
        maximum when class-agnostic, the support boost applied (module docstring of :meth:`center_term`)."""
        if self.center_agnostic:
            if pred.shape != target.shape:
                raise DataError(f"BestieLoss: center {tuple(pred.shape)} and target {tuple(target.shape)} differ")
            pred, target = pred[:, :1], target.amax(dim=1, keepdim=True)
        if self.center_support_weight == 1.0:
            return pred, target, weight
        # the boost keeps the set of weighted pixels (factor >= 1), so weighted_mse's count is unchanged
        w = weight.unsqueeze(1) if weight.ndim == target.ndim - 1 else weight
        support = (target > CENTER_SUPPORT_MIN).any(dim=1, keepdim=True)
        return pred, target, torch.where(support, w * self.center_support_weight, w)

    def forward(self, outputs: dict, pseudo: dict, refined: dict | None, semantic_target: torch.Tensor) -> dict:
        for key in ("seg", "center", "offset"):
            if key not in outputs:
                raise DataError(f"BestieLoss: outputs lack {key!r} (have {sorted(outputs)})")
        for key in ("center", "offset", "weight"):
            if key not in pseudo:
                raise DataError(f"BestieLoss: pseudo targets lack {key!r} (have {sorted(pseudo)})")
        seg = self.seg_loss(outputs["seg"], semantic_target) * self.seg_weight
        o1 = weighted_l1(outputs["offset"], pseudo["offset"], pseudo["weight"]) * self.offset_weight
        o2 = o1
        if refined is not None and refined.get("has_center", True):
            center, c1, c2 = self.center_pair(outputs["center"], pseudo["center"], pseudo["weight"],
                                              refined["center"], refined["weight"])
        else:
            c1 = c2 = center = self.center_term(outputs["center"], pseudo["center"], pseudo["weight"])
        if refined is not None:
            o2 = weighted_l1(outputs["offset"], refined["offset"], refined["weight"]) * self.offset_weight
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
