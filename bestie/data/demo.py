"""Deterministic synthetic dataset in PASCAL VOC layout (the embedded demo data of the workflow).

Three classes (:data:`DEMO_CLASSES`): textured discs, rotated squares and rotated triangles on a
textured background. Each class has its own hue range and texture (discs: red-orange with concentric
rings; squares: green with stripes; triangles: blue with a checker pattern) so a small CNN learns the
classes from image-level labels in minutes on a CPU. Every image holds 1 to 4 instances, later ones
painted over earlier ones (so they sometimes overlap); each instance keeps at least 40 % of its area and
80 visible pixels outside the boundary band.

Files (ids ``demo_0001``, ``demo_0002``, ...; the first ``num_train`` are the train split, the next
``num_val`` the val split, ``trainval`` is both)::

    JPEGImages/<id>.jpg                 RGB JPEG, quality 95
    Annotations/<id>.xml                VOC XML: size, objects (name, 1-based bndbox of the visible part)
    SegmentationClass/<id>.png          palette PNG (VOC palette): 0 bg, 1..3 class, 255 boundary band
    SegmentationObject/<id>.png         palette PNG: 0 bg, 1..N instance (paint order), 255 boundary band
    ImageSets/Segmentation/{train,val,trainval}.txt
    demo.json                           the generation parameters, written last

The 255 band follows VOC: about 3 px wide around every object boundary (1 px outside, 2 px inside),
the same pixels in both maps; every instance keeps pixels outside it.

Run ``python -m bestie.data.demo --root DIR`` or call :func:`generate_demo_dataset`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Sequence
from xml.sax.saxutils import escape

import cv2
import numpy as np
from PIL import Image

from bestie.errors import ConfigError
from bestie.data.points import _atomic_write_bytes

__all__ = ["DEMO_CLASSES", "generate_demo_dataset", "voc_palette", "save_palette_png", "main"]

DEMO_CLASSES: tuple[str, ...] = ("disc", "square", "triangle")

#: Bumped whenever the generator's output changes, so older demo folders are regenerated.
GENERATOR_VERSION = 1

_ID_RE = re.compile(r"^demo_\d{4,}$")
_DIRS = ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationObject")
# Per-class hue range (degrees) of the object colour.
_HUES = {0: (0.0, 30.0), 1: (95.0, 145.0), 2: (205.0, 245.0)}


def voc_palette() -> np.ndarray:
    """The PASCAL VOC colour map: ``(256, 3)`` ``uint8``; entry ``i`` spreads the bits of ``i`` over
    the high bits of R, G, B (0 black, 1 dark red, ..., 255 = (224, 224, 192))."""
    idx = np.arange(256)
    pal = np.zeros((256, 3), dtype=np.int64)
    c = idx.copy()
    for j in range(8):
        for ch in range(3):
            pal[:, ch] |= ((c >> ch) & 1) << (7 - j)
        c >>= 3
    return pal.astype(np.uint8)


_PALETTE_BYTES = voc_palette().ravel().tobytes()


def save_palette_png(path: str | os.PathLike, indices: np.ndarray) -> None:
    """Write an ``(H, W)`` ``uint8`` index map as a palette PNG with the VOC palette, atomically."""
    arr = np.ascontiguousarray(indices, dtype=np.uint8)
    if arr.ndim != 2:
        raise ValueError(f"save_palette_png: expected an (H, W) map, got shape {arr.shape}")
    im = Image.frombytes("P", (arr.shape[1], arr.shape[0]), arr.tobytes())
    im.putpalette(_PALETTE_BYTES)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    _atomic_write_bytes(path, buf.getvalue())


def _hsv_to_rgb(h_deg: float, s: float, v: float) -> np.ndarray:
    px = np.array([[[h_deg, s, v]]], dtype=np.float32)
    return cv2.cvtColor(px, cv2.COLOR_HSV2RGB)[0, 0] * 255.0  # (3,) float in 0..255


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Low-saturation gradient + smooth blotches + pixel noise, float32 (H, W, 3) in 0..255."""
    c1 = rng.uniform(70, 180) + rng.uniform(-22, 22, size=3)
    c2 = rng.uniform(70, 180) + rng.uniform(-22, 22, size=3)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (xx - w / 2) * math.cos(theta) + (yy - h / 2) * math.sin(theta)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c1[None, None, :] * (1 - t[..., None]) + c2[None, None, :] * t[..., None]
    blot = rng.normal(0, 1, size=(5, 5, 3)).astype(np.float32)
    img += 14.0 * cv2.resize(blot, (w, h), interpolation=cv2.INTER_CUBIC)
    img += rng.normal(0, 7, size=(h, w, 3))
    return img.astype(np.float32)


def _shape_mask(rng: np.random.Generator, cls: int, h: int, w: int) -> np.ndarray:
    """Random disc / rotated square / rotated triangle, fully inside the image, (H, W) bool."""
    s = rng.uniform(0.11, 0.2) * min(h, w)  # radius / half side, px
    ext = s * (1.25 if cls == 2 else (1.42 if cls == 1 else 1.0))  # circumradius
    cx = rng.uniform(ext, w - 1 - ext)
    cy = rng.uniform(ext, h - 1 - ext)
    mask = np.zeros((h, w), dtype=np.uint8)
    if cls == 0:
        cv2.circle(mask, (int(round(cx)), int(round(cy))), int(round(s)), 1, thickness=-1, lineType=cv2.LINE_8)
    else:
        n = 4 if cls == 1 else 3
        r = s * math.sqrt(2) if cls == 1 else s * 1.25
        phi = rng.uniform(0, 2 * math.pi)
        ang = phi + 2 * math.pi * np.arange(n) / n
        pts = np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], axis=1)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1, lineType=cv2.LINE_8)
    return mask.astype(bool)


def _texture(rng: np.random.Generator, cls: int, h: int, w: int, mask: np.ndarray) -> np.ndarray:
    """Class-specific coloured texture, float32 (H, W, 3) in 0..255 (only meaningful under ``mask``)."""
    hue = rng.uniform(*_HUES[cls])
    base = _hsv_to_rgb(hue, rng.uniform(0.6, 0.9), rng.uniform(0.6, 0.95))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if cls == 0:  # concentric rings around the mask centroid
        ys, xs = np.nonzero(mask)
        d = np.hypot(yy - ys.mean(), xx - xs.mean())
        pattern = np.sin(d * (2 * math.pi / rng.uniform(4.0, 6.0)))
    elif cls == 1:  # straight stripes
        th = rng.uniform(0, math.pi)
        pattern = np.sin((xx * math.cos(th) + yy * math.sin(th)) * (2 * math.pi / rng.uniform(4.0, 7.0)))
    else:  # checker pattern
        cell = rng.uniform(3.0, 5.0)
        pattern = np.where((np.floor(xx / cell) + np.floor(yy / cell)) % 2 == 0, 1.0, -1.0).astype(np.float32)
    tex = base[None, None, :] * (1.0 + 0.22 * pattern[..., None])
    tex += rng.normal(0, 6, size=(h, w, 3))
    return tex.astype(np.float32)


def _band(obj: np.ndarray) -> np.ndarray:
    """VOC-like boundary band of an instance map: 1 px outside, 2 px inside every boundary."""
    k3 = np.ones((3, 3), np.uint8)
    k5 = np.ones((5, 5), np.uint8)
    edge3 = cv2.dilate(obj, k3) != cv2.erode(obj, k3)
    edge5 = cv2.dilate(obj, k5) != cv2.erode(obj, k5)
    return edge3 | ((obj > 0) & edge5)


def _make_image(
    rng: np.random.Generator, h: int, w: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int], np.ndarray]:
    """One sample: image (H, W, 3) uint8; object and class maps (H, W) uint8 with the 255 band;
    instance classes (0-based, paint order); the object map without the band."""
    img = _background(rng, h, w)
    n_target = int(rng.integers(1, 5))
    obj = np.zeros((h, w), dtype=np.uint8)
    masks: list[np.ndarray] = []
    classes: list[int] = []
    for _ in range(n_target):
        cls = int(rng.integers(len(DEMO_CLASSES)))
        for _attempt in range(30):
            m = _shape_mask(rng, cls, h, w)
            trial = obj.copy()
            trial[m] = len(masks) + 1
            band = _band(trial)
            all_masks = masks + [m]
            ok = True
            for k, mk in enumerate(all_masks, start=1):
                vis = int(((trial == k) & ~band).sum())
                if vis < 80 or (trial == k).sum() < 0.4 * mk.sum():
                    ok = False
                    break
            if ok:
                obj = trial
                masks.append(m)
                classes.append(cls)
                img = np.where(m[..., None], _texture(rng, cls, h, w, m), img)
                break
    band = _band(obj)
    cls_lut = np.zeros(256, dtype=np.uint8)
    cls_lut[1 : len(classes) + 1] = np.asarray(classes, dtype=np.uint8) + 1
    cls_map = cls_lut[obj]
    obj_out = obj.copy()
    obj_out[band] = 255
    cls_map[band] = 255
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return image, obj_out, cls_map, classes, obj


def _xml(img_id: str, h: int, w: int, obj: np.ndarray, classes: Sequence[int]) -> bytes:
    lines = [
        "<annotation>",
        "  <folder>BESTIE-demo</folder>",
        f"  <filename>{escape(img_id)}.jpg</filename>",
        f"  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>",
        "  <segmented>1</segmented>",
    ]
    for k, cls in enumerate(classes, start=1):
        ys, xs = np.nonzero(obj == k)
        lines.append(
            f"  <object><name>{DEMO_CLASSES[cls]}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>0</difficult><bndbox><xmin>{xs.min() + 1}</xmin><ymin>{ys.min() + 1}</ymin>"
            f"<xmax>{xs.max() + 1}</xmax><ymax>{ys.max() + 1}</ymax></bndbox></object>"
        )
    lines.append("</annotation>\n")
    return "\n".join(lines).encode("utf-8")


def _params(num_train: int, num_val: int, image_size: tuple[int, int], seed: int) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "classes": list(DEMO_CLASSES),
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": [int(image_size[0]), int(image_size[1])],
        "seed": int(seed),
    }


def _ids(n: int) -> list[str]:
    return [f"demo_{i:04d}" for i in range(1, n + 1)]


def _is_complete(root: Path, params: dict) -> bool:
    meta = root / "demo.json"
    try:
        if json.loads(meta.read_text(encoding="utf-8")) != params:
            return False
    except (OSError, ValueError):
        return False
    ids = _ids(params["num_train"] + params["num_val"])
    sets = root / "ImageSets" / "Segmentation"
    if not all((sets / f"{s}.txt").is_file() for s in ("train", "val", "trainval")):
        return False
    exts = {"JPEGImages": ".jpg", "Annotations": ".xml", "SegmentationClass": ".png", "SegmentationObject": ".png"}
    for d, ext in exts.items():
        try:
            present = set(os.listdir(root / d))
        except OSError:
            return False
        if any(f"{i}{ext}" not in present for i in ids):
            return False
    return True


def generate_demo_dataset(
    root: str | os.PathLike,
    num_train: int = 48,
    num_val: int = 16,
    image_size: tuple[int, int] = (160, 160),
    seed: int = 0,
) -> Path:
    """Create (or keep) the synthetic VOC-layout demo dataset under ``root``.

    Deterministic: image ``i`` is drawn from ``numpy.random.default_rng([seed, i])`` alone, so the same
    parameters give byte-identical label PNGs and XML (and identical JPEGs with the same libjpeg).
    Idempotent: when ``root/demo.json`` records the same parameters and every file is present, nothing is
    written. Otherwise ``demo.json`` is removed first, all files are (re)written atomically, demo files
    of ids no longer in the set are deleted, and ``demo.json`` is written last.

    Args:
        root: output directory (created).
        num_train, num_val: image counts of the train and val splits (``num_train >= 1``, ``num_val >= 0``).
        image_size: ``(height, width)`` in pixels, each at least 64.
        seed: generation seed.

    Returns:
        ``Path(root)``.

    Raises:
        ConfigError: invalid counts or size.
    """
    root = Path(root)
    if int(num_train) < 1 or int(num_val) < 0:
        raise ConfigError(f"demo dataset: need num_train >= 1 and num_val >= 0, got {num_train}, {num_val}")
    h, w = (int(image_size[0]), int(image_size[1]))
    if h < 64 or w < 64:
        raise ConfigError(f"demo dataset: image_size (height, width) must be at least 64 px, got {image_size}")
    params = _params(num_train, num_val, (h, w), seed)
    if _is_complete(root, params):
        return root
    meta = root / "demo.json"
    meta.unlink(missing_ok=True)
    for d in _DIRS:
        (root / d).mkdir(parents=True, exist_ok=True)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    ids = _ids(num_train + num_val)
    for index, img_id in enumerate(ids, start=1):
        rng = np.random.default_rng([int(seed), index])
        image, obj_map, cls_map, classes, obj_raw = _make_image(rng, h, w)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
        _atomic_write_bytes(root / "JPEGImages" / f"{img_id}.jpg", buf.getvalue())
        save_palette_png(root / "SegmentationClass" / f"{img_id}.png", cls_map)
        save_palette_png(root / "SegmentationObject" / f"{img_id}.png", obj_map)
        _atomic_write_bytes(root / "Annotations" / f"{img_id}.xml", _xml(img_id, h, w, obj_raw, classes))
    keep = set(ids)
    for d in _DIRS:  # remove demo files of a former, larger set
        for name in os.listdir(root / d):
            stem = os.path.splitext(name)[0]
            if _ID_RE.match(stem) and stem not in keep:
                (root / d / name).unlink()
    train, val = ids[:num_train], ids[num_train:]
    for name, lst in (("train", train), ("val", val), ("trainval", ids)):
        _atomic_write_bytes(sets / f"{name}.txt", "".join(f"{i}\n" for i in lst).encode("utf-8"))
    _atomic_write_bytes(meta, (json.dumps(params, indent=2) + "\n").encode("utf-8"))
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m bestie.data.demo --root DIR [--num-train N] [--num-val N] [--size H W] [--seed S]``."""
    ap = argparse.ArgumentParser(prog="python -m bestie.data.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="output directory")
    ap.add_argument("--num-train", type=int, default=48)
    ap.add_argument("--num-val", type=int, default=16)
    ap.add_argument("--size", type=int, nargs=2, default=(160, 160), metavar=("H", "W"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        out = generate_demo_dataset(args.root, args.num_train, args.num_val, tuple(args.size), args.seed)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
