"""COCODataset on a hand-made annotation file and on ../shared/data/coco128."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bestie.data import COCODataset, build_dataset
from bestie.errors import ConfigError, DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
COCO128 = SHARED / "coco128"


def make_coco(tmp_path: Path) -> tuple[Path, Path]:
    """Images 12 and 5 (8x10 and 4x5) with categories 7 'kite' and 3 'car' (listed unsorted)."""
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(img_dir / "a.jpg")
    Image.fromarray(np.zeros((4, 5), np.uint8), mode="L").save(img_dir / "b.jpg")  # grayscale
    data = {
        "images": [
            {"id": 12, "file_name": "a.jpg", "height": 8, "width": 10},
            {"id": 5, "file_name": "b.jpg", "height": 4, "width": 5},
        ],
        "categories": [{"id": 7, "name": "kite"}, {"id": 3, "name": "car"}],
        "annotations": [
            # image 12: a car polygon (x 1..5, y 1..4) and a crowd kite region (uncompressed RLE)
            {"id": 2, "image_id": 12, "category_id": 3, "iscrowd": 0, "area": 12, "bbox": [1, 1, 4, 3],
             "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4]]},
            {"id": 1, "image_id": 12, "category_id": 7, "iscrowd": 1, "area": 3, "bbox": [1, 1, 1, 3],
             "segmentation": {"size": [8, 10], "counts": [9, 3, 68]}},
            # image 5: a kite as uncompressed RLE, column-major: 5 zeros, 3 ones (column 1, rows 1..3)
            {"id": 3, "image_id": 5, "category_id": 7, "iscrowd": 0, "area": 3, "bbox": [1, 1, 1, 3],
             "segmentation": {"size": [4, 5], "counts": [5, 3, 12]}},
        ],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return ann, img_dir


def test_ids_classes_labels(tmp_path):
    ann, img_dir = make_coco(tmp_path)
    ds = COCODataset(ann, img_dir)
    assert ds.ids == ["5", "12"] and len(ds) == 2  # sorted by numeric id
    assert ds.cat_ids == [3, 7] and ds.class_names == ("car", "kite") and ds.num_classes == 2
    assert ds.cat_id_to_index(7) == 1 and ds.index_to_cat_id(0) == 3
    with pytest.raises(DataError):
        ds.cat_id_to_index(4)
    with pytest.raises(DataError):
        ds.index_to_cat_id(2)
    assert ds.labels("12") == (0,)  # the crowd kite does not count
    assert ds.labels("5") == (1,)
    assert ds.file_name("12") == "a.jpg" and ds.image_path("5") == img_dir / "b.jpg"
    assert ds.semantic_gt("5") is None and ds.has_gt("5")
    assert ds.image("5").shape == (4, 5, 3)  # grayscale expanded
    assert ds.coco.getImgIds() and set(ds.coco.getImgIds()) == {5, 12}
    with pytest.raises(DataError, match="'99'"):
        ds.labels("99")


def test_instances(tmp_path):
    ann, img_dir = make_coco(tmp_path)
    ds = COCODataset(ann, img_dir)
    gt = ds.instances_gt("5")
    expected = np.zeros((4, 5), bool)
    expected[1:4, 1] = True
    np.testing.assert_array_equal(gt["masks"][0], expected)
    np.testing.assert_array_equal(gt["labels"], [1])
    assert gt["labels"].dtype == np.int64 and gt["iscrowd"].dtype == bool
    gt = ds.instances_gt("12")
    assert gt["masks"].shape == (2, 8, 10)
    np.testing.assert_array_equal(gt["labels"], [1, 0])  # annotation-id order: crowd kite (1), car (2)
    np.testing.assert_array_equal(gt["iscrowd"], [True, False])
    crowd = np.zeros((8, 10), bool)
    crowd[1:4, 1] = True  # 9 zeros = column 0 (8) + (row 0, col 1); then rows 1..3 of column 1
    np.testing.assert_array_equal(gt["masks"][0], crowd)
    car = gt["masks"][1]
    ys, xs = np.nonzero(car)
    assert car.sum() > 0 and xs.min() >= 1 and xs.max() <= 5 and ys.min() >= 1 and ys.max() <= 4


def test_errors(tmp_path, caplog):
    ann, img_dir = make_coco(tmp_path)
    with pytest.raises(DataError, match="not found"):
        COCODataset(tmp_path / "none.json", img_dir)
    bad = json.loads(ann.read_text())
    bad["annotations"][0]["category_id"] = 99
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"bad\.json: annotation 2 has unknown category id 99"):
        COCODataset(tmp_path / "bad.json", img_dir)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(DataError, match=r"broken\.json"):
        COCODataset(tmp_path / "broken.json", img_dir)
    (img_dir / "b.jpg").unlink()
    with pytest.raises(DataError, match=r"1 of 2 image\(s\).*b\.jpg"):
        COCODataset(ann, img_dir)
    with caplog.at_level(logging.WARNING, logger="bestie.data.coco"):
        ds = COCODataset(ann, img_dir, skip_bad_images=True)
    assert ds.ids == ["12"] and "b.jpg" in caplog.text


def test_undecodable_images_raise_naming_file_or_are_skipped(tmp_path, caplog):
    ann, img_dir = make_coco(tmp_path)
    (img_dir / "b.jpg").write_bytes((img_dir / "b.jpg").read_bytes()[:40])  # truncated JPEG
    ds = COCODataset(ann, img_dir)
    assert ds.ids == ["5", "12"]
    with pytest.raises(DataError, match=r"cannot read image .*images/b\.jpg"):
        ds.image("5")
    with caplog.at_level(logging.WARNING, logger="bestie.data.coco"):
        ds = COCODataset(ann, img_dir, skip_bad_images=True)
    assert ds.ids == ["12"] and ds.image("12").shape == (8, 10, 3)
    assert "skipping unreadable image" in caplog.text and "b.jpg" in caplog.text
    assert "skipped 1 of 2 image(s)" in caplog.text


def test_build_dataset_coco(tmp_path):
    ann, img_dir = make_coco(tmp_path)
    ann.rename(tmp_path / "ann_train.json")
    cfg = {"format": "coco", "ann_file": str(tmp_path / "ann_{split}.json"), "image_dir": str(img_dir),
           "split": "train", "skip_bad_images": False}
    ds = build_dataset(cfg)
    assert isinstance(ds, COCODataset) and len(ds) == 2
    with pytest.raises(DataError, match=r"ann_val\.json"):
        build_dataset(cfg, split="val")
    with pytest.raises(ConfigError, match=r"dataset\.image_dir"):
        build_dataset({"format": "coco", "ann_file": str(ann)})


@pytest.mark.skipif(not COCO128.is_dir(), reason=f"shared data not found at {COCO128}")
def test_coco128_counts():
    ds = COCODataset(COCO128 / "annotations" / "instances_train.json", COCO128 / "images")
    assert len(ds) == 128
    assert len(ds.coco.getAnnIds()) == 929
    assert ds.ids == sorted(ds.ids, key=int)
    n, empty, gray = 0, 0, []
    for i in ds.ids:
        gt = ds.instances_gt(i)
        n += len(gt["labels"])
        empty += len(gt["labels"]) == 0
        assert gt["masks"].shape[1:] == ds.image_size(i)
        if Image.open(ds.image_path(i)).mode == "L":
            gray.append(i)
    assert n == 929 and empty == 2
    assert len({c for i in ds.ids for c in ds.labels(i)}) == 71
    assert len(gray) == 1
    img = ds.image(gray[0])
    assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8
    assert img.shape[:2] == ds.image_size(gray[0])
