"""Stage 5: BESTIE instance predictions on the training images -> a COCO pseudo-label dataset.

docs/METHOD.md, "5-6. Pseudo labels and Mask R-CNN": the trained instance model predicts the train
images; its instances (masks as RLE, class, score) form a COCO JSON on which Mask R-CNN is trained.

Per image, the predicted instances (read from the instances HDF5 of ``bestie predict-instances``: arrays
``masks`` ``(N, H, W)`` bool/uint8, ``labels`` ``(N,)`` int 0-based, ``scores`` ``(N,)`` float) are
filtered, in this order:

1. ``score >= score_threshold``;
2. ``area >= min_area`` pixels;
3. (``filter_by_image_labels``) the class is one of the image-level labels of the image. Those labels are
   the weak supervision of the training split, so this uses no mask or box annotation;
4. the ``max_per_image`` highest-scoring instances are kept.

The written JSON is a COCO instances dataset (loads in ``pycocotools.coco.COCO``):

- ``images``: ``id`` = the original image id for COCO datasets (so the file scores against the
  dataset's own annotation file), else 1, 2, ... in dataset order; ``file_name`` (base name of the image
  file), ``height``, ``width`` (pixels, the size of the predicted masks), and the extra field
  ``image_key`` = the dataset's image id string (how :mod:`bestie.stages.train_maskrcnn` finds the
  image). Every image of the split is listed, also those left without instances.
- ``annotations``: ``id`` 1, 2, ..., ``segmentation`` compressed RLE (``counts`` str), ``bbox``
  ``[x, y, w, h]`` from the mask, ``area`` (pixel count, > 0), ``iscrowd`` 0, ``category_id``, and the
  extra field ``score``.
- ``categories``: the dataset's categories (``id``, ``name``, ``supercategory``: COCO's, else ""), in
  class-index order: VOC-layout datasets use ids ``1..C`` (class ``c`` -> id ``c + 1``), COCO datasets
  their original category ids, gaps kept (:func:`category_ids`).

These are the fields Detectron2's ``load_coco_json`` (``register_coco_instances``) and MMDetection's
``CocoDataset`` read; both take the class names from ``categories`` (MMDetection matches them against
its ``metainfo.classes``).
- ``info``: the split, the source file and the export settings.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np

from bestie.errors import ArtifactError, ConfigError, DataError
from bestie.io.coco_json import category_ids  # noqa: F401 (re-exported: train_bestie / train_maskrcnn import it here)
from bestie.io.coco_json import check_instances
from bestie.sections import ExportConfig  # noqa: F401 (the stage's config section)

__all__ = ["ExportConfig", "category_ids", "filter_instances", "gt_instances", "run"]

log = logging.getLogger(__name__)

InstanceSource = Union[str, os.PathLike, Mapping[str, Mapping[str, np.ndarray]], Callable[[str], Mapping[str, Any]]]


def filter_instances(
    instances: Mapping[str, Any],
    cfg: ExportConfig,
    image_labels: tuple[int, ...] | None = None,
    source: str = "instances",
) -> dict[str, np.ndarray]:
    """Apply the export filters (score, area, image labels, count; see the module docstring).

    Args:
        instances: ``{"masks": (N, H, W) bool/0-1, "labels": (N,) int 0-based, "scores": (N,) float}``.
        cfg: thresholds.
        image_labels: 0-based classes of the image-level label (used when ``cfg.filter_by_image_labels``).
        source: name used in error messages (file and image id).

    Returns:
        ``{"masks": (K, H, W) bool, "labels": (K,) int64, "scores": (K,) float32}``, by descending score
        (ties keep the input order).

    Raises:
        DataError: missing keys, inconsistent shapes, non-integer or negative labels, non-finite scores
            (:func:`bestie.io.coco_json.check_instances`), an empty image size.
    """
    masks, labels, scores = check_instances(instances, source, score_dtype=np.float32)
    if masks.shape[1] == 0 or masks.shape[2] == 0:
        raise DataError(f"{source}: masks must be (N, H, W) with H, W > 0, got shape {masks.shape}")
    masks = masks.astype(bool, copy=False)
    labels = labels.astype(np.int64)
    keep = scores >= cfg.score_threshold
    keep &= masks.sum(axis=(1, 2)) >= max(cfg.min_area, 1)  # empty masks never become labels
    if cfg.filter_by_image_labels and image_labels is not None:
        keep &= np.isin(labels, np.asarray(image_labels, dtype=np.int64))
    idx = np.flatnonzero(keep)
    idx = idx[np.argsort(-scores[idx], kind="stable")][: cfg.max_per_image]
    return {"masks": masks[idx], "labels": labels[idx], "scores": scores[idx]}


def gt_instances(dataset: Any) -> Callable[[str], Mapping[str, np.ndarray]]:
    """The dataset's ground-truth instances as a ``predictions`` source of :func:`run` (score 1.0 each).

    For the upper bound of stage 6 only: a Mask R-CNN trained on this export has seen GT masks, so it is
    no weakly-supervised result (docs/RESULTS.md reports it as "Mask R-CNN on GT instances").

    Returns:
        ``image_id -> {"masks": (N, H, W) bool, "labels": (N,) int64 0-based, "scores": (N,) float32}``.

    Raises:
        DataError: (when called) an image without GT instances (names the id).
    """

    def get(image_id: str) -> Mapping[str, np.ndarray]:
        gt = dataset.instances_gt(image_id)
        if gt is None:
            raise DataError(f"export from GT: image {image_id!r} has no GT instances (masks / annotations)")
        labels = np.asarray(gt["labels"], dtype=np.int64).reshape(-1)
        return {"masks": np.asarray(gt["masks"], dtype=bool), "labels": labels,
                "scores": np.ones(labels.shape, dtype=np.float32)}

    get.__name__ = "ground-truth instances"
    return get


class _Source:
    """Uniform ``get(image_id) -> instances`` over an HDF5 store, a mapping or a callable."""

    def __init__(self, predictions: InstanceSource) -> None:
        self._reader = None
        if isinstance(predictions, (str, os.PathLike)):
            from bestie.io.h5store import H5Reader

            self.name = os.fspath(predictions)
            self._reader = H5Reader(predictions)
            self._get = self._from_reader
        elif isinstance(predictions, Mapping):
            self.name = "predictions mapping"
            self._map = predictions
            self._get = self._from_map
        elif callable(predictions):
            self.name = getattr(predictions, "__name__", "predictions callable")
            self._get = predictions
        else:
            raise ConfigError(f"export: predictions must be an HDF5 path, a mapping or a callable, got {predictions!r}")

    def _from_reader(self, image_id: str) -> Mapping[str, Any]:
        if image_id not in self._reader:
            raise ArtifactError(f"{self.name}: no predictions for image id {image_id!r}")
        return self._reader.read(image_id)

    def _from_map(self, image_id: str) -> Mapping[str, Any]:
        if image_id not in self._map:
            raise ArtifactError(f"{self.name}: no predictions for image id {image_id!r}")
        return self._map[image_id]

    def get(self, image_id: str) -> Mapping[str, Any]:
        return self._get(image_id)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


def run(
    cfg: ExportConfig,
    dataset_cfg: Mapping[str, Any],
    split: str,
    predictions: InstanceSource,
    out_json: str | os.PathLike,
    *,
    dataset: Any = None,
) -> dict[str, Any]:
    """Write the COCO pseudo-label JSON of ``split`` (METHOD.md stage 5).

    Args:
        cfg: export settings.
        dataset_cfg: the ``dataset`` config section (:func:`bestie.data.build_dataset`).
        split: the split whose predictions are exported (the training split).
        predictions: the instances HDF5 written by ``bestie predict-instances`` (per image id:
            ``masks`` ``(N, H, W)``, ``labels`` ``(N,)`` 0-based, ``scores`` ``(N,)``), or a mapping /
            callable ``image_id -> instances dict`` (same arrays).
        out_json: output path, written atomically.
        dataset: an already built dataset to use instead of ``build_dataset(dataset_cfg, split)``.

    Returns:
        Summary ``{"num_images", "num_images_with_instances", "num_instances", "num_dropped"}``.

    Raises:
        ArtifactError: the predictions file is missing/corrupt or lacks an image of the split.
        DataError: malformed predictions (names the file and image id).
        ConfigError: bad settings.
    """
    if dataset is None:
        from bestie.data import build_dataset

        dataset = build_dataset(dataset_cfg, split=split)
    from bestie.config import to_dict
    from bestie.io.coco_json import make_annotation, write_coco_dataset

    cat_ids = category_ids(dataset)
    coco = getattr(dataset, "coco", None)  # COCO datasets keep their image ids and supercategories
    categories = [
        {"id": cid, "name": name, "supercategory": str(coco.cats[cid].get("supercategory", "")) if coco else ""}
        for cid, name in zip(cat_ids, dataset.class_names)
    ]
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    dropped = 0
    with_instances = 0
    source = _Source(predictions)
    try:
        for k, image_id in enumerate(dataset.ids, start=1):
            raw = source.get(image_id)
            where = f"{source.name}, image {image_id!r}"
            labels = dataset.labels(image_id) if cfg.filter_by_image_labels else None
            inst = filter_instances(raw, cfg, labels, where)
            n_raw = int(np.asarray(raw["labels"]).shape[0])
            if inst["labels"].size and int(inst["labels"].max()) >= dataset.num_classes:
                raise DataError(
                    f"{where}: class index {int(inst['labels'].max())} outside 0..{dataset.num_classes - 1}"
                )
            dropped += n_raw - int(inst["labels"].size)
            h, w = inst["masks"].shape[1:]
            image_no = int(image_id) if coco is not None else k
            images.append({
                "id": image_no,
                "file_name": Path(dataset.image_path(image_id)).name,
                "height": int(h),
                "width": int(w),
                "image_key": image_id,
            })
            with_instances += bool(inst["labels"].size)
            for mask, label, score in zip(inst["masks"], inst["labels"], inst["scores"]):
                annotations.append(
                    make_annotation(len(annotations) + 1, image_no, cat_ids[int(label)], mask, float(score)))
    finally:
        source.close()
    info = {
        "description": "BESTIE pseudo labels (bestie export-pseudo-labels)",
        "split": split,
        "source": source.name,
        "export": to_dict(cfg),
    }
    write_coco_dataset(out_json, images, annotations, categories, info=info)
    summary = {
        "num_images": len(images),
        "num_images_with_instances": with_instances,
        "num_instances": len(annotations),
        "num_dropped": dropped,
    }
    log.info(
        "pseudo labels of %s: %d instances on %d/%d images (%d predictions dropped) -> %s",
        split, len(annotations), with_instances, len(images), dropped, out_json,
    )
    return summary
