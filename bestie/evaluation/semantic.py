"""Semantic segmentation scores from a streaming confusion matrix (mIoU over background + C classes).

Used to score WSSS maps (METHOD.md, WSSS stage) against VOC ``SegmentationClass`` labels: 0 background,
``c + 1`` for class ``c``, 255 ignored (docs/ARCHITECTURE.md conventions). IoU of class ``k`` is
``TP_k / (TP_k + FP_k + FN_k)`` over all pixels seen, accumulated before dividing (the usual "dataset
IoU", as chainercv's ``eval_semantic_segmentation``), not averaged per image.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bestie.errors import DataError

__all__ = ["SemanticEvaluator"]

IGNORE_INDEX = 255


class SemanticEvaluator:
    """Confusion-matrix accumulator for semantic maps.

    Args:
        num_classes: number of labels *including* background, ``C + 1``; valid labels ``0..C``.
        ignore_index: GT value that is skipped (default 255).

    Attributes:
        confusion: ``(C+1, C+1)`` int64, ``confusion[g, p]`` = number of pixels with GT ``g``
            predicted as ``p``.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if int(num_classes) < 2:
            raise ValueError(f"num_classes counts background and must be >= 2, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with a class index < {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.reset()

    def reset(self) -> None:
        """Zero the confusion matrix."""
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image.

        Args:
            pred: ``(H, W)`` integer map of predicted labels in ``[0, C]`` (no ignore value allowed).
            gt: ``(H, W)`` integer (usually uint8) GT labels in ``[0, C]`` or ``ignore_index``.

        Raises:
            DataError (a ValueError): shapes differ, non-integer maps, a prediction outside ``[0, C]``, or
                a GT value that is neither a class nor ``ignore_index``.
        """
        pred = np.asarray(pred)
        gt = np.asarray(gt)
        if pred.shape != gt.shape or pred.ndim != 2:
            raise DataError(f"pred {pred.shape} and gt {gt.shape} must be (H, W) maps of the same size")
        for name, arr in (("pred", pred), ("gt", gt)):
            if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
                raise DataError(f"{name} map must hold integer labels, got dtype {arr.dtype}")
        n = self.num_classes
        if pred.size == 0:
            return
        pmin, pmax = int(pred.min()), int(pred.max())
        if pmin < 0 or pmax >= n:
            raise DataError(f"pred labels must be in [0, {n - 1}], got range [{pmin}, {pmax}]")
        valid = gt != self.ignore_index
        g = gt[valid].astype(np.int64)
        if g.size and (g.min() < 0 or g.max() >= n):
            bad = np.unique(g[(g < 0) | (g >= n)])
            raise DataError(
                f"gt labels must be in [0, {n - 1}] or {self.ignore_index}, got {bad[:10].tolist()}"
            )
        p = pred[valid].astype(np.int64)
        self.confusion += np.bincount(g * n + p, minlength=n * n).reshape(n, n)

    def evaluate(self) -> dict[str, Any]:
        """Scores over all images seen.

        Returns:
            ``{"mIoU": float, "IoU": [float | None per label 0..C], "precision_fg": float | None,
            "recall_fg": float | None, "pixel_accuracy": float | None}``, all in percent (0-100).
            ``IoU[k]`` is None when label ``k`` is in neither GT nor prediction (zero union); such labels
            are left out of the mean (mIoU is None if every union is zero). Foreground = any label != 0,
            class-agnostic: ``precision_fg`` = pixels predicted fg that are fg in GT / pixels predicted
            fg, ``recall_fg`` = the same intersection / GT fg pixels (None on a zero denominator).
        """
        cm = self.confusion.astype(np.float64)
        tp = np.diag(cm)
        union = cm.sum(axis=0) + cm.sum(axis=1) - tp
        iou: list[float | None] = [
            (100.0 * float(t) / float(u)) if u > 0 else None for t, u in zip(tp, union)
        ]
        valid = [v for v in iou if v is not None]
        fg_both = cm[1:, 1:].sum()
        pred_fg = cm[:, 1:].sum()
        gt_fg = cm[1:, :].sum()
        total = cm.sum()

        def pct(num: float, den: float) -> float | None:
            return 100.0 * float(num) / float(den) if den > 0 else None

        return {
            "mIoU": float(np.mean(valid)) if valid else None,
            "IoU": iou,
            "precision_fg": pct(fg_both, pred_fg),
            "recall_fg": pct(fg_both, gt_fg),
            "pixel_accuracy": pct(tp.sum(), total),
        }
