"""COCO run-length encoding and the COCO JSON files the pipeline writes.

All mask encoding goes through ``pycocotools.mask`` (column-major / Fortran-order RLE, the COCO format),
so files written here load in ``pycocotools.coco.COCO`` and ``COCO.loadRes`` unchanged. Two files are
produced (docs/ARCHITECTURE.md, "io/coco_json.py"):

- a COCO *dataset* (``images``, ``annotations``, ``categories``), used for pseudo labels that train the
  Mask R-CNN; each annotation may carry an extra ``score`` field;
- a COCO *results* list (``image_id``, ``category_id``, ``segmentation``, ``score``, ``bbox``), the input
  of ``COCOeval`` (``bestie.evaluation.coco``).

Conventions: masks are ``(H, W)`` bool arrays (row = y, column = x), boxes are ``[x, y, w, h]`` floats in
pixels (COCO convention: ``x, y`` the top-left corner of the top-left pixel, ``w, h`` the extent in
pixels, as returned by ``pycocotools.mask.toBbox``), RLE ``counts`` are ASCII strings.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from bestie.errors import DataError
from bestie.io.atomic import write_json_atomic

__all__ = [
    "encode_mask",
    "encode_masks",
    "decode_rle",
    "mask_to_bbox",
    "check_instances",
    "instances_to_coco_results",
    "make_annotation",
    "write_coco_dataset",
    "write_coco_results",
    "category_ids",
]


def _check_mask(mask: np.ndarray, what: str = "mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise DataError(f"{what} must be a 2-D (H, W) array, got shape {mask.shape}")
    if mask.size == 0:
        raise DataError(f"{what} has an empty shape {mask.shape}")
    if mask.dtype != bool:
        if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
            raise DataError(f"{what} must be bool (or 0/1 numbers), got dtype {mask.dtype}")
        mask = mask != 0
    return mask


def _rle_to_json(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def encode_mask(mask: np.ndarray) -> dict:
    """Compressed COCO RLE of one binary mask.

    Args:
        mask: ``(H, W)`` bool (0/1 integers are accepted and binarised with ``!= 0``).

    Returns:
        ``{"size": [H, W], "counts": str}`` (pycocotools ``mask.encode`` of the Fortran-order mask, with
        ``counts`` decoded to ASCII so the dict is JSON serialisable).

    Raises:
        DataError: not a non-empty 2-D array of bool/numbers.
    """
    mask = _check_mask(mask)
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8, copy=False)))
    return _rle_to_json(rle)


def encode_masks(masks: np.ndarray) -> list[dict]:
    """RLE of a stack of masks ``(N, H, W)`` bool in one pycocotools call; see :func:`encode_mask`.

    Raises:
        DataError: ``masks`` is not 3-D with non-empty ``H, W``.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[1] == 0 or masks.shape[2] == 0:
        raise DataError(f"masks must be a (N, H, W) array with H, W > 0, got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    if masks.dtype != bool:
        masks = masks != 0
    # (N, H, W) -> (H, W, N) Fortran order: each mask is then contiguous column-major, as pycocotools wants
    hwn = np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))
    return [_rle_to_json(r) for r in mask_utils.encode(hwn)]


def _to_pyco_rle(rle: Mapping[str, Any]) -> dict:
    """Validate an RLE dict and convert it to the form pycocotools' C functions take."""
    if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
        raise DataError(f"not a COCO RLE dict with 'size' and 'counts': {str(rle)[:200]}")
    size = rle["size"]
    if len(size) != 2:
        raise DataError(f"RLE 'size' must be [H, W], got {size!r}")
    h, w = int(size[0]), int(size[1])
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        if sum(int(c) for c in counts) != h * w:
            raise DataError(f"uncompressed RLE counts sum to {sum(counts)}, expected H*W = {h * w}")
        return mask_utils.frPyObjects({"size": [h, w], "counts": [int(c) for c in counts]}, h, w)
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    if not isinstance(counts, bytes):
        raise DataError(f"RLE 'counts' must be str, bytes or a list of ints, got {type(counts).__name__}")
    return {"size": [h, w], "counts": counts}


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode a COCO RLE (compressed ``counts`` str/bytes, or uncompressed list) to a mask.

    Returns:
        ``(H, W)`` bool mask, ``H, W = rle["size"]``.

    Raises:
        DataError: not an RLE dict, or counts that do not cover ``H * W`` pixels.
    """
    pyco = _to_pyco_rle(rle)
    h, w = pyco["size"]
    with warnings.catch_warnings():
        # pycocotools' decode trips numpy 2's __array__(copy=...) deprecation; harmless
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"__array__ implementation")
        mask = mask_utils.decode(pyco)
    if mask.shape != (h, w):
        raise DataError(f"RLE decodes to shape {mask.shape}, expected size {[h, w]}")
    return mask.astype(bool)


def mask_to_bbox(mask: np.ndarray | Mapping[str, Any]) -> list[float]:
    """Tight box ``[x, y, w, h]`` (floats, pixels) of a mask, via ``pycocotools.mask.toBbox``.

    ``x, y`` = column and row of the top-left foreground pixel, ``w, h`` = number of columns and rows
    spanned; ``[0, 0, 0, 0]`` for an empty mask.

    Args:
        mask: ``(H, W)`` bool array, or an RLE dict.
    """
    rle = _to_pyco_rle(mask) if isinstance(mask, Mapping) else mask_utils.encode(
        np.asfortranarray(_check_mask(mask).astype(np.uint8)))
    return [float(v) for v in mask_utils.toBbox(rle)]


def check_instances(
    instances: Mapping[str, Any], source: str, score_dtype: type = np.float64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The arrays of an instances dict, checked (the dict that BESTIE inference and the HDF5 stores hold).

    Args:
        instances: ``{"masks": (N, H, W) bool/0-1, "labels": (N,) int 0-based, "scores": (N,) float}``.
        source: what the dict is, named by every error message (a file and image id, or ``"instances"``).
        score_dtype: dtype of the returned scores; the finite check is made on them.

    Returns:
        ``(masks, labels, scores)``: ``masks`` and ``labels`` as :func:`numpy.asarray` gives them (no copy,
        dtype kept), ``scores`` as ``score_dtype``.

    Raises:
        DataError: a missing key, masks that are not 3-D, ``N`` that differs between the arrays,
            non-integer or negative labels, NaN / inf scores.
    """
    for key in ("masks", "labels", "scores"):
        if key not in instances:
            raise DataError(f"{source}: lacks {key!r} (has {sorted(instances)})")
    masks = np.asarray(instances["masks"])
    labels = np.asarray(instances["labels"])
    scores = np.asarray(instances["scores"], dtype=score_dtype)
    if masks.ndim != 3:
        raise DataError(f"{source}: masks must be (N, H, W), got shape {masks.shape}")
    n = masks.shape[0]
    if labels.shape != (n,) or scores.shape != (n,):
        raise DataError(f"{source}: masks {masks.shape}, labels {labels.shape} and scores {scores.shape} disagree on N")
    if n and not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{source}: labels must be integers, got dtype {labels.dtype}")
    if n and labels.min() < 0:
        raise DataError(f"{source}: labels must be 0-based class indices >= 0, got {labels.min()}")
    if not np.all(np.isfinite(scores)):
        raise DataError(f"{source}: scores hold NaN or inf")
    return masks, labels, scores


def instances_to_coco_results(
    image_id: int, instances: Mapping[str, Any], label_to_cat_id: Callable[[int], int]
) -> list[dict]:
    """COCO results records for the instances predicted on one image.

    Args:
        image_id: COCO image id (int).
        instances: ``{"masks": (N, H, W) bool, "labels": (N,) int64 0-based, "scores": (N,) float32}``.
        label_to_cat_id: maps a 0-based class index to the COCO category id.

    Returns:
        ``N`` dicts ``{"image_id", "category_id", "segmentation": RLE (counts str), "score": float,
        "bbox": [x, y, w, h]}`` in the order of the input (empty list for ``N = 0``).

    Raises:
        DataError: inconsistent shapes, negative labels, non-finite scores.
    """
    masks, labels, scores = check_instances(instances, "instances")
    if masks.shape[0] == 0:
        return []
    rles = encode_masks(masks)
    boxes = mask_utils.toBbox([{"size": r["size"], "counts": r["counts"].encode("ascii")} for r in rles])
    return [
        {
            "image_id": int(image_id),
            "category_id": int(label_to_cat_id(int(label))),
            "segmentation": rle,
            "score": float(score),
            "bbox": [float(v) for v in box],
        }
        for rle, label, score, box in zip(rles, labels, scores, boxes)
    ]


def make_annotation(
    ann_id: int, image_id: int, category_id: int, mask: np.ndarray, score: float | None = None
) -> dict:
    """One COCO dataset annotation with an RLE segmentation.

    Args:
        ann_id: annotation id (unique in the dataset; COCO ids start at 1).
        image_id, category_id: COCO ids.
        mask: ``(H, W)`` bool instance mask.
        score: optional confidence, kept as an extra ``score`` field (ignored by pycocotools).

    Returns:
        ``{"id", "image_id", "category_id", "segmentation": RLE, "area": float (pixel count),
        "bbox": [x, y, w, h], "iscrowd": 0[, "score": float]}``.

    Raises:
        DataError: bad mask (see :func:`encode_mask`).
    """
    rle = encode_mask(mask)
    pyco = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    ann = {
        "id": int(ann_id),
        "image_id": int(image_id),
        "category_id": int(category_id),
        "segmentation": rle,
        "area": float(mask_utils.area(pyco)),
        "bbox": [float(v) for v in mask_utils.toBbox(pyco)],
        "iscrowd": 0,
    }
    if score is not None:
        ann["score"] = float(score)
    return ann


def _record_ids(path: str, records: Sequence[Mapping[str, Any]], what: str, keys: tuple[str, ...]) -> set[int]:
    """The ``id`` of each record of a COCO dataset's ``images`` or ``categories`` list, as ints.

    Raises:
        DataError: a record lacks one of ``keys`` (the message shows the record) or repeats an id; each
            message names the file ``path`` and the kind of record ``what``.
    """
    ids: set[int] = set()
    for rec in records:
        for key in keys:
            if key not in rec:
                raise DataError(f"{path}: {what} record lacks {key!r}: {dict(rec)}")
        if int(rec["id"]) in ids:
            raise DataError(f"{path}: duplicate {what} id {rec['id']}")
        ids.add(int(rec["id"]))
    return ids


def write_coco_dataset(
    path: str | os.PathLike,
    images: Sequence[Mapping[str, Any]],
    annotations: Sequence[Mapping[str, Any]],
    categories: Sequence[Mapping[str, Any]],
    info: Mapping[str, Any] | None = None,
) -> None:
    """Write a COCO instances dataset JSON atomically (see :func:`bestie.io.atomic.write_json_atomic`).

    Args:
        path: output ``.json``.
        images: dicts with at least ``id``, ``file_name``, ``height``, ``width``.
        annotations: dicts as built by :func:`make_annotation` (need ``id``, ``image_id``,
            ``category_id``, ``segmentation``); their ``image_id``/``category_id`` must exist.
        categories: dicts with at least ``id`` and ``name``.
        info: optional ``info`` block (a default description is written otherwise).

    Raises:
        DataError: a record lacks a required key, duplicate ids, or an annotation refers to an unknown
            image or category (names the output file and the record).
        ArtifactError: the file cannot be written (previous content is kept).
    """
    path = os.fspath(path)
    image_ids = _record_ids(path, images, "image", ("id", "file_name", "height", "width"))
    cat_ids = _record_ids(path, categories, "category", ("id", "name"))
    ann_ids: set[int] = set()
    for rec in annotations:
        for key in ("id", "image_id", "category_id", "segmentation"):
            if key not in rec:
                raise DataError(f"{path}: annotation record lacks {key!r} (id {rec.get('id')})")
        if int(rec["id"]) in ann_ids:
            raise DataError(f"{path}: duplicate annotation id {rec['id']}")
        ann_ids.add(int(rec["id"]))
        if int(rec["image_id"]) not in image_ids:
            raise DataError(f"{path}: annotation {rec['id']} refers to unknown image id {rec['image_id']}")
        if int(rec["category_id"]) not in cat_ids:
            raise DataError(
                f"{path}: annotation {rec['id']} refers to unknown category id {rec['category_id']}"
            )
    dataset = {
        "info": dict(info) if info is not None else {"description": "written by bestie"},
        "licenses": [],
        "images": [dict(r) for r in images],
        "annotations": [dict(r) for r in annotations],
        "categories": [dict(r) for r in categories],
    }
    write_json_atomic(path, dataset, indent=None)


def write_coco_results(path: str | os.PathLike, results: Sequence[Mapping[str, Any]]) -> None:
    """Write a COCO results list (as from :func:`instances_to_coco_results`) atomically.

    Raises:
        DataError: a record lacks ``image_id``, ``category_id``, ``segmentation`` or ``score``.
        ArtifactError: the file cannot be written (previous content is kept).
    """
    for i, rec in enumerate(results):
        for key in ("image_id", "category_id", "segmentation", "score"):
            if key not in rec:
                raise DataError(f"{os.fspath(path)}: result record {i} lacks {key!r}")
    write_json_atomic(path, [dict(r) for r in results], indent=None)


def category_ids(dataset: Any) -> list[int]:
    """COCO category id of each 0-based class index of ``dataset``.

    COCO datasets (with ``index_to_cat_id``) keep their original ids; other (VOC-layout) datasets get
    ``1..C`` in class order.
    """
    if hasattr(dataset, "index_to_cat_id"):
        return [int(dataset.index_to_cat_id(c)) for c in range(dataset.num_classes)]
    return list(range(1, dataset.num_classes + 1))
