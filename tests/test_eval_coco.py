"""Tests of bestie.evaluation.coco: COCOeval segm on small synthetic and real COCO data."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from bestie.errors import DataError
from bestie.evaluation.coco import coco_segm_eval
from bestie.io.coco_json import make_annotation, write_coco_dataset

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"


def _square(y, x, s, size=200):
    m = np.zeros((size, size), bool)
    m[y : y + s, x : x + s] = True
    return m


@pytest.fixture
def coco_gt(tmp_path) -> COCO:
    # areas: 20x20 = 400 and 15x15 = 225 are small (< 32^2), 50x50 = 2500 medium, 110x110 = 12100 large
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 200, "width": 200} for i in (1, 2)]
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 5, "name": "no_gt"}]
    anns = [
        make_annotation(1, 1, 1, _square(10, 10, 20)),  # a, small
        make_annotation(2, 1, 2, _square(60, 60, 50)),  # b, medium
        make_annotation(3, 2, 1, _square(5, 5, 110)),  # a, large
        make_annotation(4, 2, 2, _square(150, 150, 15)),  # b, small
    ]
    path = tmp_path / "gt.json"
    write_coco_dataset(path, images, anns, categories)
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _as_results(coco: COCO, ann_ids) -> list[dict]:
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"], "score": 1.0}
        for a in coco.loadAnns(list(ann_ids))
    ]


def test_gt_against_itself_is_ap_one(coco_gt, caplog):
    results = _as_results(coco_gt, coco_gt.getAnnIds())
    before = [dict(r) for r in results]
    with caplog.at_level(logging.INFO, logger="bestie.evaluation.coco"):
        r = coco_segm_eval(coco_gt, results)
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert r[key] == pytest.approx(1.0), key
    assert r["per_class"] == [
        {"category_id": 1, "name": "a", "AP": pytest.approx(1.0)},
        {"category_id": 2, "name": "b", "AP": pytest.approx(1.0)},
        {"category_id": 5, "name": "no_gt", "AP": None},
    ]
    assert r["num_results"] == 4
    assert results == before  # the caller's records are not modified by loadRes
    assert "Average Precision" in caplog.text


def test_half_recall_hand_checked(coco_gt):
    # category a: 2 GT, only the small one (ann 1) detected -> precision 1 up to recall 0.5, then 0.
    # COCO interpolates at 101 recall points 0, 0.01, .., 1: the 51 points <= 0.5 get precision 1
    # -> AP(a) = 51/101 at every IoU threshold; AP(b) = 1; AP = mean = (51/101 + 1) / 2.
    # By area: small: a 1/1 found, b 1/1 found -> APs 1; medium: only b -> APm 1;
    # large: only a, missed -> APl 0.
    r = coco_segm_eval(coco_gt, _as_results(coco_gt, [1, 2, 4]))
    assert r["per_class"][0]["AP"] == pytest.approx(51 / 101)
    assert r["per_class"][1]["AP"] == pytest.approx(1.0)
    assert r["AP"] == pytest.approx((51 / 101 + 1) / 2)
    assert r["AP50"] == pytest.approx((51 / 101 + 1) / 2)
    assert (r["APs"], r["APm"], r["APl"]) == (pytest.approx(1.0), pytest.approx(1.0), pytest.approx(0.0))


def test_empty_results_zero_with_warning(coco_gt, caplog):
    with caplog.at_level(logging.WARNING, logger="bestie.evaluation.coco"):
        r = coco_segm_eval(coco_gt, [])
    assert all(r[k] == 0.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
    assert [c["AP"] for c in r["per_class"]] == [0.0, 0.0, 0.0] and r["num_results"] == 0
    assert "no detections" in caplog.text


def test_unknown_image_or_missing_key(coco_gt):
    res = _as_results(coco_gt, [1])
    with pytest.raises(DataError, match="not in the GT"):
        coco_segm_eval(coco_gt, [dict(res[0], image_id=99)])
    bad = dict(res[0])
    del bad["score"]
    with pytest.raises(DataError, match="lacks 'score'"):
        coco_segm_eval(coco_gt, [bad])


@pytest.mark.skipif(not DATA.is_dir(), reason=f"real data folder {DATA} is absent")
def test_real_coco128_gt_against_itself():
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(DATA / "annotations" / "instances_train.json"))
    results = []
    for ann in coco.loadAnns(coco.getAnnIds(iscrowd=False)):
        rle = coco.annToRLE(ann)  # polygons -> RLE, as the pipeline's results carry RLE with str counts
        counts = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                        "segmentation": {"size": rle["size"], "counts": counts}, "score": 1.0})
    r = coco_segm_eval(coco, results)
    assert r["AP"] == pytest.approx(1.0) and r["AP50"] == pytest.approx(1.0) and r["AP75"] == pytest.approx(1.0)
    with_gt = {c for c in coco.getCatIds() if coco.getAnnIds(catIds=[c])}
    assert len(with_gt) == 71  # data/README.md: 71 of the 80 categories have instances
    for c in r["per_class"]:
        assert (c["AP"] == pytest.approx(1.0)) if c["category_id"] in with_gt else (c["AP"] is None)
