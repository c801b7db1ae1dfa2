"""Stage 2: CAMs, peak points and their diagnostics (docs/METHOD.md section 2).

One code path for both classifiers: a PAM checkpoint gives peaky CAMs whose peaks are the instance cues;
a plain CAM checkpoint gives the dense CAMs that the WSSS stage turns into semantic maps.

Per image (the dataset's split, in id order, one image in memory at a time):

1. CAMs of the image's labelled classes at full image resolution (:func:`bestie.cam.compute_cams`:
   scales, flip TTA, normalised by the max); with several checkpoints (an ensemble) the members' CAMs
   averaged and normalised again (:func:`bestie.cam.average_cams`);
2. peaks on those full-resolution CAMs (:func:`bestie.peaks.extract_peaks`), so ``x, y`` are pixels of
   the original image and the 15 px window is the reference's;
3. the CAMs stored at ``out_stride`` (area-averaged, ``ceil(H / s) x ceil(W / s)``) as float16;
4. scoring (images with a ``SegmentationClass`` map): the stored CAMs are upsampled (bilinear) back to the
   image size and turned into a label map for each background threshold ``t`` in 0.05..0.95 (step 0.05):
   ``argmax`` over ``{background = t, CAM_c}`` (a pixel is class ``c`` when its largest CAM is ``> t``);
   one confusion matrix per threshold is accumulated.

Outputs:

- ``out_cams`` (HDF5, :class:`bestie.io.h5store.H5Writer`): per id ``cams`` float16 ``(K, h, w)``,
  ``classes`` int16 ``(K,)``, attr ``image_size = (H, W)``; file attrs: the stage config, ``out_stride``,
  ``use_pam``, ``checkpoint`` (a list for an ensemble), ``class_names``.
- ``out_points`` (HDF5, optional): per id ``points`` float32 ``(N, 4)`` ``x, y, class, conf``.
- ``out_diagnostics`` (JSON): ``classification_mAP`` (percent, ``train`` / ``val`` from the classifier
  checkpoint, the members' mean for an ensemble; ``val`` is None without an ``eval_split``),
  ``miou_per_threshold``, ``best_threshold``, ``best_mIoU`` (percent),
  ``best_IoU`` (per label, background first), baselines ``all_background`` and ``largest_class`` (every
  pixel = the image's present class with the largest GT area), and with points ``peaks``:
  ``instances_one_peak`` (share of GT instances holding exactly one peak of their class with
  conf >= 0.7), ``peaks_on_background`` (share of such peaks on GT background), counts.
- ``out_overlay_dir``: PNG overlays (image + max-over-classes CAM + peaks) of the first ``overlays`` ids.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
import torch

from bestie.config import to_dict
from bestie.engine import resolve_device
from bestie.errors import ArtifactError, ConfigError
from bestie.report.units import percent
from bestie.sections import CamConfig  # noqa: F401 (the stage's config section)

__all__ = ["CamConfig", "run", "THRESHOLDS", "cam_label_map",
           "peak_quality", "load_classifier"]

log = logging.getLogger(__name__)

#: Background thresholds swept by the diagnostics: 0.05, 0.10, ..., 0.95.
THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))
#: Peaks at least this confident are scored (and used for pseudo labels, METHOD.md section 4).
PEAK_SCORE_CONF = 0.7


def cam_label_map(cams: np.ndarray, classes: Sequence[int], threshold: float) -> np.ndarray:
    """Semantic map from CAMs: ``c + 1`` where ``max_k CAM_k > threshold`` (``c`` its class), else 0.

    Args:
        cams: ``(K, H, W)`` float; classes: ``(K,)`` 0-based. Returns ``(H, W)`` uint8 (int64 for > 254
        classes).
    """
    k, height, width = cams.shape
    if k == 0:
        return np.zeros((height, width), np.uint8)
    lut = np.asarray(classes, dtype=np.int64) + 1
    best = cams.argmax(axis=0)
    out = np.where(cams.max(axis=0) > threshold, lut[best], 0)
    return out.astype(np.uint8 if lut.max() < 255 else np.int64)


def peak_quality(points: np.ndarray, instances: Mapping[str, np.ndarray] | None, semantic: np.ndarray | None,
                 min_conf: float = PEAK_SCORE_CONF) -> dict[str, int]:
    """Counts for the peak diagnostics of one image.

    Args:
        points: ``(N, 4)`` ``x, y, class, conf`` in image pixels (the pixel of a point is
            ``(floor(y + 0.5), floor(x + 0.5))``).
        instances: ``{"masks": (M, H, W) bool, "labels": (M,)}`` or None.
        semantic: ``(H, W)`` GT class map (0 background, 255 ignore) or None.
        min_conf: only peaks with ``conf >= min_conf`` count.

    Returns:
        ``{"instances", "instances_one_peak", "peaks", "peaks_on_background"}`` (instance counts only when
        ``instances`` is given; background counts only when ``semantic`` is given).
    """
    pts = points[points[:, 3] >= min_conf] if points.size else np.zeros((0, 4), np.float32)
    out = {"instances": 0, "instances_one_peak": 0, "peaks": 0, "peaks_on_background": 0}
    ref = semantic
    if ref is None and instances is not None and len(instances["masks"]):
        ref = instances["masks"][0]
    if ref is None:
        return out
    height, width = ref.shape[-2:]
    px = np.clip(np.floor(pts[:, 0] + 0.5).astype(np.int64), 0, width - 1)
    py = np.clip(np.floor(pts[:, 1] + 0.5).astype(np.int64), 0, height - 1)
    cls = pts[:, 2].astype(np.int64)
    if instances is not None and len(instances["labels"]):
        masks = np.asarray(instances["masks"], bool)
        inside = masks[:, py, px] & (np.asarray(instances["labels"])[:, None] == cls[None, :])  # (M, N)
        out["instances"] = int(masks.shape[0])
        out["instances_one_peak"] = int((inside.sum(axis=1) == 1).sum())
    if semantic is not None:
        out["peaks"] = int(len(pts))
        out["peaks_on_background"] = int((semantic[py, px] == 0).sum())
    return out


def load_classifier(checkpoint: Path, device: torch.device, output_stride: int | None = None):
    """Model and metadata of a classifier checkpoint written by :mod:`bestie.stages.train_classifier`.

    Args:
        checkpoint: the file.
        device: where to put the model.
        output_stride: rebuild the backbone with this output stride (None: the trained one); the
            weights are the same tensors, only strides / dilations change (the extra convs get dilation
            trained stride / output_stride).

    Raises:
        ConfigError: ``output_stride`` coarser than the trained stride (no such equivalent network).
    Returns:
        ``(model in eval mode on device, extra dict)``.

        ArtifactError: missing / corrupt file, or not a CAM classifier checkpoint (names the file).
    """
    from bestie.engine import read_checkpoint
    from bestie.stages.train_classifier import build_model

    state = read_checkpoint(checkpoint)
    extra = state.get("extra") or {}
    if extra.get("kind") != "cam_classifier" or "config" not in extra or "num_classes" not in extra:
        raise ArtifactError(f"checkpoint {checkpoint} is not a CAM classifier checkpoint (extra.kind="
                            f"{extra.get('kind')!r})")
    config = dict(extra["config"])
    dilation = 1
    if output_stride is not None:
        trained = int(extra.get("stride") or 32)
        if output_stride > trained or trained % output_stride:
            raise ConfigError(f"cams.output_stride {output_stride}: the classifier {checkpoint} was trained at "
                              f"stride {trained}; only a finer stride dividing it can be used")
        config["output_stride"] = output_stride
        dilation = trained // output_stride
    model = build_model(config, int(extra["num_classes"]), load_weights=False, head_dilation=dilation)
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"checkpoint {checkpoint}: model weights do not fit its own config: {exc}") from exc
    return model.to(device, memory_format=torch.channels_last).eval(), extra


def _draw_overlay(image: np.ndarray, cams: np.ndarray, points: np.ndarray | None,
                  class_names: Sequence[str]) -> np.ndarray:
    """BGR uint8 overlay: JET colour map of the max-over-classes CAM blended on the image, peaks as dots."""
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    heat = cams.max(axis=0) if cams.shape[0] else np.zeros(image.shape[:2], np.float32)
    heat = cv2.applyColorMap(np.clip(heat * 255.0, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    out = cv2.addWeighted(bgr, 0.5, heat, 0.5, 0.0)
    if points is not None:
        for x, y, c, conf in points:
            center = (int(round(x)), int(round(y)))
            strong = conf >= PEAK_SCORE_CONF
            cv2.circle(out, center, 6 if strong else 3, (255, 255, 255), -1 if strong else 1, cv2.LINE_AA)
            if strong:
                name = class_names[int(c)] if 0 <= int(c) < len(class_names) else str(int(c))
                cv2.putText(out, f"{name} {conf:.2f}", (center[0] + 7, center[1] - 7), cv2.FONT_HERSHEY_SIMPLEX,
                            0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def run(cfg: CamConfig, dataset_cfg: Mapping[str, Any], checkpoint: Path | Sequence[Path], out_cams: Path,
        out_points: Path | None, out_diagnostics: Path, out_overlay_dir: Path | None,
        device: str | None = None) -> None:
    """Compute and store CAMs (and peak points) of every image of the dataset's split, with diagnostics.

    Args:
        cfg: stage configuration.
        dataset_cfg: the ``dataset`` config section.
        checkpoint: classifier checkpoint (PAM or plain), or a sequence of them: an ensemble
            (``classifier_*.ensemble_seeds``) whose per-model CAMs are averaged by
            :func:`bestie.cam.average_cams` before peaks, storage and scoring.
        out_cams, out_points, out_diagnostics, out_overlay_dir: outputs (module docstring); ``out_points``
            None skips peak extraction, ``out_overlay_dir`` None skips overlays.
        device: ``"cpu"`` / ``"cuda"`` (default: CUDA when available).

    Raises:
        ArtifactError: bad checkpoint, its class count differs from the dataset's, or ensemble members
            differ in classes or in PAM use (names the files).
        DataError: from the dataset.
    """
    from bestie.progress import progress

    from bestie.cam import average_cams, compute_cams, downsample_cams, upsample_cams
    from bestie.data import build_dataset
    from bestie.io.atomic import write_json_atomic
    from bestie.io.h5store import H5Writer
    from bestie.peaks import extract_peaks

    t0 = time.time()
    dev = resolve_device(device, "make_cams")
    paths = [Path(checkpoint)] if isinstance(checkpoint, (str, Path)) else [Path(c) for c in checkpoint]
    if not paths:
        raise ArtifactError("make_cams: no classifier checkpoint given")
    ds = build_dataset(dataset_cfg)
    members, extras = _load_members(paths, ds, dev, cfg.output_stride)
    checkpoint_desc: str | list[str] = str(paths[0]) if len(paths) == 1 else [str(p) for p in paths]
    use_pam = bool(extras[0]["config"].get("use_pam"))
    if out_points is not None and not use_pam:
        log.info("%s is a plain CAM classifier: its peaks are written but METHOD.md takes peaks from PAM",
                 checkpoint_desc)
    scores = _CamScores(ds.num_classes + 1)
    if out_overlay_dir is not None:
        Path(out_overlay_dir).mkdir(parents=True, exist_ok=True)
    attrs = {"stage": "cams", "config": to_dict(cfg), "out_stride": cfg.out_stride, "use_pam": use_pam,
             "checkpoint": checkpoint_desc, "class_names": list(ds.class_names)}
    point_attrs = {"stage": "peaks", "config": to_dict(cfg), "use_pam": use_pam, "checkpoint": checkpoint_desc,
                   "class_names": list(ds.class_names), "columns": ["x", "y", "class", "conf"]}
    with H5Writer(out_cams, attrs=attrs) as wc, \
            (H5Writer(out_points, attrs=point_attrs) if out_points is not None else nullcontext()) as wp:
        for i, img_id in enumerate(progress(ds.ids, desc=f"cams {Path(out_cams).stem}")):
            image = ds.image(img_id)
            height, width = image.shape[:2]
            classes = np.asarray(sorted(set(int(c) for c in ds.labels(img_id))), dtype=np.int64)
            full = average_cams([compute_cams(model, image, classes, mean, std, scales=cfg.scales, flip=cfg.flip,
                                              out_stride=1, device=dev) for model, mean, std in members])
            stored = downsample_cams(full, cfg.out_stride).astype(np.float16)
            wc.write(img_id, cams=stored, classes=classes.astype(np.int16))
            wc.set_attrs(img_id, image_size=(height, width))
            points = None
            if wp is not None:
                points = extract_peaks(full, classes, kernel=cfg.peak_kernel, smooth=3, top_k=cfg.peak_top_k,
                                       threshold=cfg.peak_threshold)
                wp.write(img_id, points=points)
                scores.n_points += len(points)
            gt = ds.semantic_gt(img_id)
            if gt is not None:
                if gt.shape != (height, width):
                    raise ArtifactError(
                        f"dataset: SegmentationClass of {img_id!r} is {gt.shape}, image {(height, width)}")
                scores.update_semantic(upsample_cams(stored, height, width), classes, gt)
            if points is not None:
                scores.update_peaks(points, ds.instances_gt(img_id) if hasattr(ds, "instances_gt") else None, gt)
            if out_overlay_dir is not None and i < cfg.overlays:
                _write_overlay(Path(out_overlay_dir) / f"{i:03d}_{_safe_name(img_id)}.png",
                               _draw_overlay(image, full, points, ds.class_names))
            del full, stored

    diag: dict[str, Any] = {
        "checkpoint": checkpoint_desc,
        "use_pam": use_pam,
        "classification_mAP": {split: _mean_or_none([e.get(f"{split}_mAP") for e in extras])
                               for split in ("train", "val")},
        "config": to_dict(cfg),
        "num_images": len(ds.ids),
        **scores.semantic_diagnostics(),
    }
    if out_points is not None:
        diag["peaks"] = scores.peak_diagnostics(len(ds.ids))
    diag["seconds"] = time.time() - t0
    write_json_atomic(out_diagnostics, diag)
    log.info("cams %s: best mIoU %s at threshold %s (%d images, %.0f s)", out_cams,
             percent(diag["best_mIoU"], fraction=False), diag["best_threshold"], len(ds.ids), diag["seconds"])


def _load_members(paths: Sequence[Path], ds: Any, dev: torch.device,
                  output_stride: int | None) -> tuple[list[tuple[Any, Any, Any]], list[dict[str, Any]]]:
    """Load the ensemble's classifiers: ``[(model, mean, std)]`` and their checkpoint extras.

    Raises:
        ArtifactError: a member's class count differs from the dataset's, or members differ in classes or
            in PAM use (names the files).
    """
    members, extras = [], []
    for path in paths:
        model, extra = load_classifier(path, dev, output_stride)
        if int(extra["num_classes"]) != int(ds.num_classes):
            raise ArtifactError(f"checkpoint {path} has {extra['num_classes']} classes, the dataset "
                                f"{ds.num_classes}")
        if extras and (bool(extra["config"].get("use_pam")) != bool(extras[0]["config"].get("use_pam"))
                       or extra.get("class_names") != extras[0].get("class_names")):
            raise ArtifactError(f"ensemble members {paths[0]} and {path} differ in classes or in PAM use")
        members.append((model, extra.get("mean", model.mean), extra.get("std", model.std)))
        extras.append(extra)
    return members, extras


def _write_overlay(target: Path, overlay: np.ndarray) -> None:
    """Write a BGR overlay PNG atomically (ArtifactError when OpenCV cannot)."""
    from bestie.io.atomic import atomic_path

    with atomic_path(target) as tmp:
        if not cv2.imwrite(tmp, overlay):
            raise ArtifactError(f"cannot write overlay {target}")


class _CamScores:
    """The diagnostics of the stage: CAM mIoU per background threshold (:data:`THRESHOLDS`) against the
    semantic GT, the all-background and largest-class baselines, and the peak quality counts."""

    def __init__(self, n_labels: int) -> None:
        from bestie.evaluation.semantic import SemanticEvaluator

        self.n_labels = n_labels
        self.evals = [SemanticEvaluator(n_labels) for _ in THRESHOLDS]
        self.base_bg, self.base_largest = SemanticEvaluator(n_labels), SemanticEvaluator(n_labels)
        self.pq = {"instances": 0, "instances_one_peak": 0, "peaks": 0, "peaks_on_background": 0}
        self.n_points = 0
        self.n_scored = 0

    def update_semantic(self, scored: np.ndarray, classes: np.ndarray, gt: np.ndarray) -> None:
        """Score one image's stored CAMs ``(K, H, W)`` (upsampled to the image) of ``classes`` against ``gt``."""
        height, width = gt.shape
        if len(classes):  # argmax / max once, then one label map per threshold
            fg = (classes + 1)[scored.argmax(axis=0)]
            peak = scored.max(axis=0)
        else:
            fg = np.zeros((height, width), np.int64)
            peak = np.zeros((height, width), np.float32)
        for t, ev in zip(THRESHOLDS, self.evals):
            ev.update(np.where(peak > t, fg, 0), gt)
        self.base_bg.update(np.zeros_like(gt), gt)
        area = np.bincount(gt[gt != 255].ravel(), minlength=self.n_labels)[1:self.n_labels]
        fill = int(area.argmax()) + 1 if area.max(initial=0) > 0 else 0
        self.base_largest.update(np.full_like(gt, fill), gt)
        self.n_scored += 1

    def update_peaks(self, points: np.ndarray, inst: Any, gt: np.ndarray | None) -> None:
        """Add one image's :func:`peak_quality` counts."""
        for k, v in peak_quality(points, inst, gt).items():
            self.pq[k] += v

    def semantic_diagnostics(self) -> dict[str, Any]:
        """``num_scored``, ``thresholds``, the mIoU per threshold and the best one's figures, the baselines
        (None without scored images) and a ``seconds`` placeholder."""
        diag: dict[str, Any] = {"num_scored": self.n_scored, "thresholds": list(THRESHOLDS),
                                "miou_per_threshold": None, "best_threshold": None, "best_mIoU": None,
                                "best_IoU": None, "baselines": None, "seconds": None}
        if self.n_scored:
            results = [ev.evaluate() for ev in self.evals]
            mious = [r["mIoU"] for r in results]
            best = int(np.nanargmax(np.array([m if m is not None else np.nan for m in mious], dtype=np.float64)))
            diag.update(
                miou_per_threshold=mious,
                best_threshold=THRESHOLDS[best],
                best_mIoU=mious[best],
                best_IoU=results[best]["IoU"],
                best_precision_fg=results[best]["precision_fg"],
                best_recall_fg=results[best]["recall_fg"],
                baselines={"all_background": self.base_bg.evaluate()["mIoU"],
                           "largest_class": self.base_largest.evaluate()["mIoU"]},
            )
        return diag

    def peak_diagnostics(self, num_images: int) -> dict[str, Any]:
        """The ``peaks`` entry of the diagnostics."""
        pq = self.pq
        return {
            "num_points": self.n_points,
            "points_per_image": self.n_points / max(1, num_images),
            "min_conf_scored": PEAK_SCORE_CONF,
            **pq,
            "instances_one_peak_share": pq["instances_one_peak"] / pq["instances"] if pq["instances"] else None,
            "peaks_on_background_share": pq["peaks_on_background"] / pq["peaks"] if pq["peaks"] else None,
        }


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    """Mean of the ensemble members' figures; None when a member lacks it."""
    return None if any(v is None for v in values) else float(np.mean(values))


def _safe_name(image_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in image_id)[:80]
