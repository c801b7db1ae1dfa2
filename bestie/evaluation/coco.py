"""COCO mask AP with pycocotools ``COCOeval`` (iouType ``"segm"``), METHOD.md "Evaluation protocol".

The standard COCO summary (AP over IoU 0.50:0.95, AP50, AP75, AP small/medium/large, 100 detections per
image) plus AP per category, read from ``COCOeval.eval["precision"]`` the same way ``summarize`` reads
the overall AP. COCOeval's stdout is captured and sent to this module's logger (INFO), so that stage
logs keep the familiar table.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bestie.errors import DataError

__all__ = ["coco_segm_eval", "SUMMARY_KEYS", "build_coco_gt", "coco_subset", "pr_curves"]

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _none_if_negative(v: float) -> float | None:
    return None if v < 0 else float(v)


def coco_segm_eval(coco_gt: COCO, results: Sequence[dict]) -> dict[str, Any]:
    """Evaluate instance masks against a COCO ground truth.

    Args:
        coco_gt: ``pycocotools.coco.COCO`` of the GT dataset (its annotations must have segmentations).
        results: COCO results records ``{"image_id", "category_id", "segmentation": RLE, "score"}``
            (as from :func:`bestie.io.coco_json.instances_to_coco_results`); the list is not modified.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl": float in [0, 1] or None,
        "per_class": [{"category_id": int, "name": str, "AP": float | None}, ...] (GT category order),
        "num_results": int}``. A summary value is None where COCOeval reports -1 (no GT of that area);
        a category AP is None when the category has no GT. An empty ``results`` list gives 0.0 for every
        value (with a warning) instead of COCOeval's crash.

    Raises:
        DataError: a result refers to an image id that is not in ``coco_gt`` or lacks a required key.
    """
    cats = coco_gt.loadCats(coco_gt.getCatIds())
    results = list(results)
    if not results:
        log.warning("coco_segm_eval: no detections at all; every AP is reported as 0")
        out: dict[str, Any] = {k: 0.0 for k in SUMMARY_KEYS}
        out["per_class"] = [{"category_id": int(c["id"]), "name": c["name"], "AP": 0.0} for c in cats]
        out["num_results"] = 0
        return out
    gt_images = set(coco_gt.getImgIds())
    for i, r in enumerate(results):
        for key in ("image_id", "category_id", "segmentation", "score"):
            if key not in r:
                raise DataError(f"COCO result {i} lacks {key!r}")
    unknown = {r["image_id"] for r in results} - gt_images
    if unknown:
        raise DataError(
            f"{len(unknown)} result image ids are not in the GT dataset, e.g. {sorted(unknown)[:5]}"
        )
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        # loadRes adds fields (area, bbox, id) to the records it gets: give it copies
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    for line in buf.getvalue().splitlines():
        if line.strip():
            log.info("%s", line)
    stats = ev.stats
    out = {k: _none_if_negative(stats[i]) for i, k in enumerate(SUMMARY_KEYS)}
    # precision: (T iou thresholds, R recall thresholds, K categories, A area ranges, M max dets)
    precision = ev.eval["precision"]
    a_all = list(ev.params.areaRngLbl).index("all")
    m_last = len(ev.params.maxDets) - 1  # 100 detections, as the summary AP
    cat_index = {cid: k for k, cid in enumerate(ev.params.catIds)}
    per_class = []
    for c in cats:
        p = precision[:, :, cat_index[c["id"]], a_all, m_last]
        p = p[p > -1]
        per_class.append(
            {"category_id": int(c["id"]), "name": c["name"], "AP": float(np.mean(p)) if p.size else None}
        )
    out["per_class"] = per_class
    out["num_results"] = len(results)
    return out


def build_coco_gt(
    gts: Sequence[Mapping[str, np.ndarray]], image_ids: Sequence[int], cat_ids: Sequence[int], class_names: Sequence[str]
):
    """A ``pycocotools.coco.COCO`` ground truth made from per-image GT instance dicts.

    Args:
        gts: per image ``{"masks": (M, H, W) bool, "labels": (M,) int64 0-based}``.
        image_ids: the COCO image id of each entry of ``gts``.
        cat_ids: COCO category id per 0-based class.
        class_names: name per class.

    Returns:
        The indexed ``COCO`` object (annotations with RLE masks, ``iscrowd`` 0).
    """
    from bestie.io.coco_json import make_annotation

    images, anns = [], []
    for iid, gt in zip(image_ids, gts):
        h, w = np.asarray(gt["masks"]).shape[1:]
        images.append({"id": int(iid), "height": int(h), "width": int(w), "file_name": str(iid)})
        for mask, label in zip(gt["masks"], gt["labels"]):
            anns.append(make_annotation(len(anns) + 1, int(iid), int(cat_ids[int(label)]), mask))
    coco = COCO()
    coco.dataset = {
        "images": images, "annotations": anns,
        "categories": [{"id": int(c), "name": n} for c, n in zip(cat_ids, class_names)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_subset(coco: Any, image_ids: Sequence[int]) -> Any:
    """``coco`` restricted to ``image_ids`` (itself when it holds no other image), so that images left
    out of the dataset (e.g. by ``skip_bad_images``) do not count as missed GT."""
    keep = set(int(i) for i in image_ids)
    if set(coco.getImgIds()) <= keep:
        return coco
    sub = COCO()
    sub.dataset = {
        **{k: v for k, v in coco.dataset.items() if k not in ("images", "annotations")},
        "images": [im for im in coco.dataset["images"] if int(im["id"]) in keep],
        "annotations": [a for a in coco.dataset["annotations"] if int(a["image_id"]) in keep],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        sub.createIndex()
    return sub


def pr_curves(coco_gt: Any, results: Sequence[Mapping[str, Any]], iou: float = 0.5) -> dict[str, Any]:
    """Precision-recall curves at one IoU from pycocotools' ``COCOeval`` (iouType ``segm``).

    Precision is COCO's interpolated precision (the maximum precision at any recall >= r) at the 101
    recall points ``0, 0.01, ..., 1``, for all object areas and 100 detections per image.

    Returns:
        ``{"iou": float, "recall": [101 floats], "precision": [101 floats or None] (mean over the
        classes with GT), "per_class": [{"category_id", "name", "precision": [101] or None}],
        "source": str}``. With no results at all, every precision is 0.
    """
    cats = coco_gt.loadCats(coco_gt.getCatIds())
    recall = np.linspace(0.0, 1.0, 101)
    out: dict[str, Any] = {
        "iou": float(iou), "recall": recall.round(2).tolist(),
        "source": "pycocotools COCOeval segm, interpolated precision at 101 recall points",
    }
    has_gt = {int(c["id"]): bool(coco_gt.getAnnIds(catIds=[c["id"]])) for c in cats}
    if not results:
        out["per_class"] = [{"category_id": int(c["id"]), "name": c["name"],
                             "precision": [0.0] * 101 if has_gt[int(c["id"])] else None} for c in cats]
        out["precision"] = [0.0] * 101 if any(has_gt.values()) else [None] * 101
        return out
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco_gt.loadRes(copy.deepcopy(list(results)))
        ev = COCOeval(coco_gt, dt, iouType="segm")
        ev.params.iouThrs = np.array([float(iou)])
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][0, :, :, list(ev.params.areaRngLbl).index("all"), -1]  # (R, K)
    cat_index = {cid: k for k, cid in enumerate(ev.params.catIds)}
    per_class, valid = [], []
    for c in cats:
        p = prec[:, cat_index[c["id"]]]
        if (p < 0).all():
            per_class.append({"category_id": int(c["id"]), "name": c["name"], "precision": None})
            continue
        p = np.clip(p, 0.0, 1.0)
        valid.append(p)
        per_class.append({"category_id": int(c["id"]), "name": c["name"], "precision": p.round(6).tolist()})
    out["per_class"] = per_class
    out["precision"] = np.mean(valid, axis=0).round(6).tolist() if valid else [None] * 101
    return out
