"""Palette PNGs of label maps: the PASCAL VOC colour map, atomic writing, and the file name of an id.

Label maps are ``(H, W)`` uint8: 0 background, ``c + 1`` class ``c``, 255 ignore / uncertain. The WSSS
stage writes them (``--png-dir``), the import of existing maps (:mod:`bestie.stages.import_wsss`) reads
them back by :func:`png_name`, and the report colours its overlays with :func:`voc_palette`.
"""

from __future__ import annotations

import os
from urllib.parse import quote

import numpy as np

from bestie.errors import ArtifactError, DataError

__all__ = ["voc_palette", "write_palette_png", "png_name"]


def voc_palette() -> np.ndarray:
    """The PASCAL VOC colour map: ``(256, 3)`` uint8, entry ``i`` = the RGB colour of label ``i``.

    Bits 0, 1, 2 of the label go to the most significant free bit of R, G, B in turn (VOC devkit
    ``VOClabelcolormap``); label 255 is (224, 224, 192).
    """
    idx = np.arange(256)
    rgb = np.zeros((256, 3), np.int64)
    for shift in range(8):
        for ch in range(3):
            rgb[:, ch] |= ((idx >> (3 * shift + ch)) & 1) << (7 - shift)
    return rgb.astype(np.uint8)


def write_palette_png(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Write an ``(H, W)`` uint8 label map as a palette PNG with the VOC colours, atomically.

    Raises:
        DataError: ``labels`` is not a 2-D uint8 array.
        ArtifactError: the file cannot be written.
    """
    from PIL import Image

    from bestie.io.atomic import atomic_path

    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise DataError(f"{path}: label map must be (H, W) uint8, got {labels.dtype} {labels.shape}")
    im = Image.fromarray(np.ascontiguousarray(labels))  # mode "L"; putpalette turns it into "P", same indices
    im.putpalette(voc_palette().ravel().tolist())
    try:
        with atomic_path(path) as tmp:
            im.save(tmp, format="PNG")
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot write PNG: {exc}") from exc


def png_name(image_id: str) -> str:
    """File name of an id's PNG: ``<id>.png`` with ``%`` and path separators percent-encoded."""
    return quote(image_id, safe="") + ".png" if ("/" in image_id or "%" in image_id or "\\" in image_id) \
        else image_id + ".png"
