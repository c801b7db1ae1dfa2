"""Stage 6b: evaluate the trained Mask R-CNN on the held-out split (docs/METHOD.md, "Evaluation protocol").

For every image of the split the detector predicts instances (``score >= score_threshold``, at most
``max_dets`` per image, masks = mask probability ``> mask_threshold`` at the original image size). They
are scored with

- the VOC protocol (:class:`bestie.evaluation.VOCInstanceEvaluator`): mAP at IoU 0.25 / 0.5 / 0.7 /
  0.75 and AP per class, against the GT instances of the dataset (COCO crowd regions left out);
- COCO mask AP (:func:`bestie.evaluation.coco.coco_segm_eval`, pycocotools ``COCOeval`` ``segm``): the
  dataset's own COCO object for COCO datasets (restricted to the dataset's images); for VOC-layout datasets a COCO ground truth built in
  memory from ``instances_gt`` (images ``1..N`` in dataset order, category ids ``1..C``);
- a precision-recall curve at IoU ``pr_iou`` (default 0.5) for the report: pycocotools' interpolated
  precision at its 101 recall points (``COCOeval.eval["precision"]``, all areas, 100 detections), per
  class and averaged over the classes with GT.

All AP and precision/recall values in the metrics JSON are fractions in ``[0, 1]`` (None where a class
has no GT). Images without GT masks (VOC images lacking ``SegmentationObject``) are predicted but not
scored.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from bestie.engine import resolve_device
from bestie.errors import ConfigError, DataError
from bestie.data import eval_dataset_cfg
from bestie.evaluation.coco import build_coco_gt, coco_subset, pr_curves
from bestie.report.units import percent
from bestie.maskrcnn_inference import load_maskrcnn, predict_image  # noqa: F401 (re-exported)
from bestie.sections import EvalConfig  # noqa: F401 (the stage's config section)

__all__ = ["EvalConfig", "load_maskrcnn", "predict_image", "eval_dataset_cfg", "build_coco_gt", "pr_curves", "run"]

log = logging.getLogger(__name__)


def run(
    cfg: EvalConfig,
    dataset_cfg: Mapping[str, Any],
    split: str,
    checkpoint: str | os.PathLike,
    out_metrics: str | os.PathLike,
    out_predictions: str | os.PathLike,
    device: str | None = None,
    *,
    dataset: Any = None,
) -> dict[str, Any]:
    """Predict the held-out split with the Mask R-CNN and score it (METHOD.md, "Evaluation protocol").

    Args:
        cfg: evaluation settings.
        dataset_cfg: the ``dataset`` config section (adapted by :func:`eval_dataset_cfg`).
        split: the held-out split (e.g. ``val``).
        checkpoint: final checkpoint of :mod:`bestie.stages.train_maskrcnn`.
        out_metrics: metrics JSON (written atomically)::

            {"split", "checkpoint", "num_images", "num_images_scored", "num_detections",
             "mAP25", "mAP50", "mAP70", "mAP75",            # VOC protocol, fractions in [0, 1]
             "AP", "AP50", "AP75", "APs", "APm", "APl",    # COCO segm, fractions in [0, 1] or None
             "per_class": [{"class", "category_id", "num_gt", "AP25", "AP50", "AP70", "AP75", "coco_AP"}],
             "voc": <VOCInstanceEvaluator.evaluate()>, "coco": <coco_segm_eval()>,
             "pr_curve": <pr_curves()>, "config": {...}}

        out_predictions: COCO results JSON (``image_id``, ``category_id``, ``segmentation`` RLE,
            ``score``, ``bbox``, plus ``image_key`` = the dataset's image id), written atomically.
        device: ``"cpu"`` / ``"cuda"`` (default: CUDA when available).
        dataset: an already built dataset of the split (instead of :func:`bestie.data.build_dataset`).

    Returns:
        The metrics dict.

    Raises:
        ArtifactError: unusable checkpoint.
        ConfigError: the checkpoint's classes differ from the dataset's.
        DataError: no image of the split has GT instances.
    """
    from bestie.config import to_dict
    from bestie.evaluation import VOCInstanceEvaluator
    from bestie.evaluation.coco import coco_segm_eval
    from bestie.io.atomic import write_json_atomic
    from bestie.io.coco_json import write_coco_results
    from bestie.io.coco_json import category_ids

    if dataset is None:
        from bestie.data import build_dataset

        dataset = build_dataset(eval_dataset_cfg(dataset_cfg, split), split=split)
    dev = resolve_device(device, "evaluate")
    model, extra = load_maskrcnn(checkpoint, score_threshold=cfg.score_threshold, max_dets=cfg.max_dets)
    if list(extra.get("class_names", [])) != list(dataset.class_names):
        raise ConfigError(
            f"{checkpoint}: trained for classes {extra.get('class_names')}, but the {split} split has "
            f"{list(dataset.class_names)}"
        )
    model.to(dev)
    cat_ids = category_ids(dataset)
    is_coco = getattr(dataset, "coco", None) is not None
    evaluator = VOCInstanceEvaluator(dataset.num_classes)
    results, gts, gt_image_ids, scored = _predict_split(model, dataset, dev, cfg, split, cat_ids, evaluator)
    if scored == 0:
        raise DataError(f"split {split!r}: no image has GT instances; nothing to evaluate")
    voc = evaluator.evaluate()
    if is_coco:
        coco_gt = coco_subset(dataset.coco, [int(i) for i in dataset.ids])
    else:
        coco_gt = build_coco_gt(gts, gt_image_ids, cat_ids, dataset.class_names)
    scored_ids = set(coco_gt.getImgIds())
    scored_results = [r for r in results if r["image_id"] in scored_ids]
    coco = coco_segm_eval(coco_gt, scored_results)
    pr = pr_curves(coco_gt, scored_results, cfg.pr_iou)

    per_class = _per_class_rows(dataset.class_names, cat_ids, voc, coco)
    metrics: dict[str, Any] = {
        "split": split,
        "checkpoint": str(checkpoint),
        "num_images": len(dataset.ids),
        "num_images_scored": scored,
        "num_detections": len(results),
        **{k: voc[k] for k in ("mAP25", "mAP50", "mAP70", "mAP75")},
        **{k: coco[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")},
        "per_class": per_class,
        "voc": voc,
        "coco": coco,
        "pr_curve": pr,
        "config": to_dict(cfg),
    }
    write_coco_results(out_predictions, results)
    write_json_atomic(out_metrics, metrics)
    log.info("Mask R-CNN on %s (%d images scored): mAP25 %s mAP50 %s mAP70 %s mAP75 %s | COCO AP %s AP50 %s",
             split, scored, *(percent(metrics[k]) for k in ("mAP25", "mAP50", "mAP70", "mAP75", "AP", "AP50")))
    return metrics


def _predict_split(model: torch.nn.Module, dataset: Any, dev: torch.device, cfg: EvalConfig, split: str,
                   cat_ids: list[int], evaluator: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[int], int]:
    """Predict every image of ``dataset`` and feed the VOC ``evaluator`` with those that have GT instances
    (crowd instances of a COCO dataset left out).

    Returns:
        ``(results, gts, gt_image_ids, scored)``: the COCO result records of every image (with
        ``image_key``; image ids: the COCO ids of a COCO dataset, else 1-based positions), the GT instances
        and their image ids for a COCO GT built from a non-COCO dataset (empty for a COCO dataset), and the
        number of scored images.
    """
    from bestie.io.coco_json import instances_to_coco_results
    from bestie.progress import progress

    is_coco = getattr(dataset, "coco", None) is not None
    results: list[dict[str, Any]] = []
    gts, gt_image_ids = [], []
    scored = 0
    for k, image_id in enumerate(progress(dataset.ids, desc=f"evaluate {split}"), start=1):
        pred = predict_image(model, dataset.image(image_id), dev, score_threshold=cfg.score_threshold,
                             mask_threshold=cfg.mask_threshold, max_dets=cfg.max_dets)
        coco_id = int(image_id) if is_coco else k
        recs = instances_to_coco_results(coco_id, pred, lambda c: cat_ids[c])
        for r in recs:
            r["image_key"] = image_id
        gt = dataset.instances_gt(image_id)
        if gt is None:
            results.extend(recs)
            continue
        if "iscrowd" in gt:
            keep = ~np.asarray(gt["iscrowd"], dtype=bool)
            gt = {"masks": gt["masks"][keep], "labels": gt["labels"][keep]}
        evaluator.update(pred, gt)
        scored += 1
        results.extend(recs)
        if not is_coco:
            gts.append({"masks": gt["masks"], "labels": gt["labels"]})
            gt_image_ids.append(k)
    return results, gts, gt_image_ids, scored


def _per_class_rows(class_names: list[str], cat_ids: list[int], voc: Mapping[str, Any],
                    coco: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``per_class`` rows of the metrics: ``class``, ``category_id``, ``num_gt``, VOC AP at IoU 0.25 /
    0.5 / 0.7 / 0.75 and the COCO AP of the class (None when COCOeval has none)."""
    per_class = []
    coco_ap = {int(c["category_id"]): c["AP"] for c in coco["per_class"]}
    for c, name in enumerate(class_names):
        row = {"class": name, "category_id": cat_ids[c], "num_gt": voc["num_gt"][c]}
        for t, key in ((0.25, "AP25"), (0.5, "AP50"), (0.7, "AP70"), (0.75, "AP75")):
            row[key] = voc["per_class"][f"{t:g}"][c]
        row["coco_AP"] = coco_ap.get(cat_ids[c])
        per_class.append(row)
    return per_class
