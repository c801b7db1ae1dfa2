"""Mask R-CNN inference: a trained detector rebuilt from its checkpoint, and its instances on one image.

Used by the ``evaluate`` stage and ``bestie predict``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from bestie.errors import ArtifactError, DataError
from bestie.sections import EvalConfig

__all__ = ["load_maskrcnn", "predict_image"]


def load_maskrcnn(
    checkpoint: str | os.PathLike, *, score_threshold: float = EvalConfig.score_threshold, max_dets: int = EvalConfig.max_dets
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a Mask R-CNN from a checkpoint of :mod:`bestie.stages.train_maskrcnn`.

    Returns:
        ``(model in eval mode on the CPU, extra)`` with ``extra`` the checkpoint's metadata
        (``model_spec``, ``class_names``, ``category_ids``, ...).

    Raises:
        ArtifactError: missing/corrupt file, not a Mask R-CNN checkpoint, or weights that do not fit.
    """
    from bestie.engine import read_checkpoint
    from bestie.models.maskrcnn import build_maskrcnn

    state = read_checkpoint(checkpoint)
    extra = dict(state.get("extra") or {})
    if extra.get("kind") != "maskrcnn" or "model_spec" not in extra:
        raise ArtifactError(f"{checkpoint}: not a Mask R-CNN checkpoint of bestie train-maskrcnn (kind {extra.get('kind')!r})")
    spec = dict(extra["model_spec"])
    spec.update(box_score_thresh=float(score_threshold), box_detections_per_img=int(max_dets))
    model = build_maskrcnn(**spec, weights=None, warn_random=False)
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"checkpoint {checkpoint} does not fit its model spec {spec}: {exc}") from exc
    model.eval()
    return model, extra


@torch.inference_mode()
def predict_image(
    model: torch.nn.Module, image: np.ndarray, device: torch.device | str, *,
    score_threshold: float = EvalConfig.score_threshold, mask_threshold: float = EvalConfig.mask_threshold, max_dets: int = EvalConfig.max_dets,
) -> dict[str, np.ndarray]:
    """Mask R-CNN instances of one image.

    Args:
        model: a torchvision ``MaskRCNN`` in eval mode on ``device``.
        image: ``(H, W, 3)`` uint8 RGB.

    Returns:
        ``{"masks": (N, H, W) bool, "labels": (N,) int64 0-based, "scores": (N,) float32}``, by
        descending score, ``N <= max_dets``, all scores ``>= score_threshold``.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"predict_image: expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    x = torch.tensor(np.ascontiguousarray(image), device=device).permute(2, 0, 1).float().div_(255.0)
    out = model([x])[0]
    scores = out["scores"].float()
    keep = torch.nonzero(scores >= score_threshold).flatten()
    keep = keep[torch.argsort(scores[keep], descending=True, stable=True)][:max_dets]
    masks = out["masks"][keep, 0] > mask_threshold
    return {
        "masks": masks.cpu().numpy(),
        "labels": (out["labels"][keep] - 1).cpu().numpy().astype(np.int64),
        "scores": scores[keep].cpu().numpy().astype(np.float32),
    }
