"""Tests of bestie.evaluation.semantic: confusion-matrix mIoU with 255 ignored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bestie.errors import DataError
from bestie.evaluation.semantic import SemanticEvaluator

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128-voc"

GT = np.array([[0, 1, 1], [2, 255, 0]], np.uint8)
PRED = np.array([[0, 1, 2], [2, 0, 1]], np.int64)


def test_hand_checked_scores():
    # valid pixels (gt, pred): (0,0) (1,1) (1,2) (2,2) (0,1); the 255 pixel is skipped
    # confusion[g, p]: [0,0]=1 [0,1]=1 [1,1]=1 [1,2]=1 [2,2]=1
    # IoU0 = 1 / (2 + 1 - 1) = 1/2; IoU1 = 1 / (2 + 2 - 1) = 1/3; IoU2 = 1 / (1 + 2 - 1) = 1/2
    # foreground: predicted fg 4 px, GT fg 3 px, both fg 3 px -> precision 3/4, recall 1
    ev = SemanticEvaluator(3)
    ev.update(PRED, GT)
    np.testing.assert_array_equal(ev.confusion, [[1, 1, 0], [0, 1, 1], [0, 0, 1]])
    r = ev.evaluate()
    assert r["IoU"] == pytest.approx([50.0, 100 / 3, 50.0])
    assert r["mIoU"] == pytest.approx((50 + 100 / 3 + 50) / 3)
    assert r["precision_fg"] == pytest.approx(75.0)
    assert r["recall_fg"] == pytest.approx(100.0)
    assert r["pixel_accuracy"] == pytest.approx(60.0)


def test_absent_class_is_none_and_left_out_of_mean():
    ev = SemanticEvaluator(5)  # labels 3 and 4 appear nowhere
    ev.update(PRED, GT)
    r = ev.evaluate()
    assert r["IoU"][3] is None and r["IoU"][4] is None
    assert r["mIoU"] == pytest.approx((50 + 100 / 3 + 50) / 3)


def test_streaming_equals_sum_and_reset():
    ev = SemanticEvaluator(3)
    ev.update(PRED, GT)
    ev.update(np.zeros((2, 2), np.int64), np.array([[0, 0], [1, 255]], np.uint8))
    # adds [0,0] += 2 and [1,0] += 1
    np.testing.assert_array_equal(ev.confusion, [[3, 1, 0], [1, 1, 1], [0, 0, 1]])
    # IoU0 = 3 / (4 + 4 - 3) = 3/5; IoU1 = 1 / (3 + 2 - 1) = 1/4; IoU2 = 1 / (1 + 2 - 1) = 1/2
    assert ev.evaluate()["IoU"] == pytest.approx([60.0, 25.0, 50.0])
    ev.reset()
    assert ev.confusion.sum() == 0 and ev.evaluate()["mIoU"] is None


def test_bad_input():
    ev = SemanticEvaluator(3)
    with pytest.raises(ValueError, match=r"pred labels must be in \[0, 2\]"):
        ev.update(np.array([[3]]), np.array([[0]], np.uint8))
    with pytest.raises(DataError, match="pred labels"):
        ev.update(np.array([[-1]]), np.array([[0]], np.uint8))
    with pytest.raises(DataError, match=r"gt labels .* \[7\]"):
        ev.update(np.array([[0, 0]]), np.array([[7, 255]], np.uint8))
    with pytest.raises(DataError, match="same size"):
        ev.update(np.zeros((2, 3), np.int64), np.zeros((3, 2), np.uint8))
    with pytest.raises(DataError, match="integer"):
        ev.update(np.zeros((2, 2)), np.zeros((2, 2), np.uint8))
    assert ev.confusion.sum() == 0
    with pytest.raises(ValueError):
        SemanticEvaluator(1)


@pytest.mark.skipif(not DATA.is_dir(), reason=f"real data folder {DATA} is absent")
def test_real_gt_against_itself_and_all_background():
    from PIL import Image

    ids = (DATA / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:10]
    ev_self, ev_bg = SemanticEvaluator(21), SemanticEvaluator(21)
    present = np.zeros(21, bool)
    for image_id in ids:
        gt = np.array(Image.open(DATA / "SegmentationClass" / f"{image_id}.png"))
        assert gt.dtype == np.uint8 and set(np.unique(gt)) <= set(range(21)) | {255}
        present[np.unique(gt[gt != 255])] = True
        ev_self.update(np.where(gt == 255, 0, gt), gt)
        ev_bg.update(np.zeros_like(gt), gt)
    r = ev_self.evaluate()
    assert r["mIoU"] == pytest.approx(100.0)
    assert [v is not None for v in r["IoU"]] == present.tolist()
    # all-background prediction: IoU(bg) = bg pixels / all valid pixels, every other class 0
    rb = ev_bg.evaluate()
    cm = ev_self.confusion
    assert rb["IoU"][0] == pytest.approx(100 * cm[0, 0] / cm.sum())
    assert all(v == 0.0 for v, p in zip(rb["IoU"][1:], present[1:]) if p)
    assert rb["precision_fg"] is None and rb["recall_fg"] == 0.0
