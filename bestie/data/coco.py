"""COCO-layout datasets (instances JSON + an image folder), read with pycocotools.

Class indices are contiguous and 0-based over the **sorted** category ids of the annotation file
(``cat_ids[k]`` is class ``k``), so COCO's ids 1..90 with gaps map to 0..79.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import unicodedata
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from bestie.errors import DataError
from bestie.data.images import drop_missing_images, drop_unreadable_images, load_rgb

__all__ = ["COCODataset"]

log = logging.getLogger(__name__)

_MAX_LISTED = 10


class COCODataset:
    """Images, image-level labels and GT instances of a COCO instances annotation file.

    Args:
        ann_file: COCO instances JSON (``images``, ``annotations``, ``categories``).
        image_dir: folder holding the images' ``file_name`` paths.
        skip_bad_images: drop images whose file is missing, truncated, not an image or otherwise
            undecodable, with a logged warning naming each file, instead of raising (every image is then
            decoded once at construction). Off, a missing file raises here and an undecodable one raises
            :class:`DataError` naming the file when it is read.

    Attributes:
        ids: image ids as strings, sorted by numeric COCO id.
        cat_ids: sorted COCO category ids; class index ``k`` is ``cat_ids[k]``.
        class_names: category names in class-index order.
        coco: the ``pycocotools.coco.COCO`` object (for ``COCOeval``).

    Raises:
        DataError: missing / unparsable annotation file; missing ``images`` / ``categories``; an
            annotation whose image or category id is unknown; duplicate image / category ids; missing
            image files (unless ``skip_bad_images``); a missing image folder. Messages name the file.
    """

    def __init__(
        self, ann_file: str | os.PathLike, image_dir: str | os.PathLike, skip_bad_images: bool = False
    ) -> None:
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        data = self._load_json(self.ann_file)
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            self.coco.createIndex()
        self.cat_ids: list[int] = sorted(int(c) for c in self.coco.cats)
        self.class_names: tuple[str, ...] = tuple(str(self.coco.cats[c]["name"]) for c in self.cat_ids)
        self._cat_to_index = {c: i for i, c in enumerate(self.cat_ids)}
        if not self.image_dir.is_dir():
            raise DataError(f"COCO image folder is not a directory: {self.image_dir} (for {self.ann_file})")
        img_ids = sorted(int(i) for i in self.coco.imgs)
        # File names compared after NFC normalisation (a JSON in NFC finds a file stored in NFD).
        self._on_disk = {unicodedata.normalize("NFC", n): n for n in os.listdir(self.image_dir)}
        missing = []
        for i in img_ids:
            fn = str(self.coco.imgs[i]["file_name"])
            flat = "/" not in fn and os.sep not in fn
            if not ((unicodedata.normalize("NFC", fn) in self._on_disk) if flat else (self.image_dir / fn).is_file()):
                missing.append(i)
        if missing:
            listed = ", ".join(
                f"{i} ({self.image_dir / str(self.coco.imgs[i]['file_name'])})" for i in missing[:_MAX_LISTED]
            )
            more = f" ... and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
            msg = f"{len(missing)} of {len(img_ids)} image(s) of {self.ann_file} have no image file: {listed}{more}"
            img_ids = drop_missing_images(img_ids, missing, msg, skip_bad_images, log)
        if skip_bad_images and img_ids:
            paths = [self.image_dir / str(self.coco.imgs[i]["file_name"]) for i in img_ids]
            img_ids = drop_unreadable_images(img_ids, paths, str(self.ann_file), log)
        self._int_ids = {str(i): i for i in img_ids}
        self.ids: list[str] = [str(i) for i in img_ids]

    @staticmethod
    def _load_json(path: Path) -> dict[str, Any]:
        try:
            with open(path, "rb") as f:
                data = json.load(f)
        except FileNotFoundError as exc:
            raise DataError(f"COCO annotation file not found: {path}") from exc
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot parse COCO annotation file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected a JSON object with 'images', 'annotations', 'categories'")
        for key in ("images", "categories"):
            if not isinstance(data.get(key), list):
                raise DataError(f"{path}: missing or malformed '{key}' list")
        data.setdefault("annotations", [])
        if not isinstance(data["annotations"], list):
            raise DataError(f"{path}: malformed 'annotations' (expected a list)")
        try:
            img_ids = [int(im["id"]) for im in data["images"]]
            for im in data["images"]:
                im["file_name"], im["height"], im["width"]  # noqa: B018 - presence check
            cat_ids = [int(c["id"]) for c in data["categories"]]
            for c in data["categories"]:
                c["name"]  # noqa: B018
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: an image or category entry lacks id/file_name/height/width/name ({exc!r})") from exc
        for what, ids in (("image", img_ids), ("category", cat_ids)):
            if len(set(ids)) != len(ids):
                dup = sorted({i for i in ids if ids.count(i) > 1})[:_MAX_LISTED]
                raise DataError(f"{path}: duplicate {what} id(s) {dup}")
        img_set, cat_set = set(img_ids), set(cat_ids)
        for ann in data["annotations"]:
            try:
                aid, iid, cid = ann.get("id"), ann["image_id"], ann["category_id"]
            except (KeyError, AttributeError) as exc:
                raise DataError(f"{path}: an annotation lacks image_id/category_id: {str(ann)[:200]}") from exc
            if iid not in img_set:
                raise DataError(f"{path}: annotation {aid} refers to unknown image id {iid}")
            if cid not in cat_set:
                raise DataError(f"{path}: annotation {aid} has unknown category id {cid}")
            if "segmentation" not in ann:
                raise DataError(f"{path}: annotation {aid} has no 'segmentation'")
        return data

    # ------------------------------------------------------------------ accessors
    @property
    def num_classes(self) -> int:
        """``C``, the number of categories in the annotation file."""
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"COCODataset(ann_file={str(self.ann_file)!r}, images={len(self)}, classes={self.num_classes})"

    def _int_id(self, img_id: str | int) -> int:
        try:
            return self._int_ids[str(img_id)]
        except KeyError:
            raise DataError(f"image id {img_id!r} is not in {self.ann_file}") from None

    def cat_id_to_index(self, cat_id: int) -> int:
        """0-based class index of COCO category id ``cat_id``. Raises DataError if unknown."""
        try:
            return self._cat_to_index[int(cat_id)]
        except (KeyError, ValueError, TypeError):
            raise DataError(f"category id {cat_id!r} is not in {self.ann_file}") from None

    def index_to_cat_id(self, idx: int) -> int:
        """COCO category id of 0-based class index ``idx``. Raises DataError outside ``0..C-1``."""
        if not 0 <= int(idx) < self.num_classes:
            raise DataError(f"class index {idx} outside 0..{self.num_classes - 1} for {self.ann_file}")
        return self.cat_ids[int(idx)]

    def file_name(self, img_id: str) -> str:
        """The ``file_name`` of the image entry (relative to ``image_dir``)."""
        return str(self.coco.imgs[self._int_id(img_id)]["file_name"])

    def image_path(self, img_id: str) -> Path:
        """The image file (``image_dir / file_name``, under its name on disk when it differs only in
        Unicode normalisation)."""
        fn = self.file_name(img_id)
        return self.image_dir / self._on_disk.get(unicodedata.normalize("NFC", fn), fn)

    def image_size(self, img_id: str) -> tuple[int, int]:
        """``(height, width)`` in pixels as recorded in the annotation file."""
        info = self.coco.imgs[self._int_id(img_id)]
        return int(info["height"]), int(info["width"])

    def image(self, img_id: str) -> np.ndarray:
        """The image as ``(H, W, 3)`` ``uint8`` RGB (grayscale JPEGs expanded); DataError if unreadable."""
        return load_rgb(self.image_path(img_id))

    def _anns(self, img_id: str) -> list[dict[str, Any]]:
        iid = self._int_id(img_id)
        anns = [self.coco.anns[a] for a in self.coco.getAnnIds(imgIds=[iid])]
        return sorted(anns, key=lambda a: a.get("id", 0))

    def labels(self, img_id: str) -> tuple[int, ...]:
        """Sorted unique 0-based class indices of the image's non-crowd annotations (may be empty)."""
        return tuple(sorted({self._cat_to_index[a["category_id"]] for a in self._anns(img_id) if not a.get("iscrowd", 0)}))

    def has_gt(self, img_id: str) -> bool:
        """True: every image of a COCO file has its (possibly empty) instance GT."""
        self._int_id(img_id)
        return True

    def semantic_gt(self, img_id: str) -> None:
        """COCO has no semantic map in this layout: always None."""
        self._int_id(img_id)
        return None

    def instances_gt(self, img_id: str) -> dict[str, np.ndarray]:
        """GT instances of the image, crowd regions included and flagged, in annotation-id order.

        Returns:
            ``{"masks": (N, H, W) bool, "labels": (N,) int64 0-based, "iscrowd": (N,) bool}`` with
            ``H, W`` from the image entry; masks decoded as ``COCO.annToMask`` does (``annToRLE`` +
            ``pycocotools.mask.decode``; polygons or RLE).

        Raises:
            DataError: an annotation whose segmentation cannot be decoded (names the file and the id).
        """
        anns = self._anns(img_id)
        h, w = self.image_size(img_id)
        masks = np.zeros((len(anns), h, w), dtype=bool)
        rles = []
        for ann in anns:
            try:
                rles.append(self.coco.annToRLE(ann))
            except Exception as exc:  # noqa: BLE001 - pycocotools raises assorted errors on bad input
                raise DataError(f"{self.ann_file}: cannot decode segmentation of annotation {ann.get('id')}: {exc}") from exc
        for ann, rle in zip(anns, rles):
            if tuple(rle["size"]) != (h, w):
                raise DataError(
                    f"{self.ann_file}: annotation {ann.get('id')} has mask size {tuple(rle['size'])}, "
                    f"image {img_id} is {(h, w)} (height, width)"
                )
        if rles:
            with warnings.catch_warnings():
                # pycocotools' Cython decoder trips a NumPy 2 copy-keyword DeprecationWarning; harmless.
                warnings.simplefilter("ignore", DeprecationWarning)
                dec = mask_utils.decode(rles)  # (H, W, N) uint8, one call for all annotations
            masks[:] = dec.transpose(2, 0, 1).astype(bool)
        labels = np.asarray([self._cat_to_index[a["category_id"]] for a in anns], dtype=np.int64)
        iscrowd = np.asarray([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
        return {"masks": masks, "labels": labels, "iscrowd": iscrowd}
