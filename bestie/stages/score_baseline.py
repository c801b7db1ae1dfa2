"""Pseudo-label baseline: the instances that semantic knowledge transfer alone would give.

An instance is a WSSS component (8-connected region of one class, at least ``min_area`` pixels) that
holds exactly one point of its class with ``conf >= point_threshold`` (with ``split_components``: also each
part of a component split by its points), scored by that point's conf (METHOD.md section 4, "Semantic
knowledge transfer"). The masks are those of :func:`bestie.targets.pseudo_instance_components`, which BESTIE
trains on. BESTIE's self-refinement must beat this at mAP50
(issue 5); the figure goes into the report as "pseudo-label baseline".

Stage ``score_baseline`` (rule ``score_baseline``, ``bestie score-baseline``). It has no config section of
its own: it reads the pseudo-label keys of the ``bestie`` section (:data:`bestie.sections.BASELINE_KEYS`),
so that it scores exactly the pseudo labels BESTIE trains on.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from bestie.params import PseudoLabelParams
from bestie.report.units import percent

__all__ = ["baseline_instances", "run"]

log = logging.getLogger(__name__)


def baseline_instances(
    wsss: np.ndarray,
    labels: tuple[int, ...] | list[int],
    points: np.ndarray,
    params: PseudoLabelParams = PseudoLabelParams(),
    *,
    num_classes: int,
) -> dict[str, np.ndarray]:
    """The accepted pseudo instances of :func:`bestie.targets.pseudo_instance_components` as predictions:
    each mask scored by the conf of its one point.

    Args:
        wsss: (H, W) uint8 WSSS map: 0 background, ``c + 1`` for class ``c``, 255 uncertain.
        labels: present classes (0-based); components of other classes are ignored.
        points: (N, 4) float32 rows ``x, y, class, conf`` in pixels of this map.
        params: the pseudo labels' :class:`~bestie.params.PseudoLabelParams` (``min_area``,
            ``point_threshold``, ``split_components``; ``setting`` and ``sigma`` do not change the masks).
        num_classes: ``C``, number of dataset classes.

    Returns:
        ``{"masks": (K, H, W) bool, "labels": (K,) int64, "scores": (K,) float32}``.

    Raises:
        DataError: malformed ``wsss``, ``labels`` or ``points`` (:func:`~bestie.targets.pseudo_instance_components`).
    """
    from bestie.targets import point_pixels, pseudo_instance_components

    h, w = wsss.shape
    comp = pseudo_instance_components(wsss, labels, points, num_classes=num_classes, params=params)
    comp_map, table = comp["components"], comp["table"]
    px, py, pcls, pconf, inside = point_pixels(points, h, w, num_classes)
    keep = inside & (pconf >= params.point_threshold)
    k_pt = np.zeros(len(px), dtype=np.int64)
    k_pt[keep] = comp_map[py[keep], px[keep]]
    accepted = np.flatnonzero(table[:, 3] == 1)
    masks, out_labels, scores = [], [], []
    for k in accepted.tolist():
        c = int(table[k, 0])
        on = (k_pt == k + 1) & (pcls == c)
        masks.append(comp_map == k + 1)
        out_labels.append(c)
        scores.append(float(pconf[on].max()))
    if not masks:
        return {
            "masks": np.zeros((0, h, w), dtype=bool),
            "labels": np.zeros((0,), dtype=np.int64),
            "scores": np.zeros((0,), dtype=np.float32),
        }
    return {
        "masks": np.stack(masks),
        "labels": np.asarray(out_labels, dtype=np.int64),
        "scores": np.asarray(scores, dtype=np.float32),
    }


def run(cfg, dataset_cfg: dict, split: str, wsss_h5: Path, points_h5: Path | None, out_metrics: Path) -> None:
    """Score the pseudo-label baseline of ``split`` against its GT instances (VOC mAP25/50/70/75).

    Args:
        cfg: the BESTIE stage config (its :meth:`~bestie.sections.BestieConfig.pseudo_label_params`: ``min_area``,
            ``point_threshold``; the point setting ignores the threshold, GT centers being certain).
        dataset_cfg: the dataset section of the config.
        split: the split to score (its GT masks never enter training).
        wsss_h5: WSSS maps (HDF5, per id ``wsss`` (H, W) uint8).
        points_h5: peak points (HDF5, per id ``points`` (N, 4)); ``None`` in the point setting, where
            the GT centers of the instances are the points.
        out_metrics: JSON written atomically.

    Raises:
        ArtifactError: a missing or corrupt input artifact.
        DataError: an image id of the split missing from the WSSS maps.
    """
    from bestie.data import build_dataset
    from bestie.data.points import centers_from_instances
    from bestie.errors import DataError
    from bestie.evaluation import VOCInstanceEvaluator
    from bestie.io.atomic import write_json_atomic
    from bestie.io.h5store import H5Reader

    dataset = build_dataset(dataset_cfg, split=split)
    evaluator = VOCInstanceEvaluator(dataset.num_classes)
    wsss_store = H5Reader(wsss_h5)
    point_store = H5Reader(points_h5) if points_h5 is not None else None
    params = cfg.pseudo_label_params()
    if point_store is None:
        params = dataclasses.replace(params, point_threshold=0.0)
    scored = 0
    try:
        for image_id in dataset.ids:
            gt = dataset.instances_gt(image_id)
            if gt is None:
                continue
            if image_id not in wsss_store:
                raise DataError(f"{wsss_h5}: no WSSS map for image id {image_id!r} of split {split!r}")
            wsss = wsss_store.read_array(image_id, "wsss")
            if point_store is None:
                points = centers_from_instances(gt["masks"], gt["labels"])
            else:
                points = point_store.read_array(image_id, "points")
            pred = baseline_instances(wsss, dataset.labels(image_id), points, params, num_classes=dataset.num_classes)
            evaluator.update(pred, gt)
            scored += 1
    finally:
        wsss_store.close()
        if point_store is not None:
            point_store.close()
    metrics = evaluator.evaluate()
    metrics.update({"split": split, "num_images": scored, "method": "wsss-components-with-one-point"})
    log.info("pseudo-label baseline on %s (%d images): mAP25 %s mAP50 %s mAP70 %s", split, scored,
             *(percent(metrics.get(k)) for k in ("mAP25", "mAP50", "mAP70")))
    write_json_atomic(out_metrics, metrics)
