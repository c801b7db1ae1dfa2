"""Instance masks for new images from a trained checkpoint (``bestie predict MODEL IMAGES... --out DIR``).

MODEL is any checkpoint the pipeline writes: a BESTIE model (``results/<run>/bestie/model.pt`` or
``model.best.pt``) or a Mask R-CNN (``results/<run>/maskrcnn/model.pt``). The checkpoint carries what
prediction needs, so no config is read:

- Mask R-CNN (``extra["kind"] == "maskrcnn"``): ``model_spec`` (architecture, input size; the model
  normalises its own input), ``class_names``, ``category_ids`` and ``inference`` (``score_threshold``,
  ``mask_threshold``, ``max_dets``), written by :mod:`bestie.stages.train_maskrcnn`;
- BESTIE (``extra["model_config"]``): ``model_config``, ``mean``, ``std``, ``class_names``,
  ``category_ids`` and ``inference`` (an :class:`~bestie.stages.predict_instances.InferenceConfig` dict),
  written by :mod:`bestie.stages.train_bestie`.

A missing key is an :class:`~bestie.errors.ArtifactError` naming it. :class:`PredictConfig` (flags of the
command) overrides the score threshold, flip test-time augmentation, working size, batch size and device.

Inputs: files, folders (their regular, non-hidden files, sorted; not recursive) and glob patterns
(``**`` recursive). A file that cannot be decoded as an image (not an image, truncated, ...) is skipped
with one warning and counted; an input set without any file, or in which no file is readable, is a
:class:`~bestie.errors.DataError`.

Memory bound: an image whose longer side exceeds ``max_side`` is downscaled (area interpolation) to
that side before the network; instances are predicted at this working size and each mask is resized
back to the original size (bilinear on the mask, threshold 0.5; Mask R-CNN: on its probability, at its
``mask_threshold``) one at a time, only to be RLE-encoded. Peak memory is then set by ``max_side``
(network, maps, working-size masks) plus the decoded image and one full-size mask, not by the image size:
a 4000 x 3000 photo costs 36 MB of pixels and 12 MB per mask in flight. The default cap, 1333 px, is
the longest side of the standard COCO Mask R-CNN input (torchvision, Detectron2): images up to it (VOC,
COCO: 500-640 px) are predicted exactly as ``bestie evaluate`` (Mask R-CNN) and ``bestie
predict-instances`` (BESTIE, with the checkpoint's ``inference`` settings, ``resize`` included) predict
them, so the figures agree; a lower cap trades mask detail for memory and time.

Outputs in ``out_dir`` (each written atomically):

- ``predictions.json``: the COCO *results* list that pycocotools ``COCO.loadRes`` and Detectron2's
  ``coco_instances_results.json`` use: ``image_id``, ``category_id`` (the dataset's ids, e.g. COCO's 90 =
  toothbrush), ``bbox`` ``[x, y, w, h]`` pixels, ``score``, ``segmentation`` compressed RLE (``counts``
  str), all in original image pixels;
- ``images.json``: the sidecar that makes the results usable without a GT file, a COCO dataset with
  ``images`` (``id``, ``file_name`` = the input path, ``height``, ``width``, ``overlay``), the
  ``categories`` (``id``, ``name``, ``supercategory``) and no annotations:
  ``COCO("images.json").loadRes("predictions.json")``;
- ``overlays/<stem>.png``: the image (at the working size; small images enlarged) with each instance
  scoring at least ``overlay_threshold`` (or, when none does, the ``overlay_top_k`` best, so a weak
  model's overlay is not blank): mask, outline, class name and score
  (:func:`bestie.report.figures.overlay_panel`); a repeated stem gets ``_2``, ``_3``, ...;
- ``summary.json``: counts (inputs, predicted, skipped with their faults, instances), the checkpoint,
  the settings used and the time.

Image ids are ``1..N`` over the readable images in input order, or, with ``ids_from`` (a COCO dataset JSON such as
``instances_train.json``), the ids of that file's images of the same file (base) name, so that the
results score against that file directly (``COCOeval``).
"""

from __future__ import annotations

import glob
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
import torch

from bestie.engine import resolve_device
from bestie.errors import ArtifactError, ConfigError, DataError
from bestie.sections import PredictConfig  # noqa: F401 (the stage's config section)

__all__ = ["PredictConfig", "expand_inputs", "load_predictor", "working_size", "run"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- inputs
def expand_inputs(specs: Sequence[str | os.PathLike]) -> list[Path]:
    """The files named by ``specs``: files as given, folders' regular non-hidden files (sorted, not
    recursive), glob patterns' matching files (sorted; ``**`` recursive). Duplicates are dropped (first
    kept).

    Raises:
        DataError: no file at all (every spec named), e.g. an empty folder or a pattern matching nothing.
    """
    out: list[Path] = []
    seen: set[str] = set()
    empty: list[str] = []
    for spec in specs:
        p = Path(spec)
        if p.is_file():
            found = [p]
        elif p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith("."))
        else:
            found = sorted(Path(q) for q in glob.glob(os.fspath(spec), recursive=True) if Path(q).is_file())
        if not found:
            empty.append(os.fspath(spec))
            log.warning("predict: %s matches no file", spec)
        for q in found:
            key = os.path.realpath(q)
            if key not in seen:
                seen.add(key)
                out.append(q)
    if not out:
        raise DataError(f"predict: no input image: {', '.join(repr(s) for s in empty) or 'no input given'} "
                        "name no file (give image files, folders or glob patterns)")
    return out


def working_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """``(h, w)`` at which an ``height x width`` image is predicted: unchanged when its longer side is at
    most ``max_side``, else scaled (aspect kept, rounded, at least 1 px) so that the longer side is
    ``max_side``."""
    if max(height, width) <= max_side:
        return height, width
    s = max_side / max(height, width)
    return max(1, round(height * s)), max(1, round(width * s))


# -------------------------------------------------------------------------------------- checkpoints
def _require(extra: Mapping[str, Any], keys: Sequence[str], path: Path, kind: str, writer: str) -> None:
    missing = [k for k in keys if k not in extra]
    if missing:
        raise ArtifactError(
            f"checkpoint {path}: {kind} checkpoint without {', '.join(repr(k) for k in missing)} in its extra "
            f"data (written by {writer} of this version); retrain, or add the key(s) to the checkpoint"
        )


def _check_classes(path: Path, n_model: int, class_names: Sequence[str], cat_ids: Sequence[int]) -> None:
    if len(class_names) != n_model or len(cat_ids) != n_model:
        raise ArtifactError(
            f"checkpoint {path}: class count mismatch: the network predicts {n_model} classes, but the checkpoint "
            f"lists {len(class_names)} class names and {len(cat_ids)} category ids"
        )
    if len(set(int(c) for c in cat_ids)) != len(cat_ids):
        raise ArtifactError(f"checkpoint {path}: duplicate category ids {list(cat_ids)}")


class _Predictor:
    """One loaded model: ``predict(images) -> [instances at the working size]`` (see :func:`load_predictor`)."""

    kind: str
    class_names: list[str]
    category_ids: list[int]
    max_side: int
    settings: dict[str, Any]

    def predict(self, images: Sequence[np.ndarray]) -> list[dict[str, Any]]:  # pragma: no cover - abstract
        raise NotImplementedError


class _MaskRCNNPredictor(_Predictor):
    kind = "maskrcnn"

    def __init__(self, path: Path, extra: Mapping[str, Any], state: Mapping[str, Any], cfg: PredictConfig,
                 device: torch.device) -> None:
        from bestie.maskrcnn_inference import load_maskrcnn

        _require(extra, ("model_spec", "class_names", "category_ids", "inference"), path, "Mask R-CNN",
                 "bestie train-maskrcnn")
        spec = dict(extra["model_spec"])
        names, cats = list(extra["class_names"]), [int(c) for c in extra["category_ids"]]
        n = int(spec.get("num_classes", -1))
        w = state["model"].get("roi_heads.box_predictor.cls_score.weight")
        if w is not None and int(w.shape[0]) != n + 1:
            raise ArtifactError(f"checkpoint {path}: class count mismatch: its box predictor has {int(w.shape[0]) - 1} "
                                f"classes but model_spec.num_classes is {n}")
        _check_classes(path, n, names, cats)
        inf = dict(extra["inference"])
        _require(inf, ("score_threshold", "mask_threshold", "max_dets"), path, "Mask R-CNN 'inference'",
                 "bestie train-maskrcnn")
        self.score_threshold = float(inf["score_threshold"] if cfg.score_threshold is None else cfg.score_threshold)
        self.mask_threshold = float(inf["mask_threshold"])
        self.max_dets = int(inf["max_dets"])
        self.flip = bool(cfg.flip) if cfg.flip is not None else False
        self.model, _ = load_maskrcnn(path, score_threshold=self.score_threshold, max_dets=self.max_dets)
        self.model.to(device)
        self.device = device
        self.class_names, self.category_ids = names, cats
        self.max_side = int(cfg.max_side)
        self.settings = {"score_threshold": self.score_threshold, "mask_threshold": self.mask_threshold,
                         "max_dets": self.max_dets, "flip": self.flip, "max_side": self.max_side,
                         "architecture": spec.get("name")}

    @torch.inference_mode()
    def predict(self, images: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        """Instances of each image: ``masks`` ``(N, h, w)`` float32 probabilities, ``labels`` 0-based,
        ``scores``, by descending score, ``N <= max_dets``, scores ``>= score_threshold``."""
        from torchvision.ops import batched_nms

        xs = [torch.tensor(np.ascontiguousarray(im), device=self.device).permute(2, 0, 1).float().div_(255.0)
              for im in images]
        n = len(xs)
        outs = self.model(xs + [x.flip(-1) for x in xs] if self.flip else xs)
        result = []
        for i in range(n):
            out = outs[i]
            boxes, scores, labels, probs = out["boxes"], out["scores"].float(), out["labels"], out["masks"][:, 0]
            if self.flip:
                o2 = outs[n + i]
                w = xs[i].shape[-1]
                b2 = o2["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1.0, -1.0, 1.0], device=self.device)
                b2[:, [0, 2]] += w
                boxes = torch.cat([boxes, b2])
                scores = torch.cat([scores, o2["scores"].float()])
                labels = torch.cat([labels, o2["labels"]])
                probs = torch.cat([probs, o2["masks"][:, 0].flip(-1)])
                keep = batched_nms(boxes, scores, labels, float(self.model.roi_heads.nms_thresh))
                scores, labels, probs = scores[keep], labels[keep], probs[keep]
            # as bestie.stages.evaluate.predict_image: score filter, stable descending order, max_dets
            keep = torch.nonzero(scores >= self.score_threshold).flatten()
            keep = keep[torch.argsort(scores[keep], descending=True, stable=True)][: self.max_dets]
            outs[i] = None  # drop the reference to this image's full mask stack once it is consumed
            if self.flip:
                outs[n + i] = None
            result.append({"masks": probs[keep].float().cpu().numpy(),
                           "labels": (labels[keep] - 1).cpu().numpy().astype(np.int64),
                           "scores": scores[keep].cpu().numpy().astype(np.float32),
                           "threshold": self.mask_threshold})
        return result


class _BestiePredictor(_Predictor):
    kind = "bestie"

    def __init__(self, path: Path, extra: Mapping[str, Any], cfg: PredictConfig, device: torch.device) -> None:
        from bestie.config import from_dict, to_dict
        from bestie.inference import load_bestie_model
        from bestie.sections import InferenceConfig

        _require(extra, ("model_config", "mean", "std", "class_names", "category_ids", "inference"),
                 path, "BESTIE", "bestie train-bestie")
        names, cats = list(extra["class_names"]), [int(c) for c in extra["category_ids"]]
        _check_classes(path, int(extra["model_config"].get("num_classes", -1)), names, cats)
        inf = dict(extra["inference"])
        if cfg.flip is not None:
            inf["flip"] = bool(cfg.flip)
        try:
            self.inference = from_dict(InferenceConfig, inf, "inference")
        except ConfigError as exc:
            raise ArtifactError(f"checkpoint {path}: bad 'inference' settings: {exc}") from exc
        self.model, info = load_bestie_model(path, device)
        self.mean, self.std = tuple(info["mean"]), tuple(info["std"])
        self.device = device
        self.class_names, self.category_ids = names, cats
        self.score_threshold = float(cfg.score_threshold or 0.0)
        self.max_side = int(cfg.max_side)
        self.settings = {"score_threshold": self.score_threshold, "max_side": self.max_side,
                         "inference": to_dict(self.inference)}

    def predict(self, images: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        """Instances of each image: ``masks`` ``(N, h, w)`` bool, ``labels`` 0-based, ``scores``, by
        descending score (:func:`bestie.stages.predict_instances.predict_image`), scores ``>= score_threshold``."""
        from bestie.inference import predict_image

        out = []
        for im in images:
            inst = predict_image(self.model, im, self.mean, self.std, self.inference, self.device)
            keep = inst["scores"] >= self.score_threshold
            out.append({"masks": inst["masks"][keep], "labels": inst["labels"][keep],
                        "scores": inst["scores"][keep], "threshold": None})
        return out


def load_predictor(checkpoint: str | os.PathLike, cfg: PredictConfig, device: str | None = None) -> _Predictor:
    """Load a BESTIE or Mask R-CNN checkpoint of this pipeline for prediction.

    Returns:
        An object with ``kind`` (``"maskrcnn"`` / ``"bestie"``), ``class_names``, ``category_ids``,
        ``max_side`` (working size cap, pixels), ``settings`` (dict) and ``predict(images)``: for a list of
        ``(h, w, 3)`` uint8 images, a list of ``{"masks": (N, h, w), "labels": (N,) int64 0-based,
        "scores": (N,) float32, "threshold": float or None}`` (Mask R-CNN masks are probabilities to be
        compared with ``threshold``; BESTIE masks are bool and ``threshold`` is None).

    Raises:
        ArtifactError: a missing/corrupt file, a checkpoint that is not one of this pipeline's BESTIE or
            Mask R-CNN checkpoints (e.g. a classifier, a partial training state, a foreign state dict), a
            missing key, or a class-count mismatch (names the file and the key).
        ConfigError: a bad or unavailable device.
    """
    from bestie.engine import read_checkpoint

    path = Path(checkpoint)
    dev = resolve_device(device, "predict")
    state = read_checkpoint(path)
    extra = dict(state.get("extra") or {})
    kind = extra.get("kind")
    if kind == "maskrcnn":
        return _MaskRCNNPredictor(path, extra, state, cfg, dev)
    if "model_config" in extra:
        if kind == "partial":
            raise ArtifactError(f"checkpoint {path}: a partial (resumable) BESTIE training state; predict with the "
                                "finished model.pt or model.best.pt")
        return _BestiePredictor(path, extra, cfg, dev)
    raise ArtifactError(
        f"checkpoint {path}: not a BESTIE or Mask R-CNN checkpoint of this pipeline (kind {kind!r}, extra keys "
        f"{sorted(extra)[:8]}); give results/<run>/bestie/model.pt, model.best.pt or results/<run>/maskrcnn/model.pt"
    )


# ------------------------------------------------------------------------------------------- output
def _full_size_mask(mask: np.ndarray, threshold: float | None, size: tuple[int, int]) -> np.ndarray:
    """One working-size mask (bool, or probability with ``threshold``) as an ``(H, W)`` bool mask."""
    h, w = mask.shape
    if (h, w) == size:
        return mask > threshold if threshold is not None else mask.astype(bool)
    src = mask.astype(np.float32)
    up = cv2.resize(src, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return up > (threshold if threshold is not None else 0.5)


def _ids_from(path: str | os.PathLike, files: Sequence[Path], class_names: Sequence[str],
              cat_ids: Sequence[int]) -> list[int]:
    """Image ids of ``files`` in the COCO dataset JSON ``path`` (matched by base name); its categories
    must hold each of the model's ids with the model's class name."""
    import json

    p = Path(path)
    try:
        data = json.loads(p.read_text())
        images, categories = data["images"], data.get("categories", [])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{p}: not a readable COCO dataset JSON with 'images': {exc}") from exc
    by_name: dict[str, int] = {}
    for im in images:
        name = os.path.basename(str(im["file_name"]))
        if name in by_name:
            raise DataError(f"{p}: file name {name!r} appears twice; image ids cannot be matched by name")
        by_name[name] = int(im["id"])
    cats = {int(c["id"]): str(c["name"]) for c in categories}
    wrong = [(c, n, cats.get(c)) for c, n in zip(cat_ids, class_names) if cats.get(c) != n]
    if wrong:
        raise DataError(f"{p}: categories do not match the model's (id, model name, file name): {wrong[:5]}")
    missing = [f.name for f in files if f.name not in by_name]
    if missing:
        raise DataError(f"{p}: no image named {missing[:5]} ({len(missing)} input file(s) not listed)")
    return [by_name[f.name] for f in files]


def overlay_selection(scores: np.ndarray, threshold: float, top_k: int) -> np.ndarray:
    """Which instances an overlay draws: those scoring at least ``threshold``, else the ``top_k`` best.

    Args:
        scores: ``(N,)`` float instance scores.
        threshold: the overlay threshold (``overlay_threshold``).
        top_k: how many of the best to draw when no score reaches ``threshold``.

    Returns:
        ``(N,)`` bool selection.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    show = scores >= threshold
    if not show.any() and scores.size:
        show[np.argsort(-scores, kind="stable")[:top_k]] = True
    return show


def _overlay_name(path: Path, used: set[str]) -> str:
    stem, k = path.stem, 1
    name = f"{stem}.png"
    while name in used:
        k += 1
        name = f"{stem}_{k}.png"
    used.add(name)
    return name


def _progress(items: Sequence[Any], desc: str):
    # A bar on a terminal only; log files get plain lines with rate and ETA (bestie.progress), plus the
    # instance counts of run().
    from bestie.progress import progress

    return progress(items, desc=desc)


def run(
    cfg: PredictConfig,
    checkpoint: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    device: str | None = None,
) -> dict[str, Any]:
    """Predict the images of ``inputs`` with ``checkpoint`` and write the outputs of the module docstring.

    Args:
        cfg: settings (``images`` and ``model`` are not used here; the workflow resolves them to
            ``inputs`` and ``checkpoint``).
        checkpoint: a BESTIE or Mask R-CNN checkpoint (:func:`load_predictor`).
        inputs: image files, folders and glob patterns (:func:`expand_inputs`).
        out_dir: output folder (created).
        device: ``cpu``, ``cuda``, ``cuda:N`` or None (CUDA when available).

    Returns:
        The summary written to ``summary.json``: ``{"checkpoint", "model", "num_inputs", "num_images",
        "num_skipped", "skipped": [{"path", "fault"}], "num_instances", "settings", "seconds",
        "outputs"}``.

    Raises:
        DataError: no input file, no readable image, or ``ids_from`` not matching the inputs / classes.
        ArtifactError: an unusable checkpoint (see :func:`load_predictor`), or an output not writable.
        ConfigError: a bad device.
    """
    from bestie.data.images import load_rgb
    from bestie.io.atomic import write_json_atomic
    from bestie.io.coco_json import write_coco_dataset, write_coco_results

    t0 = time.time()
    out = Path(out_dir)
    files = expand_inputs(inputs)
    predictor = load_predictor(checkpoint, cfg, device)
    if cfg.batch_size > 1 and predictor.kind == "bestie":
        log.info("predict: BESTIE groups each image on its own; batch_size %d is not used", cfg.batch_size)
    ids = _ids_from(cfg.ids_from, files, predictor.class_names, predictor.category_ids) if cfg.ids_from else None
    overlay_dir = out / "overlays"
    overlay_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    used: set[str] = set()
    log_every = max(1, math.ceil(len(files) / 10))

    def flush(batch: list[tuple[int, Path, np.ndarray, tuple[int, int]]]) -> None:
        _predict_batch(predictor, cfg, batch, overlay_dir, used, results, images)

    batch: list[tuple[int, Path, np.ndarray, tuple[int, int]]] = []
    for n, path in enumerate(_progress(files, "predict"), start=1):
        try:
            image = load_rgb(path)
        except DataError as exc:
            log.warning("predict: skipped %s", exc)
            skipped.append({"path": os.fspath(path), "fault": str(exc)})
            continue
        image_id = ids[n - 1] if ids is not None else n - len(skipped)
        size = image.shape[:2]
        h, w = working_size(size[0], size[1], predictor.max_side)
        work = image if (h, w) == size else cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        del image
        batch.append((image_id, path, work, (int(size[0]), int(size[1]))))
        if len(batch) >= (cfg.batch_size if predictor.kind == "maskrcnn" else 1):
            flush(batch)
            batch = []
        if n % log_every == 0 or n == len(files):
            log.info("predict: %d/%d files, %d instances so far", n, len(files), len(results))
    if batch:
        flush(batch)
    if not images:
        raise DataError(f"predict: none of the {len(files)} input file(s) is a readable image "
                        f"(first fault: {skipped[0]['fault'] if skipped else 'none'})")
    categories = [{"id": c, "name": nme, "supercategory": ""}
                  for c, nme in zip(predictor.category_ids, predictor.class_names)]
    info = {"description": "images predicted by bestie predict; results in predictions.json",
            "checkpoint": os.fspath(checkpoint), "model": predictor.kind}
    write_coco_results(out / "predictions.json", results)
    write_coco_dataset(out / "images.json", images, [], categories, info=info)
    summary = {
        "checkpoint": os.fspath(checkpoint),
        "model": predictor.kind,
        "num_inputs": len(files),
        "num_images": len(images),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "num_instances": len(results),
        "settings": {**predictor.settings, "batch_size": cfg.batch_size, "ids_from": cfg.ids_from,
                     "overlay_threshold": cfg.overlay_threshold if cfg.overlays else None,
                     "overlay_top_k": cfg.overlay_top_k if cfg.overlays else None,
                     "device": str(getattr(predictor, "device", device))},
        "seconds": round(time.time() - t0, 3),
        "outputs": {"predictions": os.fspath(out / "predictions.json"), "images": os.fspath(out / "images.json"),
                    "overlays": os.fspath(overlay_dir) if cfg.overlays else None},
    }
    write_json_atomic(out / "summary.json", summary)
    log.info("predict: %d images, %d instances, %d file(s) skipped -> %s", len(images), len(results), len(skipped), out)
    return summary


def _predict_batch(predictor: Any, cfg: PredictConfig, batch: list[tuple[int, Path, np.ndarray, tuple[int, int]]],
                   overlay_dir: Path, used: set[str], results: list[dict[str, Any]],
                   images: list[dict[str, Any]]) -> None:
    """Predict one batch of ``(image_id, path, working image HxWx3 uint8, original (H, W))`` and append its
    COCO results (masks at the original size) to ``results`` and its image records to ``images``; with
    ``cfg.overlays`` write each image's overlay PNG into ``overlay_dir`` (names unique within ``used``)."""
    from bestie.io.atomic import atomic_write
    from bestie.io.coco_json import instances_to_coco_results
    from bestie.report.figures import overlay_panel, png_bytes

    cat_of = predictor.category_ids.__getitem__
    preds = predictor.predict([b[2] for b in batch])
    for (image_id, path, work, size), inst in zip(batch, preds):
        for k in range(len(inst["labels"])):
            full = _full_size_mask(inst["masks"][k], inst["threshold"], size)
            one = {"masks": full[None], "labels": inst["labels"][k:k + 1], "scores": inst["scores"][k:k + 1]}
            results.extend(instances_to_coco_results(image_id, one, cat_of))
        rec = {"id": image_id, "file_name": os.fspath(path), "height": size[0], "width": size[1]}
        if cfg.overlays:
            show = overlay_selection(inst["scores"], cfg.overlay_threshold, cfg.overlay_top_k)
            masks = inst["masks"][show]
            masks = masks if inst["threshold"] is None else masks > inst["threshold"]
            panel = overlay_panel(work, {"masks": masks, "labels": inst["labels"][show],
                                         "scores": inst["scores"][show]}, None, predictor.class_names)
            name = _overlay_name(path, used)
            with atomic_write(overlay_dir / name) as fh:
                fh.write(png_bytes(panel))
            rec["overlay"] = f"overlays/{name}"
        images.append(rec)
