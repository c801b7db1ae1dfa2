"""BESTIE inference: the trained network on images, its instances, and their scores against GT masks.

METHOD.md section 4, "Inference": softmax semantic probabilities (optionally averaged with those of the
flipped image), class-wise center heatmaps and offsets; :func:`bestie.postprocess.get_instances` groups
the pixels of each predicted class component around the predicted centers (the
:class:`~bestie.params.GroupingParams` of the ``instances`` section).

Input size policy (:class:`InferenceConfig`): the image is optionally resized so that its long side is
``resize`` pixels, then resized to the next multiple of ``size_divisor`` (32, as the public code) on each
side; the network's maps are upsampled straight to the original image size (offsets rescaled to original
pixels by :class:`bestie.models.instance.BestieNet`), so instances are in original pixels. With ``resize``
the grouping's pixel sizes (NMS window 41, ``min_area``, clustering) stay those of the network input: they are
scaled by :func:`grouping_scale` (= original long side / ``resize``), as the paper's grouping runs at the
scale its network was trained at.

Flip test-time augmentation: the image and its mirror image form one batch of 2; semantic probabilities,
centers and ``dy`` are averaged with the mirrored maps of the flipped branch; ``dx`` of the flipped branch
is negated before averaging (a leftward offset in the mirror image is a rightward one in the image).

Used by the ``predict_instances`` stage, the in-training validation of ``train_bestie`` and ``bestie predict``.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from bestie.data import transforms as T
from bestie.errors import ArtifactError, ConfigError, DataError
from bestie.sections import InferenceConfig

__all__ = ["network_input_size", "grouping_scale", "predict_maps", "predict_image", "semantic_drift", "evaluate_model",
           "load_bestie_model"]


def network_input_size(height: int, width: int, cfg: InferenceConfig) -> tuple[int, int]:
    """``(h, w)`` of the network input for an ``height x width`` image (see the module docstring)."""
    scale = 1.0 if cfg.resize is None else cfg.resize / max(height, width)
    d = cfg.size_divisor
    h = max(d, int(math.ceil(round(height * scale) / d)) * d)
    w = max(d, int(math.ceil(round(width * scale) / d)) * d)
    return h, w


@torch.no_grad()
def predict_maps(
    model: torch.nn.Module,
    image: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    cfg: InferenceConfig,
    device: str | torch.device,
    labels: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Network maps of one image at its original size.

    Args:
        model: a :class:`~bestie.models.instance.BestieNet` (put in eval mode by the caller).
        image: ``(H, W, 3)`` uint8 RGB.
        mean, std: the encoder's RGB normalisation (inputs in [0, 1]).
        cfg: input size policy and flip.
        device: where to run.
        labels: 0-based classes of the image-level label, or None: when given, the softmax runs over
            background and these classes only (the others get probability 0; ``instances.image_labels``).

    Returns:
        ``{"seg_prob": (C+1, H, W), "center": (C, H, W), "offset": (2, H, W)}`` float32 tensors on
        ``device``: softmax probabilities, center heatmaps, offsets ``(dy, dx)`` in original pixels
        (flip-averaged when ``cfg.flip``).

    Raises:
        DataError: ``image`` is not ``(H, W, 3)`` uint8.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise DataError(f"predict_maps: expected an (H, W, 3) uint8 image, got {desc}")
    H, W = image.shape[:2]
    h, w = network_input_size(H, W, cfg)
    src = image if (h, w) == (H, W) else cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    x = torch.from_numpy(T.normalize(src, mean, std)).unsqueeze(0).to(device)
    if cfg.flip:
        x = torch.cat([x, x.flip(-1)], dim=0)
    out = model(x, output_size=(H, W))
    prob = F.softmax(_restrict_to_labels(out["seg"].float(), labels), dim=1)
    center = out["center"].float()
    offset = out["offset"].float()
    if cfg.flip:
        prob = 0.5 * (prob[0] + prob[1].flip(-1))
        center = 0.5 * (center[0] + center[1].flip(-1))
        off_f = offset[1].flip(-1)
        off_f = torch.stack([off_f[0], -off_f[1]])
        offset = 0.5 * (offset[0] + off_f)
    else:
        prob, center, offset = prob[0], center[0], offset[0]
    return {"seg_prob": prob, "center": center, "offset": offset}


def _restrict_to_labels(logits: torch.Tensor, labels: Sequence[int] | None) -> torch.Tensor:
    """``(N, C+1, H, W)`` logits with the classes outside ``labels`` (and background) set to ``-inf``;
    unchanged for ``labels`` None or empty."""
    if labels is None or len(labels) == 0:
        return logits
    keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    keep[0] = True
    keep[torch.as_tensor([int(c) + 1 for c in labels], dtype=torch.long, device=logits.device)] = True
    return logits.masked_fill(~keep.view(1, -1, 1, 1), float("-inf"))


def predict_image(
    model: torch.nn.Module,
    image: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    cfg: InferenceConfig,
    device: str | torch.device,
) -> dict[str, np.ndarray]:
    """Instances of one image (METHOD.md section 4, "Inference").

    Args: as :func:`predict_maps`.

    Returns:
        ``{"masks": (N, H, W) bool, "labels": (N,) int64 0-based, "scores": (N,) float32, "sources": (N,)
        int8}`` in original pixels, highest score first, from :func:`bestie.postprocess.get_instances`
        (``sources``: :data:`bestie.postprocess.SOURCE_CENTER` / ``SOURCE_CLUSTER`` / ``SOURCE_FALLBACK``).
    """
    maps = predict_maps(model, image, mean, std, cfg, device)
    return _instances_from_maps(maps, cfg)


def grouping_scale(image_size: tuple[int, int], cfg: InferenceConfig) -> float:
    """How many times larger than the network's input scale an ``(H, W)`` image is: ``max(H, W) / cfg.resize``,
    or 1 without ``resize``. The grouping's pixel sizes (NMS window, ``min_area``, clustering) are those of the
    network input and are scaled by it (:func:`bestie.postprocess.scaled_grouping`)."""
    return 1.0 if cfg.resize is None else max(image_size) / float(cfg.resize)


def _instances_from_maps(maps: Mapping[str, torch.Tensor], cfg: InferenceConfig) -> dict[str, np.ndarray]:
    from bestie.postprocess import get_instances

    inst = get_instances(maps["seg_prob"], maps["center"], maps["offset"], params=cfg.grouping_params(),
                         return_sources=True, scale=grouping_scale(tuple(maps["seg_prob"].shape[-2:]), cfg))
    masks = np.asarray(inst["masks"], dtype=bool)
    labels = np.asarray(inst["labels"], dtype=np.int64).reshape(-1)
    scores = np.asarray(inst["scores"], dtype=np.float32).reshape(-1)
    sources = np.asarray(inst["sources"], dtype=np.int8).reshape(-1)
    if masks.ndim != 3:
        masks = masks.reshape((0,) + tuple(maps["seg_prob"].shape[-2:]))
    order = np.argsort(-scores, kind="stable")
    return {"masks": masks[order], "labels": labels[order], "scores": scores[order], "sources": sources[order]}


def semantic_drift(semantic_pred: np.ndarray, gt_masks: np.ndarray) -> tuple[int, int]:
    """Pixels of GT instances that the semantic prediction labels background (the paper's semantic drift).

    Args:
        semantic_pred: ``(H, W)`` integer argmax map (0 = background, ``c + 1`` = class ``c``).
        gt_masks: ``(N, H, W)`` bool GT instance masks.

    Returns:
        ``(n_background, n_instance)``: GT-instance pixels (union of the masks) predicted background, and
        all GT-instance pixels. The drift is ``n_background / n_instance``.

    Raises:
        DataError: the shapes disagree.
    """
    sem = np.asarray(semantic_pred)
    masks = np.asarray(gt_masks, dtype=bool)
    if masks.ndim != 3 or sem.shape != masks.shape[1:]:
        raise DataError(f"semantic_drift: prediction {sem.shape} and GT masks {masks.shape} disagree")
    union = masks.any(axis=0)
    return int(np.count_nonzero(union & (sem == 0))), int(np.count_nonzero(union))


def evaluate_model(
    model: torch.nn.Module,
    dataset: Any,
    cfg: InferenceConfig,
    device: str | torch.device,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    ids: Iterable[str] | None = None,
    writer: Any = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Predict images of ``dataset``, optionally store them, and score them against GT masks.

    Args:
        model: the network (switched to eval mode here, its previous mode restored at the end).
        dataset: a ``bestie.data`` dataset (``ids``, ``num_classes``, ``image``, ``instances_gt``).
        cfg: inference settings (with ``cfg.image_labels`` each image's softmax is restricted to
            ``dataset.labels(id)``, :func:`predict_maps`).
        device: where to run.
        mean, std: encoder normalisation.
        ids: the images to predict (default: all of the dataset).
        writer: an open :class:`~bestie.io.h5store.H5Writer` to store the instances in, or None.
        progress: show progress (:func:`bestie.progress.progress`: a bar on a terminal, log lines otherwise).

    Returns:
        ``{"num_images", "num_images_with_gt", "num_instances", "mAP25", "mAP50", "mAP70", "mAP75"
        (None without GT), "voc": the evaluator's full result or None, "semantic_drift": float or None,
        "semantic_drift_pixels": [background, total], "seconds_per_image", "instances_by_source":
        {"center", "cluster", "fallback"} counts, "median_area_by_source", "center_instance_share": see
        :func:`instance_source_summary`}``.
    """
    from bestie.evaluation.voc import VOCInstanceEvaluator
    from bestie.progress import progress as progress_bar

    evaluator = VOCInstanceEvaluator(int(dataset.num_classes))
    id_list = list(dataset.ids if ids is None else ids)
    drift_bg = drift_total = 0
    n_gt = n_inst = 0
    sources: list[np.ndarray] = []  # per image: (N,) int8 source of each instance
    areas: list[np.ndarray] = []  # per image: (N,) int64 mask area in pixels
    was_training = model.training
    model.eval()
    t0 = time.time()
    try:
        for img_id in progress_bar(id_list, desc="predict", disable=not progress):
            image = dataset.image(img_id)
            labels = dataset.labels(img_id) if cfg.image_labels else None
            maps = predict_maps(model, image, mean, std, cfg, device, labels)
            inst = _instances_from_maps(maps, cfg)
            n_inst += int(inst["labels"].shape[0])
            sources.append(inst["sources"])
            areas.append(inst["masks"].sum(axis=(-2, -1)).reshape(-1))
            if writer is not None:
                writer.write(img_id, masks=inst["masks"], labels=inst["labels"], scores=inst["scores"])
                writer.set_attrs(img_id, image_size=tuple(image.shape[:2]))
            gt = dataset.instances_gt(img_id)
            if gt is None:
                continue
            n_gt += 1
            evaluator.update(inst, gt)
            sem = maps["seg_prob"].argmax(0).cpu().numpy()
            bg, tot = semantic_drift(sem, gt["masks"])
            drift_bg += bg
            drift_total += tot
    finally:
        model.train(was_training)
    seconds = time.time() - t0
    result: dict[str, Any] = {
        "num_images": len(id_list),
        "num_images_with_gt": n_gt,
        "num_instances": n_inst,
        "seconds_per_image": seconds / max(1, len(id_list)),
    }
    voc = evaluator.evaluate() if n_gt else None
    for key in ("mAP25", "mAP50", "mAP70", "mAP75"):
        result[key] = voc.get(key) if voc else None
    result["voc"] = voc
    result["semantic_drift"] = drift_bg / drift_total if drift_total else None
    result["semantic_drift_pixels"] = [drift_bg, drift_total]
    result.update(instance_source_summary(np.concatenate(sources) if sources else np.zeros(0, np.int8),
                                          np.concatenate(areas) if areas else np.zeros(0, np.int64)))
    return result


def instance_source_summary(sources: np.ndarray, areas: np.ndarray) -> dict[str, Any]:
    """Count predicted instances by where they came from, with the median mask area of each kind.

    The share from centres alone can mislead: on coco128-voc most fallback instances are small fragments of the
    semantic map that score below the export threshold, while the instances from centres are whole objects or
    merged WSSS blobs (docs/RESULTS.md, 2026-12-07 session 15). The areas tell the two apart.

    Args:
        sources: ``(N,)`` integer source of each instance: :data:`bestie.postprocess.SOURCE_CENTER` (0),
            ``SOURCE_CLUSTER`` (1) or ``SOURCE_FALLBACK`` (2).
        areas: ``(N,)`` mask area of each instance in pixels (of the image it was predicted on).

    Returns:
        ``{"instances_by_source": {"center", "cluster", "fallback"}: int counts,
        "median_area_by_source": the same keys: median area in pixels (float) or None where there is none,
        "center_instance_share": share in [0, 1] of instances not from the centre-less fallback (None for N = 0)}``.

    Raises:
        DataError: ``sources`` and ``areas`` differ in length, or a source is not 0, 1 or 2.
    """
    from bestie.postprocess import SOURCE_CENTER, SOURCE_CLUSTER, SOURCE_FALLBACK

    sources = np.asarray(sources).reshape(-1)
    areas = np.asarray(areas).reshape(-1)
    if sources.shape != areas.shape:
        raise DataError(f"instance_source_summary: {sources.size} sources but {areas.size} areas")
    names = {"center": SOURCE_CENTER, "cluster": SOURCE_CLUSTER, "fallback": SOURCE_FALLBACK}
    if not np.isin(sources, list(names.values())).all():
        unknown = sorted(set(sources.tolist()) - set(names.values()))
        raise DataError(f"instance_source_summary: unknown source values {unknown} (expected 0, 1 or 2)")
    counts = {k: int((sources == v).sum()) for k, v in names.items()}
    medians = {k: (float(np.median(areas[sources == v])) if counts[k] else None) for k, v in names.items()}
    n = int(sources.size)
    return {"instances_by_source": counts, "median_area_by_source": medians,
            # the share of predicted instances the center head made (NMS or clustered centers, not the fallback)
            "center_instance_share": (counts["center"] + counts["cluster"]) / n if n else None}


def load_bestie_model(
    checkpoint: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict]:
    """Rebuild the BESTIE network of a checkpoint written by :mod:`bestie.stages.train_bestie`.

    Returns:
        ``(model in eval mode on device, extra)``: ``extra`` holds ``model_config``, ``mean``, ``std``,
        ``class_names``, ``kind`` (``"last"`` / ``"best"`` / ``"partial"``), ``iteration``, ...

    Raises:
        ArtifactError: unreadable checkpoint, one without the BESTIE model description, or weights that do
            not fit (names the file).
    """
    from bestie.engine import read_checkpoint
    from bestie.models.instance import build_bestie_net

    path = Path(checkpoint)
    state = read_checkpoint(path)
    extra = dict(state.get("extra") or {})
    if "model_config" not in extra:
        raise ArtifactError(f"checkpoint {path}: no 'model_config' in its extra data; not a BESTIE model checkpoint")
    try:
        model = build_bestie_net(extra["model_config"])
    except ConfigError as exc:
        raise ArtifactError(f"checkpoint {path}: bad model_config: {exc}") from exc
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"checkpoint {path}: weights do not fit the described model: {exc}") from exc
    extra.setdefault("mean", list(model.mean))
    extra.setdefault("std", list(model.std))
    extra["iteration"] = int(state.get("iteration", 0))
    return model.to(device).eval(), extra
