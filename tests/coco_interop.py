"""Checks that a COCO file holds what other toolkits read, without installing them.

The field lists come from the readers themselves:

- Detectron2 ``detectron2.data.datasets.load_coco_json`` (behind ``register_coco_instances``): per image
  ``file_name`` (joined to the image root), ``height``, ``width``, ``id``; per annotation ``image_id``
  (must equal its image's id), a unique ``id``, ``iscrowd``, ``bbox`` (XYWH_ABS), ``category_id``,
  ``segmentation`` (polygons or an RLE dict), no ``ignore`` other than 0; categories ``id`` and ``name``
  (thing_classes = names sorted by id; non-contiguous ids are mapped to 0..K-1).
- MMDetection ``mmdet.datasets.CocoDataset``: categories looked up by ``name`` (``metainfo.classes``),
  per image ``file_name``, ``height``, ``width``, ``id``; per annotation ``bbox`` (dropped when it does
  not overlap the image, when ``area <= 0`` or ``w < 1`` or ``h < 1``), ``area``, ``category_id``,
  ``iscrowd`` (crowd -> ignored box), ``segmentation``, unique annotation ids.
- pycocotools ``COCO.loadRes`` (results): a list of ``image_id``, ``category_id``, ``score`` and
  ``segmentation`` (its ``area`` and ``bbox`` are recomputed from the RLE) whose image ids are in the
  dataset.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO


def segm_stats(coco_gt: COCO, results: Sequence[Mapping[str, Any]] | str, img_ids: Sequence[int] | None = None):
    """pycocotools ``COCOeval`` (``segm``) stats (AP, AP50, AP75, ...) of results against ``coco_gt``."""
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco_gt.loadRes(results if isinstance(results, str) else [dict(r) for r in results])
        e = COCOeval(coco_gt, dt, "segm")
        if img_ids is not None:
            e.params.imgIds = [int(i) for i in img_ids]
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats


def quiet_coco(dataset: Mapping[str, Any] | str) -> COCO:
    """``COCO`` of a dict or a file, without pycocotools' prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(dataset, str):
            return COCO(dataset)
        coco = COCO()
        coco.dataset = dict(dataset)
        coco.createIndex()
        return coco


def _rle(seg: Mapping[str, Any]) -> dict:
    return {"size": list(seg["size"]), "counts": seg["counts"].encode("ascii")}


def assert_dataset_fields(data: Mapping[str, Any], class_names: Sequence[str] | None = None,
                          category_ids: Sequence[int] | None = None) -> None:
    """Every field Detectron2's ``load_coco_json`` and MMDetection's ``CocoDataset`` read is present
    and consistent (module docstring); raises AssertionError naming the record otherwise."""
    images = {int(im["id"]): im for im in data["images"]}
    assert len(images) == len(data["images"]), "duplicate image ids"
    for im in data["images"]:
        assert isinstance(im["file_name"], str) and im["file_name"], im
        assert isinstance(im["height"], int) and isinstance(im["width"], int) and im["height"] > 0 and im["width"] > 0, im
    cats = data["categories"]
    assert all(isinstance(c["id"], int) and isinstance(c["name"], str) for c in cats), cats
    assert len({c["id"] for c in cats}) == len(cats) and len({c["name"] for c in cats}) == len(cats), cats
    if class_names is not None:
        assert [c["name"] for c in sorted(cats, key=lambda c: c["id"])] == list(class_names)  # Detectron2's thing_classes
    if category_ids is not None:
        assert [c["id"] for c in cats] == [int(c) for c in category_ids]
    cat_ids = {c["id"] for c in cats}
    ann_ids = [a["id"] for a in data["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids), "annotation ids not unique"
    for a in data["annotations"]:
        im = images[int(a["image_id"])]
        assert a.get("ignore", 0) == 0 and a["iscrowd"] in (0, 1), a["id"]
        assert a["category_id"] in cat_ids, a["id"]
        seg = a["segmentation"]
        assert isinstance(seg, dict) and list(seg["size"]) == [im["height"], im["width"]], a["id"]
        assert isinstance(seg["counts"], str), a["id"]
        rle = _rle(seg)
        assert a["area"] == float(mask_utils.area(rle)) and a["area"] > 0, a["id"]
        x, y, w, h = a["bbox"]
        np.testing.assert_allclose(a["bbox"], mask_utils.toBbox(rle), err_msg=str(a["id"]))
        assert w >= 1 and h >= 1 and x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"], a["id"]


def assert_results_fields(results: Sequence[Mapping[str, Any]], images: Mapping[int, Mapping[str, Any]],
                          category_ids: Sequence[int]) -> None:
    """COCO results records (``loadRes`` / Detectron2 ``coco_instances_results.json``): keys, RLE in the
    image's size, XYWH box of the mask, score in [0, 1], known image and category ids."""
    for r in results:
        assert {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(r), r.keys()
        im = images[int(r["image_id"])]
        assert int(r["category_id"]) in set(int(c) for c in category_ids), r["category_id"]
        assert 0.0 <= r["score"] <= 1.0
        seg = r["segmentation"]
        assert list(seg["size"]) == [im["height"], im["width"]] and isinstance(seg["counts"], str)
        np.testing.assert_allclose(r["bbox"], mask_utils.toBbox(_rle(seg)), rtol=0, atol=1e-6)
