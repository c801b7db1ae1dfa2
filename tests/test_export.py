"""Stage 5: pseudo-label export (bestie.stages.export_pseudo_labels)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from bestie.data import build_dataset, generate_demo_dataset
from bestie.data.demo import DEMO_CLASSES
from bestie.errors import ArtifactError, ConfigError, DataError
from bestie.io.h5store import H5Writer
from bestie.stages.export_pseudo_labels import ExportConfig, category_ids, filter_instances, run
from coco_interop import assert_dataset_fields, segm_stats

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = generate_demo_dataset(tmp_path_factory.mktemp("demo"), num_train=4, num_val=2, image_size=(96, 96))
    cfg = {"format": "voc", "root": str(root), "classes": list(DEMO_CLASSES)}
    return cfg, build_dataset(cfg, "train")


def _load_coco(path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _synthetic_predictions(ds):
    """Per image: 5 instances with hand-chosen fate under ExportConfig(score 0.3, min_area 50).

    0: kept (area 200, score 0.9, class = first image label)
    1: kept (area 64 = 8x8, score 0.31, class = first image label)
    2: dropped, score 0.29 < 0.3
    3: dropped, area 49 = 7x7 < 50
    4: dropped, class not in the image label (when filter_by_image_labels)
    """
    preds, expected = {}, {}
    for i, image_id in enumerate(ds.ids):
        h, w = ds.image(image_id).shape[:2]
        labels = ds.labels(image_id)
        absent = [c for c in range(ds.num_classes) if c not in labels]
        c0 = labels[0]
        masks = np.stack([
            _rect(h, w, 10, 20, 10 + i, 30 + i),       # 10 x 20 = 200 px
            _rect(h, w, 40, 48, 40, 48),               # 64 px
            _rect(h, w, 60, 80, 60, 80),
            _rect(h, w, 0, 7, 80, 87),                 # 49 px
            _rect(h, w, 50, 70, 5, 25),
        ])
        preds[image_id] = {
            "masks": masks,
            "labels": np.array([c0, c0, c0, c0, absent[0] if absent else c0], dtype=np.int64),
            "scores": np.array([0.9, 0.31, 0.29, 0.95, 0.99], dtype=np.float32),
        }
        keep = [0, 1] if absent else [4, 0, 1]  # sorted by score
        expected[image_id] = {k: v[keep] for k, v in preds[image_id].items()}
    return preds, expected


def test_export_round_trip_from_hdf5(demo, tmp_path):
    cfg_ds, ds = demo
    preds, expected = _synthetic_predictions(ds)
    h5 = tmp_path / "instances.h5"
    with H5Writer(h5) as w:
        for image_id, inst in preds.items():
            w.write(image_id, **inst)
    out = tmp_path / "pseudo.json"
    summary = run(ExportConfig(score_threshold=0.3, min_area=50), cfg_ds, "train", h5, out)

    coco = _load_coco(out)
    n_expected = sum(len(e["labels"]) for e in expected.values())
    assert summary["num_instances"] == n_expected == len(coco.getAnnIds())
    assert summary["num_dropped"] == 5 * len(ds.ids) - n_expected
    # categories: VOC layout -> 1..C in class order
    assert [c["id"] for c in coco.dataset["categories"]] == [1, 2, 3]
    assert [c["name"] for c in coco.dataset["categories"]] == list(DEMO_CLASSES)
    assert len(coco.dataset["images"]) == len(ds.ids)
    for img in coco.dataset["images"]:
        image_id = img["image_key"]
        exp = expected[image_id]
        assert img["file_name"] == f"{image_id}.jpg"
        assert (img["height"], img["width"]) == (96, 96)
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]])), key=lambda a: a["id"])
        assert len(anns) == len(exp["labels"])
        for ann, m, c, s in zip(anns, exp["masks"], exp["labels"], exp["scores"]):
            decoded = coco.annToMask(ann).astype(bool)
            np.testing.assert_array_equal(decoded, m)  # exactly the predicted mask
            assert ann["category_id"] == int(c) + 1
            assert ann["area"] == m.sum()
            ys, xs = np.nonzero(m)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["score"] == pytest.approx(float(s))
            assert ann["iscrowd"] == 0
    info = json.loads(out.read_text())["info"]
    assert info["split"] == "train" and info["export"]["score_threshold"] == 0.3
    # Detectron2 / MMDetection fields; the pseudo labels as results (loadRes) score AP 1 against themselves
    assert_dataset_fields(json.loads(out.read_text()), DEMO_CLASSES, [1, 2, 3])
    assert [im["id"] for im in coco.dataset["images"]] == list(range(1, len(ds.ids) + 1))  # VOC: 1..N
    assert segm_stats(coco, coco.dataset["annotations"])[0] == pytest.approx(1.0)


def test_export_without_label_filter_keeps_absent_classes(demo, tmp_path):
    cfg_ds, ds = demo
    preds, _ = _synthetic_predictions(ds)
    out = tmp_path / "p.json"
    run(ExportConfig(score_threshold=0.3, min_area=50, filter_by_image_labels=False), cfg_ds, "train", preds, out)
    coco = _load_coco(out)
    assert len(coco.getAnnIds()) == 3 * len(ds.ids)  # instances 0, 1 and 4 of every image


def test_filter_instances_order_and_cap():
    h = w = 20
    masks = np.zeros((4, h, w), bool)
    for k in range(4):
        masks[k, k:k + 5, 0:10] = True  # 50 px each
    inst = {"masks": masks, "labels": np.array([0, 1, 0, 1]), "scores": np.array([0.2, 0.8, 0.8, 0.5])}
    out = filter_instances(inst, ExportConfig(score_threshold=0.0, min_area=50, max_per_image=3))
    # descending score, ties in input order (1 before 2), capped at 3
    np.testing.assert_array_equal(out["labels"], [1, 0, 1])
    np.testing.assert_allclose(out["scores"], [0.8, 0.8, 0.5])
    np.testing.assert_array_equal(out["masks"], masks[[1, 2, 3]])
    out = filter_instances(inst, ExportConfig(score_threshold=0.0, min_area=51))
    assert out["labels"].size == 0 and out["masks"].shape == (0, h, w)
    with pytest.raises(DataError, match="scores"):
        filter_instances({"masks": masks, "labels": np.zeros(4, int), "scores": np.zeros(3)}, ExportConfig())


def test_export_errors(demo, tmp_path):
    cfg_ds, ds = demo
    preds, _ = _synthetic_predictions(ds)
    missing = dict(preds)
    missing.pop(ds.ids[-1])
    with pytest.raises(ArtifactError, match=ds.ids[-1]):
        run(ExportConfig(), cfg_ds, "train", missing, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(ArtifactError, match="does not exist"):
        run(ExportConfig(), cfg_ds, "train", tmp_path / "nope.h5", tmp_path / "x.json")
    with pytest.raises(ConfigError, match="score_threshold"):
        ExportConfig(score_threshold=1.5)


@pytest.mark.skipif(not (SHARED / "coco128").is_dir(), reason=f"real data not found at {SHARED}/coco128")
def test_export_coco_keeps_original_category_ids(tmp_path):
    """On coco128: GT instances of a few images exported as pseudo labels keep COCO's category ids."""
    cfg_ds = {"format": "coco", "ann_file": str(SHARED / "coco128/annotations/instances_train.json"),
              "image_dir": str(SHARED / "coco128/images")}
    ds = build_dataset(cfg_ds, "train")
    ids = [i for i in ds.ids if len(ds.labels(i))][:3]

    class Few:  # the first 3 images with annotations of the real dataset
        def __init__(self, base):
            self.base, self.ids = base, ids
            self.num_classes, self.class_names = base.num_classes, base.class_names

        def __getattr__(self, name):
            return getattr(self.base, name)

    few = Few(ds)
    preds = {}
    for i in ids:
        gt = ds.instances_gt(i)
        keep = ~gt["iscrowd"]
        n = int(keep.sum())
        preds[i] = {"masks": gt["masks"][keep], "labels": gt["labels"][keep], "scores": np.linspace(1.0, 0.5, n)}
    out = tmp_path / "coco_pseudo.json"
    run(ExportConfig(score_threshold=0.0, min_area=0), cfg_ds, "train", preds, out, dataset=few)
    coco = _load_coco(out)
    assert [c["id"] for c in coco.dataset["categories"]] == category_ids(ds) == ds.cat_ids
    assert max(ds.cat_ids) > ds.num_classes  # COCO ids have gaps: not 1..C
    assert_dataset_fields(json.loads(out.read_text()), ds.class_names, ds.cat_ids)
    assert [im["id"] for im in coco.dataset["images"]] == [int(i) for i in ids]  # COCO keeps its image ids
    supers = [ds.coco.cats[c]["supercategory"] for c in ds.cat_ids]
    assert [c["supercategory"] for c in coco.dataset["categories"]] == supers
    # the pseudo labels (here: the GT masks) score AP 1 against the original annotation file on these images
    gt = _load_coco(SHARED / "coco128/annotations/instances_train.json")
    assert segm_stats(gt, coco.dataset["annotations"], [int(i) for i in ids])[0] == pytest.approx(1.0)
    for img in coco.dataset["images"]:
        gt_anns = [a for a in ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[int(img["image_key"])])) if not a["iscrowd"]]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        assert sorted(a["category_id"] for a in anns) == sorted(a["category_id"] for a in gt_anns if
                                                               ds.coco.annToMask(a).sum() > 0)
        for a in anns:
            rle = a["segmentation"]
            assert mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()}) == a["area"]
