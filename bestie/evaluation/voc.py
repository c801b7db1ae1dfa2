"""PASCAL VOC instance-segmentation average precision (mAP25/50/70/75).

Implements METHOD.md "Evaluation protocol" (VOC), the protocol of chainercv's
``eval_instance_segmentation_voc`` with ``use_07_metric=False`` (the FCIS evaluation, used by IRN,
BESTIE and most weakly-supervised instance segmentation papers), re-implemented as a streaming
evaluator:

Per image and class, detections are taken in descending score order; each one takes the GT instance of
its class with the highest mask IoU (the first of them on an IoU tie); it is a true positive if that
IoU >= threshold and that GT has not been taken yet by a higher-scored detection, otherwise a false
positive (a duplicate does not fall back to the second-best GT). Across images, all detections of a
class are sorted by descending score, TP/FP are accumulated, precision = TP / (TP + FP) and
recall = TP / #GT; AP is the area under the precision envelope (precision made monotonically
non-increasing, recall padded with 0 and 1, precision padded with 0): the VOC2010+ rule, not the
11-point VOC07 rule. A class with GT but no detection has AP 0; a class without GT has no AP (None) and
is left out of the mean.

Order of equal scores: chainercv sorts with ``score.argsort()[::-1]`` (ascending sort, reversed),
both inside an image and across images. For equal scores this puts the detection seen *later* first
(later in the image's input order; across images, the later image first). numpy's default quicksort
is only guaranteed to be stable for short arrays, so chainercv's tie order is not fully determined;
this module uses ``np.argsort(score, kind="stable")[::-1]`` everywhere, which is deterministic and
equals chainercv's order whenever numpy's sort keeps ties in input order.

AP values are fractions in [0, 1] (as chainercv returns them), not percent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from bestie.errors import DataError

__all__ = ["mask_iou", "VOCInstanceEvaluator", "eval_instance_segmentation_voc", "voc_ap"]


def _pack(flat: np.ndarray) -> np.ndarray:
    """``(N, P)`` bool -> ``(N, ceil(P / 64))`` uint64 bit-packed rows (padding bits are 0)."""
    n, p = flat.shape
    words = (p + 63) // 64
    out = np.zeros((n, words * 8), dtype=np.uint8)
    out[:, : (p + 7) // 8] = np.packbits(flat, axis=1)
    return out.view(np.uint64)


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of two stacks of binary masks.

    Masks are bit-packed (64 pixels per word) and intersections counted with ``np.bitwise_count`` of the
    AND of the packed rows: exact integer counts, about 10x faster than a float32 matrix product of the
    flattened masks and 5x faster than pycocotools RLE IoU (measured on 500x375 masks). With numpy < 2.0
    (no ``bitwise_count``) the matrix product is used instead. Unions are ``|a| + |b| - intersection``.

    Args:
        a: ``(N, H, W)`` bool (other dtypes are binarised with ``!= 0``).
        b: ``(M, H, W)`` bool, same ``H, W``.

    Returns:
        ``(N, M)`` float64 IoU in [0, 1]; a pair of two empty masks has IoU 0.

    Raises:
        DataError: not 3-D stacks, or different ``H, W``.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.ndim != 3 or b.ndim != 3:
        raise DataError(f"mask_iou expects (N, H, W) and (M, H, W) stacks, got {a.shape} and {b.shape}")
    if a.shape[1:] != b.shape[1:]:
        raise DataError(f"mask_iou: mask sizes differ, {a.shape[1:]} vs {b.shape[1:]}")
    n, m = a.shape[0], b.shape[0]
    if n == 0 or m == 0:
        return np.zeros((n, m), dtype=np.float64)
    fa = a.reshape(n, -1)
    fb = b.reshape(m, -1)
    if fa.dtype != bool:
        fa = fa != 0
    if fb.dtype != bool:
        fb = fb != 0
    if hasattr(np, "bitwise_count"):
        pa, pb = _pack(fa), _pack(fb)
        area_a = np.bitwise_count(pa).sum(axis=1, dtype=np.int64)
        area_b = np.bitwise_count(pb).sum(axis=1, dtype=np.int64)
        inter = np.empty((n, m), dtype=np.int64)
        if n <= m:
            for i in range(n):  # one (M, words) AND per row keeps temporaries at M x words
                inter[i] = np.bitwise_count(pa[i] & pb).sum(axis=1, dtype=np.int64)
        else:
            for j in range(m):
                inter[:, j] = np.bitwise_count(pa & pb[j]).sum(axis=1, dtype=np.int64)
    else:  # pragma: no cover - numpy < 2.0
        dt = np.float64 if fa.shape[1] >= 1 << 24 else np.float32  # float32 counts exact below 2**24
        fa, fb = fa.astype(dt), fb.astype(dt)
        inter = np.rint(fa @ fb.T).astype(np.int64)
        area_a = np.rint(fa.sum(axis=1, dtype=np.float64)).astype(np.int64)
        area_b = np.rint(fb.sum(axis=1, dtype=np.float64)).astype(np.int64)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = np.zeros((n, m), dtype=np.float64)
    np.divide(inter, union, out=iou, where=union > 0)
    return iou


def voc_ap(tp: np.ndarray, num_gt: int) -> float | None:
    """VOC2010+ AP of one class from its detections' TP flags in descending score order.

    Args:
        tp: ``(D,)`` bool, True for a true positive, already in the evaluation order.
        num_gt: number of GT instances of the class.

    Returns:
        Area under the precision envelope (recall padded with 0 and 1, precision with 0), in [0, 1];
        None if ``num_gt == 0``; 0.0 if there are GT but no detections.
    """
    if num_gt <= 0:
        return None
    tp = np.asarray(tp, dtype=bool)
    if tp.size == 0:
        return 0.0
    ctp = np.cumsum(tp, dtype=np.float64)
    cfp = np.cumsum(~tp, dtype=np.float64)
    prec = ctp / (ctp + cfp)
    rec = ctp / float(num_gt)
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _desc_order(scores: np.ndarray) -> np.ndarray:
    """Descending-score order with chainercv's tie rule (later entry first); see the module docstring."""
    return np.argsort(scores, kind="stable")[::-1]


def _thresh_key(t: float) -> str:
    return f"{t:g}"


class VOCInstanceEvaluator:
    """Streaming VOC instance-segmentation AP at several IoU thresholds (METHOD.md "Evaluation protocol").

    Call :meth:`update` once per image, then :meth:`evaluate`. Only per-detection records are kept
    (score, class, TP flag per threshold: a few bytes each) plus per-class GT counts; no mask is stored.

    Args:
        num_classes: number of object classes ``C`` (no background); labels are 0-based in ``[0, C)``.
        iou_thresholds: IoU thresholds; a detection is a TP at ``t`` when its IoU >= ``t``.
    """

    def __init__(self, num_classes: int, iou_thresholds: Sequence[float] = (0.25, 0.5, 0.7, 0.75)) -> None:
        if int(num_classes) <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        thr = tuple(float(t) for t in iou_thresholds)
        if not thr or any(not 0.0 <= t <= 1.0 for t in thr):
            raise ValueError(f"iou_thresholds must be a non-empty list of values in [0, 1], got {iou_thresholds}")
        self.num_classes = int(num_classes)
        self.iou_thresholds = thr
        self._thr = np.asarray(thr, dtype=np.float64)
        self.reset()

    def reset(self) -> None:
        """Forget all images seen so far."""
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._tp: list[np.ndarray] = []
        self._num_gt = np.zeros(self.num_classes, dtype=np.int64)
        self.num_images = 0

    def _check(self, d: Mapping[str, Any], keys: tuple[str, ...], what: str) -> tuple[np.ndarray, ...]:
        for key in keys:
            if key not in d:
                raise DataError(f"{what} dict lacks {key!r} (has {sorted(d)})")
        masks = np.asarray(d["masks"])
        labels = np.asarray(d["labels"])
        if masks.ndim != 3:
            raise DataError(f"{what}['masks'] must be (N, H, W), got shape {masks.shape}")
        if labels.shape != (masks.shape[0],):
            raise DataError(f"{what}: {masks.shape[0]} masks but labels of shape {labels.shape}")
        if labels.size:
            if not np.issubdtype(labels.dtype, np.integer):
                raise DataError(f"{what}['labels'] must be integers, got dtype {labels.dtype}")
            if labels.min() < 0 or labels.max() >= self.num_classes:
                raise DataError(
                    f"{what}['labels'] must be 0-based class indices in [0, {self.num_classes}), "
                    f"got range [{labels.min()}, {labels.max()}]"
                )
        if masks.dtype != bool:
            masks = masks != 0
        out = [masks, labels.astype(np.int64)]
        if "scores" in keys:
            scores = np.asarray(d["scores"], dtype=np.float64)
            if scores.shape != labels.shape:
                raise DataError(f"{what}: scores of shape {scores.shape} but {labels.shape[0]} labels")
            if not np.all(np.isfinite(scores)):
                raise DataError(f"{what}['scores'] hold NaN or inf")
            out.append(scores)
        return tuple(out)

    def update(self, pred: Mapping[str, Any], gt: Mapping[str, Any]) -> None:
        """Add one image.

        Args:
            pred: ``{"masks": (N, H, W) bool, "labels": (N,) int 0-based, "scores": (N,) float}``.
            gt: ``{"masks": (M, H, W) bool, "labels": (M,) int 0-based}`` (same ``H, W``).

        Raises:
            DataError: missing keys, inconsistent shapes, labels outside ``[0, C)``, NaN scores, or
                prediction and GT masks of different size.
        """
        p_masks, p_labels, p_scores = self._check(pred, ("masks", "labels", "scores"), "pred")
        g_masks, g_labels = self._check(gt, ("masks", "labels"), "gt")
        n, m = p_masks.shape[0], g_masks.shape[0]
        if n and m and p_masks.shape[1:] != g_masks.shape[1:]:
            raise DataError(f"pred masks are {p_masks.shape[1:]} but gt masks are {g_masks.shape[1:]}")
        self._num_gt += np.bincount(g_labels, minlength=self.num_classes)
        self.num_images += 1
        if n == 0:
            return
        order = _desc_order(p_scores)  # restricted to one class this is that class's order too
        p_labels, p_scores = p_labels[order], p_scores[order]
        tp = np.zeros((n, len(self._thr)), dtype=bool)
        if m:
            iou = mask_iou(p_masks, g_masks)[order]  # (n, m), all classes at once, rows in score order
            iou[p_labels[:, None] != g_labels[None, :]] = -1.0  # a detection only sees GT of its class
            best = iou.argmax(axis=1)  # first maximum, as numpy/chainercv
            best_iou = iou[np.arange(n), best]
            hit = best_iou[:, None] >= self._thr[None, :]  # (n, T), False where no GT of the class
            taken = np.zeros((m, len(self._thr)), dtype=bool)
            for i in range(n):  # sequential by nature: at most a few dozen detections per image
                if hit[i].any():
                    j = best[i]
                    tp[i] = hit[i] & ~taken[j]
                    taken[j] |= hit[i]
        self._scores.append(p_scores)
        self._labels.append(p_labels)
        self._tp.append(tp)

    def _class_tp(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._scores:
            return np.concatenate(self._scores), np.concatenate(self._labels), np.concatenate(self._tp)
        t = len(self._thr)
        return np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros((0, t), dtype=bool)

    def evaluate(self) -> dict[str, Any]:
        """AP per class and threshold, and their means.

        Returns:
            JSON-serialisable dict::

                {"mAP25": float | None, "mAP50": ..., "mAP70": ..., "mAP75": ...,  # one per threshold
                 "per_class": {"0.25": [AP or None per class], "0.5": [...], ...},
                 "num_gt": [int per class], "num_pred": [int per class], "num_images": int}

            APs are fractions in [0, 1]; a class without GT has AP None and is left out of the mean;
            the mean is None when no class has GT. Key ``mAP<k>`` uses ``k = round(100 * t)``.
        """
        scores, labels, tp = self._class_tp()
        result: dict[str, Any] = {}
        per_class: dict[str, list[float | None]] = {}
        num_pred = np.bincount(labels, minlength=self.num_classes)
        # evaluation order per class: insertion order is image by image, each image in its own order
        class_order = []
        for c in range(self.num_classes):
            sel = np.flatnonzero(labels == c)
            class_order.append(sel[_desc_order(scores[sel])])
        for ti, t in enumerate(self._thr):
            aps = [voc_ap(tp[order, ti], int(self._num_gt[c])) for c, order in enumerate(class_order)]
            valid = [a for a in aps if a is not None]
            result[f"mAP{round(100 * t)}"] = float(np.mean(valid)) if valid else None
            per_class[_thresh_key(t)] = aps
        result["per_class"] = per_class
        result["num_gt"] = [int(v) for v in self._num_gt]
        result["num_pred"] = [int(v) for v in num_pred]
        result["num_images"] = int(self.num_images)
        return result


def eval_instance_segmentation_voc(
    preds: Iterable[Mapping[str, Any]],
    gts: Iterable[Mapping[str, Any]],
    iou_thresh: float = 0.5,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """One-shot VOC instance AP at one threshold, in chainercv's return form.

    Args:
        preds: per image ``{"masks", "labels", "scores"}`` (see :meth:`VOCInstanceEvaluator.update`).
        gts: per image ``{"masks", "labels"}``, same length and order as ``preds``.
        iou_thresh: IoU threshold (TP when IoU >= it).
        num_classes: ``C``; default ``1 + `` the largest label seen in ``preds`` or ``gts``.

    Returns:
        ``{"ap": (C,) float64 array with NaN for classes without GT, "map": float (NaN-ignoring mean)}``.

    Raises:
        DataError: ``preds`` and ``gts`` differ in length, or bad per-image input.
    """
    preds = list(preds)
    gts = list(gts)
    if len(preds) != len(gts):
        raise DataError(f"{len(preds)} predictions but {len(gts)} ground truths: one of each per image")
    if num_classes is None:
        labels = [np.asarray(d["labels"]).reshape(-1) for d in preds + gts]
        num_classes = int(max((lab.max() for lab in labels if lab.size), default=-1)) + 1
        num_classes = max(num_classes, 1)
    ev = VOCInstanceEvaluator(num_classes, iou_thresholds=(iou_thresh,))
    for p, g in zip(preds, gts):
        ev.update(p, g)
    aps = ev.evaluate()["per_class"][_thresh_key(float(iou_thresh))]
    ap = np.array([np.nan if a is None else a for a in aps], dtype=np.float64)
    valid = ap[~np.isnan(ap)]
    return {"ap": ap, "map": float(valid.mean()) if valid.size else float("nan")}
