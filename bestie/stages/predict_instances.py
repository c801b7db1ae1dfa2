"""Stage 4b: BESTIE instance predictions on a split, scored against GT masks where they exist.

METHOD.md section 4, "Inference": softmax semantic probabilities (optionally averaged with those of the
flipped image), class-wise center heatmaps and offsets; :func:`bestie.postprocess.get_instances` groups
the pixels of each predicted class component around the predicted centers.

The inference itself (input size, flip TTA, grouping, scoring, checkpoint loading) is :mod:`bestie.inference`.

Output HDF5 (``bestie.io.h5store`` store, one group per image id):

- ``masks``: ``(N, H, W)`` bool instance masks in original pixels, highest score first. Stored chunked,
  byte-shuffled and gzip-compressed by :class:`~bestie.io.h5store.H5Writer`, which shrinks binary masks
  by one to two orders of magnitude, so no RLE is needed (and the export stage reads the arrays as is);
- ``labels``: ``(N,)`` int64 0-based classes; ``scores``: ``(N,)`` float32 in ``[0, 1]``;
- image attr ``image_size`` = ``(H, W)``; file attrs: stage name, class names, inference config,
  checkpoint path.

``instances.image_labels`` (each image's softmax restricted to background and its image-level labels) applies to
the training split only, where those labels are the supervision; on any other split the GT labels would leak
into the scores, so it is switched off there, with a log line and ``"image_labels_applied": false`` in the
metrics.

Metrics JSON: VOC instance AP (mAP25/50/70/75, per class, ``bestie.evaluation.voc``) over the images
with GT, and the **semantic drift** (the share of GT-instance pixels that the network labels background:
the paper's measure of the drift of its semantic branch), plus counts and timing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

from bestie.config import to_dict
from bestie.engine import resolve_device
from bestie.errors import ConfigError
# the stage's library, re-exported for the callers of this module (train_bestie, predict, benchmarks, tests)
from bestie.inference import (  # noqa: F401
    evaluate_model,
    load_bestie_model,
    network_input_size,
    predict_image,
    predict_maps,
    semantic_drift,
)
from bestie.sections import InferenceConfig  # noqa: F401 (the stage's config section)

__all__ = [
    "InferenceConfig",
    "network_input_size",
    "predict_maps",
    "predict_image",
    "semantic_drift",
    "evaluate_model",
    "load_bestie_model",
    "run",
]

log = logging.getLogger(__name__)


def _image_labels_for_split(cfg: InferenceConfig, dataset_cfg: Mapping[str, Any], split: str) -> InferenceConfig:
    """``cfg`` with ``image_labels`` switched off (and logged) unless ``split`` is the dataset's training split."""
    from bestie.data import default_split

    train_split = default_split(dataset_cfg)
    if not cfg.image_labels or split == train_split:
        return cfg
    log.warning("predict_instances %s: instances.image_labels applies to the training split (%s) only; "
                "predicting %s without it", split, train_split, split)
    return dataclasses.replace(cfg, image_labels=False)


def run(
    cfg: InferenceConfig,
    dataset_cfg: Mapping[str, Any],
    split: str,
    checkpoint: str | os.PathLike,
    out_h5: str | os.PathLike,
    out_metrics_json: str | os.PathLike,
    device: str | None = None,
) -> dict[str, Any]:
    """Predict every image of ``split``, write the instances HDF5 and the metrics JSON (both atomically).

    Args:
        cfg: inference settings.
        dataset_cfg: the ``dataset`` config section (see :func:`bestie.data.build_dataset`).
        split: the split to predict.
        checkpoint: a BESTIE checkpoint (:func:`load_bestie_model`).
        out_h5: instances store (module docstring).
        out_metrics_json: metrics (module docstring).
        device: ``"cpu"`` / ``"cuda"`` / None (CUDA when available).

    Returns:
        The metrics dict written to ``out_metrics_json``.

    Raises:
        ArtifactError: unreadable checkpoint.
        ConfigError: the checkpoint's class count differs from the dataset's.
        DataError: from the dataset.
    """
    from bestie.data import build_dataset
    from bestie.io.atomic import write_json_atomic
    from bestie.io.h5store import H5Writer

    dev = resolve_device(device, "predict_instances")
    cfg = _image_labels_for_split(cfg, dataset_cfg, split)
    dataset = build_dataset(dataset_cfg, split)
    model, extra = load_bestie_model(checkpoint, dev)
    if int(model.num_classes) != int(dataset.num_classes):
        raise ConfigError(f"checkpoint {checkpoint} predicts {model.num_classes} classes but dataset split {split!r} "
                          f"has {dataset.num_classes}")
    mean, std = tuple(extra["mean"]), tuple(extra["std"])
    attrs = {
        "stage": "predict_instances",
        "split": split,
        "checkpoint": str(checkpoint),
        "checkpoint_kind": extra.get("kind"),
        "checkpoint_iteration": extra.get("iteration"),
        "class_names": list(dataset.class_names),
        "num_classes": int(dataset.num_classes),
        "inference": to_dict(cfg),
        "arrays": "masks (N,H,W) bool gzip; labels (N,) int64 0-based; scores (N,) float32; highest score first",
    }
    with H5Writer(out_h5, attrs=attrs) as writer:
        metrics = evaluate_model(model, dataset, cfg, dev, mean=mean, std=std, writer=writer, progress=True)
    metrics = {"split": split, "checkpoint": str(checkpoint), "checkpoint_kind": extra.get("kind"),
               "checkpoint_iteration": extra.get("iteration"), "config": to_dict(cfg),
               "class_names": list(dataset.class_names), "image_labels_applied": cfg.image_labels, **metrics}
    write_json_atomic(out_metrics_json, metrics)
    from bestie.report.units import percent

    areas = metrics["median_area_by_source"]
    log.info("predict_instances %s: %d images, %d instances (%s %% from centres; median area %s px from centres, "
             "%s px from the fallback), mAP50 %s, semantic drift %s %%",
             split, metrics["num_images"], metrics["num_instances"], percent(metrics["center_instance_share"]),
             areas["center"], areas["fallback"], percent(metrics["mAP50"]), percent(metrics["semantic_drift"]))
    return metrics
