"""Stage 3, own maps: import existing WSSS maps (palette or grayscale PNGs) instead of making them.

The ``import_wsss`` rule runs this when ``wsss.import_png_dir`` is set (``bestie import-wsss``); its store
``results/<run>/wsss/imported.h5`` takes the place of the ``make_wsss`` stage's ``wsss.h5`` for every later
stage. PNG names follow :func:`bestie.io.palette.png_name`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from bestie.data.images import load_label_png
from bestie.errors import DataError
from bestie.io.h5store import H5Writer
from bestie.io.palette import png_name

__all__ = ["run"]

log = logging.getLogger(__name__)

IGNORE = 255


def run(png_dir: Path, dataset, out_h5: Path, strict: bool = False) -> dict[str, int]:
    """Import existing WSSS maps (palette or grayscale PNGs ``<id>.png``) into a WSSS store.

    For users who already have WSSS maps (e.g. the maps the reference code downloads) and skip stage 3.
    Values: 0 background, ``1..C`` class ``c + 1``, 255 ignore/uncertain.

    Validation, per file:

    - a missing file, a size different from the image, or a value outside ``{0, 1..C, 255}`` ->
      :class:`DataError` naming the file and the values (all missing files are listed at once);
    - a class ``1..C`` that is **not in the image label**: those pixels are set to 255 (ignored) with a
      logged warning naming the file, value and pixel count -- the image-level label is the supervision,
      a map disagreeing with it is treated as uncertain there; ``strict=True`` raises DataError instead.

    Args:
        png_dir: folder holding ``<id>.png`` for every id of ``dataset``.
        dataset: the dataset (``ids``, ``num_classes``, ``labels(id)``, ``image_path(id)`` or ``image(id)``).
        out_h5: output store (per id ``wsss`` uint8 ``(H, W)``).
        strict: raise instead of clamping classes absent from the image label.

    Returns:
        ``{"images": n, "clamped_images": m, "clamped_pixels": p}``.

    Raises:
        DataError: as listed above.
    """
    png_dir = Path(png_dir)
    if not png_dir.is_dir():
        raise DataError(f"WSSS PNG folder {png_dir} does not exist")
    paths = {i: png_dir / png_name(i) for i in dataset.ids}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {len(paths)} WSSS map(s) are missing in {png_dir}: "
                        + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
    num_classes = int(dataset.num_classes)
    stats = {"images": 0, "clamped_images": 0, "clamped_pixels": 0}
    with H5Writer(out_h5, attrs={"stage": "wsss", "method": "import", "png_dir": str(png_dir),
                                 "class_names": list(dataset.class_names)}) as writer:
        for img_id, path in paths.items():
            labels = load_label_png(path)
            size = _image_size(dataset, img_id)
            if labels.shape != size:
                raise DataError(f"WSSS map {path} is {labels.shape[1]}x{labels.shape[0]} (WxH) but image {img_id!r} "
                                f"is {size[1]}x{size[0]}")
            values = np.unique(labels)
            bad = [int(v) for v in values if v != IGNORE and v > num_classes]
            if bad:
                raise DataError(f"WSSS map {path} holds value(s) {bad[:10]} outside 0..{num_classes} and 255")
            allowed = {0, IGNORE} | {int(c) + 1 for c in dataset.labels(img_id)}
            absent = [int(v) for v in values if int(v) not in allowed]
            if absent:
                mask = np.isin(labels, absent)
                msg = (f"WSSS map {path} holds class value(s) {absent} (class index + 1) absent from the image "
                       f"label of {img_id!r} {sorted(int(c) for c in dataset.labels(img_id))}")
                if strict:
                    raise DataError(msg)
                log.warning("%s: %d pixel(s) set to 255", msg, int(mask.sum()))
                labels = labels.copy()
                labels[mask] = IGNORE
                stats["clamped_images"] += 1
                stats["clamped_pixels"] += int(mask.sum())
            writer.write(img_id, wsss=np.ascontiguousarray(labels, dtype=np.uint8))
            stats["images"] += 1
    return stats


def _image_size(dataset, img_id: str) -> tuple[int, int]:
    """``(H, W)`` of an image, from the file header when the dataset gives its path (no decoding)."""
    path_fn = getattr(dataset, "image_path", None)
    if path_fn is not None:
        try:
            from PIL import Image

            with Image.open(path_fn(img_id)) as im:
                width, height = im.size
                if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF rotation by 90 deg: load_rgb transposes
                    width, height = height, width
                return height, width
        except Exception:  # noqa: BLE001 - fall back to decoding through the dataset
            pass
    return tuple(dataset.image(img_id).shape[:2])
