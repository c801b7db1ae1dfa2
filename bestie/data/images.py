"""Image and label-map readers that never hand back a silently broken array.

Every reader forces a full decode (``Image.load()``), so a truncated or corrupt file fails here with a
:class:`~bestie.errors.DataError` naming the path and the fault, instead of deep inside a training loop.
PIL's process-wide ``ImageFile.LOAD_TRUNCATED_IMAGES`` is set to ``False`` when this module is imported
(PIL's own default), so truncated files are never padded with grey.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Sequence, TypeVar

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from bestie.errors import DataError

__all__ = ["load_rgb", "load_label_png", "unreadable_images", "drop_missing_images", "drop_unreadable_images",
           "image_size"]

ImageFile.LOAD_TRUNCATED_IMAGES = False

# Errors PIL raises on files it cannot decode (truncated data raises OSError, bad headers SyntaxError, ...).
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _open_decoded(path: str | os.PathLike) -> Image.Image:
    """Open ``path`` and decode all of its pixels; errors become :class:`DataError`."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"image file not found: {p}" if not p.exists() else f"not a regular file: {p}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Palette images with Transparency expressed in bytes"
            with Image.open(p) as im:
                im.load()  # full decode: truncated data raises here
                # Keep the first frame only (multi-frame GIF/TIFF); copy so the file can be closed.
                return im.copy()
    except Image.DecompressionBombError as exc:
        raise DataError(f"cannot read image {p}: too large to decode safely ({exc})") from exc
    except _DECODE_ERRORS as exc:
        raise DataError(f"cannot read image {p}: {type(exc).__name__}: {exc}") from exc


def _composite_on_black(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 RGBA -> (H, W, 3) uint8 RGB composited on black (rgb * alpha / 255, rounded)."""
    rgb = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:4].astype(np.uint32)
    return ((rgb * alpha + 127) // 255).astype(np.uint8)


def load_rgb(path: str | os.PathLike, *, exif_transpose: bool = True) -> np.ndarray:
    """Read any image file as an RGB array.

    Conversions (all end in 8-bit RGB):

    - grayscale (``L``, ``1``) and palette (``P``) images are expanded to RGB;
    - images with an alpha channel (``RGBA``, ``LA``, ``PA``, palette with a transparent index) are
      **composited on black** (``rgb * alpha / 255``), so fully transparent pixels become black rather
      than showing whatever colour the encoder left under them;
    - CMYK (e.g. Adobe CMYK JPEGs) and YCbCr/LAB/HSV are converted with PIL's ``convert("RGB")``
      (no ICC colour management);
    - 16-bit grayscale (``I;16*``, ``I``) is scaled to 8 bit by ``round(v / 257)`` (0..65535 -> 0..255);
      float images (``F``) are clipped to 0..255;
    - the EXIF orientation tag is applied (``PIL.ImageOps.exif_transpose``) unless ``exif_transpose`` is
      False, so the array is the image as viewers show it;
    - multi-frame files (GIF, TIFF) give their first frame.

    Args:
        path: image file.
        exif_transpose: apply the EXIF orientation (default True).

    Returns:
        ``(H, W, 3)`` ``uint8`` C-contiguous array, RGB channel order.

    Raises:
        DataError: the file is missing, not an image, truncated or otherwise undecodable; the message
            names the path and the fault.
    """
    im = _open_decoded(path)
    if exif_transpose:
        try:
            im = ImageOps.exif_transpose(im)
        except Exception as exc:  # noqa: BLE001 - a corrupt EXIF block must name the file
            raise DataError(f"cannot apply the EXIF orientation of {path}: {exc}") from exc
    mode = im.mode
    if mode == "P" and "transparency" in im.info:
        arr = _composite_on_black(np.asarray(im.convert("RGBA")))
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        arr = _composite_on_black(np.asarray(im.convert("RGBA")))
    elif mode == "RGB":
        arr = np.asarray(im)
    elif mode.startswith("I;16") or mode == "I":
        v = np.asarray(im).astype(np.int64)
        if v.ndim != 2:
            raise DataError(f"cannot read image {path}: unsupported {mode} array of shape {v.shape}")
        v = np.clip(v, 0, 65535)
        g = ((v * 255 + 32767) // 65535).astype(np.uint8)  # == round(v / 257)
        arr = np.repeat(g[:, :, None], 3, axis=2)
    elif mode == "F":
        g = np.clip(np.nan_to_num(np.asarray(im, dtype=np.float32)), 0, 255)
        arr = np.repeat(np.rint(g).astype(np.uint8)[:, :, None], 3, axis=2)
    else:
        try:
            arr = np.asarray(im.convert("RGB"))
        except (ValueError, OSError) as exc:
            raise DataError(f"cannot read image {path}: cannot convert mode {mode} to RGB ({exc})") from exc
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"cannot read image {path}: decoded to an array of shape {arr.shape}")
    return arr


def unreadable_images(paths: Sequence[str | os.PathLike]) -> list[tuple[Path, str]]:
    """Fully decode each image of ``paths`` (as :func:`load_rgb` does) and report those that fail.

    Used by the datasets' ``skip_bad_images`` option to drop missing, truncated, not-an-image or
    undecodable files up front, before any training starts. Costs one full decode per image.

    Args:
        paths: image files.

    Returns:
        ``[(path, fault), ...]`` in input order for the files that cannot be read; ``fault`` is the
        :class:`DataError` message (it names the path). Empty when all are readable.
    """
    bad: list[tuple[Path, str]] = []
    for p in paths:
        try:
            load_rgb(p)
        except DataError as exc:
            bad.append((Path(p), str(exc)))
    return bad


_Id = TypeVar("_Id")


def drop_missing_images(ids: Sequence[_Id], missing: Sequence[_Id], msg: str, skip: bool,
                        log: logging.Logger) -> list[_Id]:
    """The datasets' ``skip_bad_images`` rule for ids without an image file.

    Args:
        ids: the image ids of the split, in order.
        missing: those of ``ids`` that have no image file.
        msg: the fault, naming the ids and files (the message of the error or of the warning).
        skip: the dataset's ``skip_bad_images``.
        log: the dataset module's logger.

    Returns:
        ``ids`` without ``missing`` (in order), after a warning ``"<msg>; skipping them (skip_bad_images=True)"``.

    Raises:
        DataError: ``msg``, when ``skip`` is False.
    """
    if not skip:
        raise DataError(msg)
    log.warning("%s; skipping them (skip_bad_images=True)", msg)
    drop = set(missing)
    return [i for i in ids if i not in drop]


def drop_unreadable_images(ids: Sequence[_Id], paths: Sequence[Path], source: str, log: logging.Logger) -> list[_Id]:
    """``ids`` without those whose image file cannot be decoded (:func:`unreadable_images`; ``skip_bad_images``).

    Args:
        ids: image ids.
        paths: the image file of each id (same order).
        source: the split list or annotation file, named by the summary warning.
        log: the dataset module's logger: one warning per dropped file, then a summary line.

    Returns:
        The ids whose image decodes, in order (all of them when none fails).
    """
    bad = unreadable_images(paths)
    if not bad:
        return list(ids)
    bad_paths = {p for p, _ in bad}
    for _, fault in bad:
        log.warning("skipping unreadable image (skip_bad_images=True): %s", fault)
    log.warning("%s: skipped %d of %d image(s) that cannot be decoded", source, len(bad), len(ids))
    return [i for i, p in zip(ids, paths) if p not in bad_paths]


def load_label_png(path: str | os.PathLike) -> np.ndarray:
    """Read a label map (VOC ``SegmentationClass`` / ``SegmentationObject`` or a WSSS map) as indices.

    Palette PNGs give their palette **indices** (no palette -> RGB conversion); 8-bit grayscale PNGs give
    their grey values. No EXIF orientation is applied (label maps are stored in pixel order).

    Args:
        path: PNG (or any lossless 8-bit single-channel) file.

    Returns:
        ``(H, W)`` ``uint8`` array of label indices.

    Raises:
        DataError: missing / truncated / not-an-image file, or a mode that does not hold indices
            (RGB colour-coded maps, 16-bit maps); the message names the path and the mode.
    """
    im = _open_decoded(path)
    if im.mode not in ("P", "L"):
        raise DataError(
            f"label map {path} has image mode {im.mode!r}; expected a palette ('P') or 8-bit grayscale "
            f"('L') PNG of class/instance indices"
        )
    arr = np.asarray(im)
    if arr.dtype != np.uint8 or arr.ndim != 2:
        raise DataError(f"label map {path} decoded to {arr.dtype} array of shape {arr.shape}, expected (H, W) uint8")
    return np.ascontiguousarray(arr)


#: EXIF orientations that swap width and height (transpose, rotate 90 / 270, transverse)
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


def image_size(path: str | os.PathLike, *, exif_transpose: bool = True) -> tuple[int, int]:
    """``(height, width)`` of an image file from its header, without decoding the pixels.

    The size is the one :func:`load_rgb` returns (``exif_transpose`` applies the EXIF orientation, which
    swaps height and width for orientations 5-8) or :func:`load_label_png` returns
    (``exif_transpose=False``). Costs one header read (a few kB), not a decode.

    Raises:
        DataError: a missing file or one PIL cannot identify (names the path and the fault).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"image file not found: {p}" if not p.exists() else f"not a regular file: {p}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(p) as im:
                w, h = im.size
                if exif_transpose and im.format in ("JPEG", "MPO", "TIFF", "WEBP", "PNG"):
                    if im.getexif().get(0x0112) in _SWAPPING_ORIENTATIONS:
                        w, h = h, w
    except _DECODE_ERRORS as exc:
        raise DataError(f"cannot read image {p}: {type(exc).__name__}: {exc}") from exc
    return int(h), int(w)
