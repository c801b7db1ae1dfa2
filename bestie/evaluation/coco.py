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
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bestie.errors import DataError

__all__ = ["coco_segm_eval", "SUMMARY_KEYS"]

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
