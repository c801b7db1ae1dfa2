"""Class activation maps with flip / multi-scale test-time augmentation (docs/METHOD.md section 2).

For one image and scale ``s``: the image is resized (bilinear) to ``round(s * H) x round(s * W)``,
normalised, and passed through the classifier together with its left-right mirror; ``CAM_c =
relu(class map c)`` is upsampled (bilinear, ``align_corners=False``) to the output size, the mirror's CAM is
flipped back and the two are averaged. CAMs of all scales are summed and each class map is divided by its
spatial maximum + 1e-5, so values lie in ``[0, 1)`` (reference: BESTIE ``PAM/models/classifier.py``
``cam_normalize``; IRN ``make_cam.py`` for the multi-scale sum).
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from bestie.errors import DataError

__all__ = ["compute_cams", "average_cams", "normalize_image", "cam_output_size", "downsample_cams", "upsample_cams"]


def cam_output_size(height: int, width: int, out_stride: int = 1) -> tuple[int, int]:
    """Size ``(h, w)`` of CAMs at ``out_stride`` for an ``height x width`` image: ``ceil(H / s), ceil(W / s)``.

    CAM pixel ``(i, j)`` covers image pixels ``[i*s, (i+1)*s)`` (its centre maps to image coordinate
    ``(i + 0.5) * H / h - 0.5``).
    """
    if out_stride < 1:
        raise ValueError(f"out_stride must be >= 1, got {out_stride}")
    return -(-int(height) // out_stride), -(-int(width) // out_stride)


def downsample_cams(cams: np.ndarray, out_stride: int) -> np.ndarray:
    """``(K, H, W)`` CAMs -> ``(K, ceil(H/s), ceil(W/s))`` by area averaging (OpenCV ``INTER_AREA``)."""
    k, height, width = cams.shape
    h, w = cam_output_size(height, width, out_stride)
    if (h, w) == (height, width) or k == 0:
        return np.zeros((0, h, w), cams.dtype) if k == 0 else cams
    return _resize_stack(cams, h, w, cv2.INTER_AREA)


def upsample_cams(cams: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(K, h, w)`` CAMs -> ``(K, height, width)`` float32, bilinear with half-pixel centres."""
    cams = np.asarray(cams, dtype=np.float32)
    if cams.shape[1:] == (height, width) or cams.shape[0] == 0:
        return cams if cams.shape[0] else np.zeros((0, height, width), np.float32)
    return _resize_stack(cams, height, width, cv2.INTER_LINEAR)


def _resize_stack(cams: np.ndarray, h: int, w: int, interp: int) -> np.ndarray:
    """``(K, h0, w0)`` maps -> ``(K, h, w)`` float32 with OpenCV interpolation ``interp``, in channel chunks."""
    out = np.empty((cams.shape[0], h, w), np.float32)
    # OpenCV handles at most 512 channels per call; OpenCV 5's INTER_AREA at a non-integer scale at most 4
    # (the assertion "cn <= 4" in resize), so area averaging goes 4 channels at a time
    step = 4 if interp == cv2.INTER_AREA else 512
    for s in range(0, cams.shape[0], step):
        chunk = np.ascontiguousarray(cams[s:s + step].astype(np.float32).transpose(1, 2, 0))
        r = cv2.resize(chunk, (w, h), interpolation=interp)
        out[s:s + step] = r.reshape(h, w, -1).transpose(2, 0, 1)
    return out


def normalize_image(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """HxWx3 uint8 RGB -> ``(3, H, W)`` float32 tensor ``(image / 255 - mean) / std``."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


def _class_maps(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, dict):
        out = out["cams"]
    return out


@torch.no_grad()
def compute_cams(
    model: torch.nn.Module,
    image: np.ndarray,
    classes: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    scales: Sequence[float] = (1.0,),
    flip: bool = True,
    out_stride: int = 1,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """CAMs of the given classes for one image.

    Args:
        model: in eval mode; ``model(x)`` for ``x`` ``(B, 3, h, w)`` returns ``(B, C, h', w')`` class maps or
            a dict holding them under ``"cams"`` (:class:`~bestie.models.classifier.CAMClassifier`).
        image: ``(H, W, 3)`` uint8 RGB.
        classes: ``K`` 0-based class indices (channels of the class maps) to return, in this order.
        mean, std: RGB normalisation for inputs in ``[0, 1]`` (of the backbone weights).
        scales: image scale factors; CAMs of all scales are summed before normalisation.
        flip: average each scale's CAM with the flipped-back CAM of the mirrored image.
        out_stride: output size is :func:`cam_output_size` ``(H, W, out_stride)``; 1 = image size.
        device: where the model runs.

    Returns:
        ``(K, h, w)`` float32 in ``[0, 1)``, each map divided by its own maximum + 1e-5 (a map that is 0
        everywhere stays 0). ``K = 0`` gives an empty ``(0, h, w)`` array without running the model.

    Raises:
        DataError: ``image`` is not HxWx3 uint8, or a class index is outside the model's classes.
        ValueError: empty / non-positive ``scales`` or ``out_stride < 1``.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"compute_cams: expected an HxWx3 uint8 image, got {getattr(image, 'shape', None)} "
                        f"{getattr(image, 'dtype', type(image).__name__)}")
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"compute_cams: scales must be positive, got {scales}")
    height, width = image.shape[:2]
    out_h, out_w = cam_output_size(height, width, out_stride)
    idx = [int(c) for c in classes]
    if not idx:
        return np.zeros((0, out_h, out_w), np.float32)
    device = torch.device(device)
    total = torch.zeros((len(idx), out_h, out_w), dtype=torch.float32, device=device)
    for scale in scales:
        h_s, w_s = max(1, round(height * scale)), max(1, round(width * scale))
        img = image if (h_s, w_s) == (height, width) else cv2.resize(image, (w_s, h_s), interpolation=cv2.INTER_LINEAR)
        x = normalize_image(img, mean, std).unsqueeze(0)
        if flip:
            x = torch.cat([x, x.flip(-1)], dim=0)
        maps = _class_maps(model, x.to(device).contiguous(memory_format=torch.channels_last)).float()
        if max(idx) >= maps.shape[1] or min(idx) < 0:
            raise DataError(f"compute_cams: class indices {idx} outside the model's {maps.shape[1]} classes")
        maps = torch.relu(maps[:, idx])
        maps = F.interpolate(maps, size=(out_h, out_w), mode="bilinear", align_corners=False)
        if flip:
            total += 0.5 * (maps[0] + maps[1].flip(-1))
        else:
            total += maps[0]
    total /= total.amax(dim=(1, 2), keepdim=True) + 1e-5
    return total.cpu().numpy().astype(np.float32, copy=False)


def average_cams(cams: Sequence[np.ndarray]) -> np.ndarray:
    """CAMs of an ensemble: the members' max-normalised CAMs summed and divided again by the maximum.

    Each member's map counts equally whatever the scale of its logits (the IRN multi-scale sum, taken over
    models instead of scales). One member is returned unchanged. Not in the BESTIE paper: our dense
    classifier's seed noise on small data is the reason (``ClassifierConfig.ensemble_seeds``).

    Args:
        cams: ``M >= 1`` arrays ``(K, h, w)`` float32 in ``[0, 1)`` of the same image and classes
            (:func:`compute_cams` outputs).

    Returns:
        ``(K, h, w)`` float32 in ``[0, 1)``, each map divided by its maximum + 1e-5.

    Raises:
        ValueError: no member, or members of different shapes.
    """
    if not len(cams):
        raise ValueError("average_cams: no CAMs to average")
    if len({c.shape for c in cams}) != 1:
        raise ValueError(f"average_cams: members differ in shape: {[c.shape for c in cams]}")
    if len(cams) == 1:
        return cams[0]
    total = np.sum(np.stack(cams).astype(np.float32, copy=False), axis=0)
    if total.shape[0]:
        total /= total.reshape(total.shape[0], -1).max(axis=1)[:, None, None] + 1e-5
    return total
