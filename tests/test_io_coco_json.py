"""Tests of bestie.io.coco_json: RLE round trips and COCO files that pycocotools reads back."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from bestie.errors import DataError
from coco_interop import assert_dataset_fields, assert_results_fields, segm_stats
from bestie.io.coco_json import (
    decode_rle,
    encode_mask,
    encode_masks,
    instances_to_coco_results,
    make_annotation,
    mask_to_bbox,
    write_coco_dataset,
    write_coco_results,
)


def _edge_masks() -> list[np.ndarray]:
    masks = []
    for h, w in [(1, 1), (1, 7), (7, 1), (5, 6)]:
        masks.append(np.zeros((h, w), bool))
        masks.append(np.ones((h, w), bool))
    for r, c in [(0, 0), (4, 5), (0, 5), (4, 0), (2, 3)]:  # single pixels incl. all corners
        m = np.zeros((5, 6), bool)
        m[r, c] = True
        masks.append(m)
    row = np.zeros((1, 9), bool)
    row[0, [0, 3, 4, 8]] = True
    masks.append(row)
    return masks


def test_rle_round_trip_exact_edge_cases():
    for mask in _edge_masks():
        rle = encode_mask(mask)
        assert isinstance(rle["counts"], str) and rle["size"] == list(mask.shape)
        json.dumps(rle)
        out = decode_rle(rle)
        assert out.dtype == bool and out.shape == mask.shape
        np.testing.assert_array_equal(out, mask)


def test_rle_round_trip_random():
    rng = np.random.default_rng(0)
    for h, w, p in [(13, 17, 0.5), (64, 48, 0.1), (120, 97, 0.9), (375, 500, 0.3)]:
        mask = rng.random((h, w)) < p
        np.testing.assert_array_equal(decode_rle(encode_mask(mask)), mask)
        # bytes counts are accepted too
        rle = encode_mask(mask)
        np.testing.assert_array_equal(decode_rle({"size": rle["size"], "counts": rle["counts"].encode()}), mask)
    stack = rng.random((4, 20, 30)) < 0.4
    for rle, mask in zip(encode_masks(stack), stack):
        np.testing.assert_array_equal(decode_rle(rle), mask)
    assert encode_masks(np.zeros((0, 5, 5), bool)) == []


def test_rle_is_column_major():
    # [[0, 1], [1, 1]] read column by column is 0, 1 | 1, 1: one 0 then three 1s
    mask = np.array([[0, 1], [1, 1]], bool)
    np.testing.assert_array_equal(decode_rle({"size": [2, 2], "counts": [1, 3]}), mask)
    assert encode_mask(mask) == encode_mask(decode_rle({"size": [2, 2], "counts": [1, 3]}))
    # row-major reading would be 0, 1, 1, 1 as well; use a mask where the orders differ:
    # [[1, 0], [1, 1]]: column-major 1,1 | 0,1 -> counts [0, 2, 1, 1]; row-major would be [0, 1, 1, 2]
    mask2 = np.array([[1, 0], [1, 1]], bool)
    np.testing.assert_array_equal(decode_rle({"size": [2, 2], "counts": [0, 2, 1, 1]}), mask2)


def test_bad_masks_and_rles():
    with pytest.raises(DataError):
        encode_mask(np.zeros((2, 3, 4), bool))
    with pytest.raises(DataError):
        encode_mask(np.zeros((0, 4), bool))
    with pytest.raises(DataError):
        encode_mask(np.array([["a"]]))
    with pytest.raises(DataError):
        decode_rle({"counts": "abc"})
    with pytest.raises(DataError):
        decode_rle({"size": [2, 2], "counts": [1, 2]})  # covers 3 of 4 pixels


def test_mask_to_bbox_hand_checked():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:8] = True  # rows 2..4, columns 3..7
    mask[6, 10] = True  # extends to row 6, column 10
    assert mask_to_bbox(mask) == [3.0, 2.0, 8.0, 5.0]
    assert mask_to_bbox(encode_mask(mask)) == [3.0, 2.0, 8.0, 5.0]
    assert mask_to_bbox(np.zeros((4, 4), bool)) == [0.0, 0.0, 0.0, 0.0]
    one = np.zeros((4, 4), bool)
    one[3, 0] = True
    assert mask_to_bbox(one) == [0.0, 3.0, 1.0, 1.0]


def test_instances_to_coco_results():
    masks = np.zeros((2, 6, 8), bool)
    masks[0, 1:3, 2:5] = True
    masks[1, 4:6, 0:8] = True
    inst = {"masks": masks, "labels": np.array([0, 14], np.int64), "scores": np.array([0.9, 0.25], np.float32)}
    recs = instances_to_coco_results(42, inst, lambda c: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16][c])
    assert [r["category_id"] for r in recs] == [1, 16]
    assert [r["image_id"] for r in recs] == [42, 42]
    assert recs[0]["bbox"] == [2.0, 1.0, 3.0, 2.0] and recs[1]["bbox"] == [0.0, 4.0, 8.0, 2.0]
    assert recs[0]["score"] == pytest.approx(0.9) and recs[1]["score"] == pytest.approx(0.25)
    for r, m in zip(recs, masks):
        np.testing.assert_array_equal(decode_rle(r["segmentation"]), m)
    json.dumps(recs)
    empty = {"masks": np.zeros((0, 6, 8), bool), "labels": np.zeros(0, np.int64), "scores": np.zeros(0, np.float32)}
    assert instances_to_coco_results(1, empty, lambda c: c + 1) == []
    with pytest.raises(DataError, match="disagree"):
        instances_to_coco_results(1, dict(inst, labels=np.array([0])), lambda c: c + 1)


def _dataset(rng):
    images = [
        {"id": 1, "file_name": "a.jpg", "height": 30, "width": 40},
        {"id": 7, "file_name": "sub/b.jpg", "height": 25, "width": 20},
    ]
    categories = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]
    masks = {}
    anns = []
    k = 1
    for img in images:
        for cat in (1, 18, 18):
            m = np.zeros((img["height"], img["width"]), bool)
            y, x = rng.integers(0, img["height"] - 5), rng.integers(0, img["width"] - 5)
            m[y : y + 5, x : x + rng.integers(1, 6)] = True
            m |= rng.random(m.shape) < 0.05  # scattered pixels: multi-part masks
            anns.append(make_annotation(k, img["id"], cat, m, score=0.5 + 0.01 * k))
            masks[k] = m
            k += 1
    return images, anns, categories, masks


def test_make_annotation_fields():
    m = np.zeros((5, 5), bool)
    m[1:3, 1:4] = True
    ann = make_annotation(3, 9, 18, m)
    assert ann["area"] == 6.0 and ann["bbox"] == [1.0, 1.0, 3.0, 2.0] and ann["iscrowd"] == 0
    assert "score" not in ann and (ann["id"], ann["image_id"], ann["category_id"]) == (3, 9, 18)
    assert make_annotation(3, 9, 18, m, score=np.float32(0.75))["score"] == 0.75


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_written_dataset_loads_in_pycocotools(tmp_path):
    images, anns, categories, masks = _dataset(np.random.default_rng(3))
    path = tmp_path / "pseudo" / "train.json"
    write_coco_dataset(path, images, anns, categories)
    coco = COCO(str(path))
    assert sorted(coco.getImgIds()) == [1, 7] and sorted(coco.getCatIds()) == [1, 18]
    assert len(coco.getAnnIds(imgIds=[7], catIds=[18])) == 2
    for ann_id, m in masks.items():
        ann = coco.loadAnns([ann_id])[0]
        np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), m)
        assert ann["area"] == float(m.sum())
        assert ann["score"] == pytest.approx(0.5 + 0.01 * ann_id)
    # results written from the same masks load with loadRes
    res_path = tmp_path / "res.json"
    write_coco_results(res_path, [
        {"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"], "score": 1.0,
         "bbox": a["bbox"]}
        for a in anns
    ])
    dt = coco.loadRes(str(res_path))
    assert len(dt.getAnnIds()) == len(anns)
    # every field Detectron2 / MMDetection read; the annotations as results score AP 1 in COCOeval segm
    assert_dataset_fields(json.loads(path.read_text()), ["person", "dog"], [1, 18])
    assert_results_fields(json.loads(res_path.read_text()), {im["id"]: im for im in images}, [1, 18])
    assert segm_stats(coco, str(res_path))[0] == pytest.approx(1.0)


def test_write_coco_dataset_validation(tmp_path):
    images, anns, categories, _ = _dataset(np.random.default_rng(4))
    path = tmp_path / "d.json"
    with pytest.raises(DataError, match="unknown image id 99"):
        write_coco_dataset(path, images, anns + [dict(anns[0], id=1000, image_id=99)], categories)
    with pytest.raises(DataError, match="unknown category id 5"):
        write_coco_dataset(path, images, anns + [dict(anns[0], id=1000, category_id=5)], categories)
    with pytest.raises(DataError, match="duplicate annotation id"):
        write_coco_dataset(path, images, anns + [anns[0]], categories)
    with pytest.raises(DataError, match="lacks 'width'"):
        write_coco_dataset(path, [{"id": 1, "file_name": "a", "height": 3}], [], categories)
    assert not path.exists()
    with pytest.raises(DataError, match="lacks 'score'"):
        write_coco_results(tmp_path / "r.json", [{"image_id": 1, "category_id": 1, "segmentation": {}}])
