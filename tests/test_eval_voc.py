"""Tests of bestie.evaluation.voc: VOC instance AP (chainercv protocol, METHOD.md "Evaluation protocol").

Masks are built on a 1 x W strip of pixels, so overlaps and IoUs are plain interval arithmetic.
Expected APs are computed by hand in the comments with the VOC2010+ rule: precision envelope
p_env(r) = max precision at recall >= r, AP = sum over recall steps of (delta recall) * p_env.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from bestie.errors import DataError
from bestie.evaluation.voc import VOCInstanceEvaluator, eval_instance_segmentation_voc, mask_iou, voc_ap

W = 20
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128-voc"


def strip(*ranges: tuple[int, int]) -> np.ndarray:
    """(1, W) bool mask with pixels [a, b) of each range set."""
    m = np.zeros((1, W), bool)
    for a, b in ranges:
        m[0, a:b] = True
    return m


def pred(masks, labels, scores):
    return {"masks": np.stack(masks) if masks else np.zeros((0, 1, W), bool),
            "labels": np.asarray(labels, np.int64), "scores": np.asarray(scores, np.float32)}


def gt(masks, labels):
    return {"masks": np.stack(masks) if masks else np.zeros((0, 1, W), bool), "labels": np.asarray(labels, np.int64)}


# ---------------------------------------------------------------- mask_iou

def test_mask_iou_hand_values():
    a = np.stack([strip((0, 4)), strip((0, 3)), strip(), strip((10, 20))])
    b = np.stack([strip((2, 6)), strip((0, 4)), strip()])
    iou = mask_iou(a, b)
    expected = np.array([
        [2 / 6, 1.0, 0.0],  # [0,4) vs [2,6): inter 2, union 6
        [1 / 6, 3 / 4, 0.0],  # [0,3) vs [2,6): inter 1 (px 2), union 6 (px 0..5)
        [0.0, 0.0, 0.0],  # empty vs anything: 0 (two empty masks: union 0 -> 0)
        [0.0, 0.0, 0.0],
    ])
    assert iou.dtype == np.float64 and iou.shape == (4, 3)
    np.testing.assert_array_equal(iou, expected)
    assert mask_iou(a[:0], b).shape == (0, 3)


def test_mask_iou_matches_bruteforce_on_random_masks():
    rng = np.random.default_rng(0)
    for shape, n, m in [((37, 91), 7, 3), ((1, 64), 2, 5), ((8, 8), 4, 4), ((375, 500), 3, 9)]:
        a = rng.random((n, *shape)) < rng.random((n, 1, 1))
        b = rng.random((m, *shape)) < rng.random((m, 1, 1))
        ref = np.array([[(x & y).sum() / (x | y).sum() for y in b] for x in a])
        np.testing.assert_allclose(mask_iou(a, b), ref, rtol=0, atol=1e-15)


def test_mask_iou_bad_shapes():
    with pytest.raises(DataError):
        mask_iou(np.zeros((2, 3, 4), bool), np.zeros((2, 3, 5), bool))
    with pytest.raises(DataError):
        mask_iou(np.zeros((3, 4), bool), np.zeros((2, 3, 4), bool))


# ---------------------------------------------------------------- voc_ap

def test_voc_ap_hand_values():
    # TP FP TP FP with 3 GT: precision 1, 1/2, 2/3, 1/2; recall 1/3, 1/3, 2/3, 2/3
    # envelope: 1 on (0, 1/3], 2/3 on (1/3, 2/3], 0 after -> AP = 1/3 + 2/9 = 5/9
    assert voc_ap(np.array([1, 0, 1, 0], bool), 3) == pytest.approx(5 / 9, abs=1e-12)
    assert voc_ap(np.array([], bool), 2) == 0.0
    assert voc_ap(np.array([0, 0], bool), 2) == 0.0
    assert voc_ap(np.array([1, 0], bool), 0) is None
    assert voc_ap(np.array([1, 1], bool), 2) == 1.0


# ---------------------------------------------------------------- evaluator, hand-built cases

def test_iou_exactly_at_thresholds_counts_as_tp():
    ev = VOCInstanceEvaluator(3)
    # class 0: GT [0,3), det [1,4): inter 2, union 4 -> IoU 0.5 exactly
    # class 1: GT [5,9), det [5,8): inter 3, union 4 -> IoU 0.75 exactly
    # class 2: GT [10,20), det [10,17): inter 7, union 10 -> IoU 0.7 exactly
    ev.update(pred([strip((1, 4)), strip((5, 8)), strip((10, 17))], [0, 1, 2], [0.9, 0.8, 0.7]),
              gt([strip((0, 3)), strip((5, 9)), strip((10, 20))], [0, 1, 2]))
    r = ev.evaluate()
    # one GT and one detection per class: AP 1 when TP (IoU >= t), 0 when FP
    assert r["per_class"] == {
        "0.25": [1.0, 1.0, 1.0],
        "0.5": [1.0, 1.0, 1.0],
        "0.7": [0.0, 1.0, 1.0],
        "0.75": [0.0, 1.0, 0.0],
    }
    assert r["mAP25"] == 1.0 and r["mAP50"] == 1.0
    assert r["mAP70"] == pytest.approx(2 / 3) and r["mAP75"] == pytest.approx(1 / 3)
    assert r["num_gt"] == [1, 1, 1] and r["num_pred"] == [1, 1, 1] and r["num_images"] == 1
    json.dumps(r)


def test_duplicate_detection_is_fp():
    # class 0, GT A=[0,4), B=[10,14). d1 = A (0.9), d2 = A again (0.8), d3 = B (0.7)
    # order TP, FP, TP; precision 1, 1/2, 2/3; recall 1/2, 1/2, 1
    # envelope: 1 on (0, 1/2], 2/3 on (1/2, 1] -> AP = 1/2 + 1/2 * 2/3 = 5/6
    ev = VOCInstanceEvaluator(1)
    ev.update(pred([strip((0, 4)), strip((0, 4)), strip((10, 14))], [0, 0, 0], [0.9, 0.8, 0.7]),
              gt([strip((0, 4)), strip((10, 14))], [0, 0]))
    r = ev.evaluate()
    for t in ("0.25", "0.5", "0.7", "0.75"):
        assert r["per_class"][t][0] == pytest.approx(5 / 6, abs=1e-12)


def test_best_gt_taken_no_fallback_to_second_gt():
    # class 0, GT A=[0,4), B=[4,8).
    # d1 = [0,4) score 0.9: IoU(A) = 1
    # d2 = [0,6) score 0.8: IoU(A) = 4/6, IoU(B) = 2/8 = 0.25 -> best is A, already taken -> FP
    #   (a wrong fallback to B would make it a TP at t = 0.25)
    # d3 = [4,8) score 0.7: IoU(B) = 1 -> TP
    # every threshold: TP, FP, TP with 2 GT -> AP = 5/6 (see test_duplicate_detection_is_fp)
    # with the wrong fallback at 0.25: TP, TP, FP -> AP 1
    ev = VOCInstanceEvaluator(1)
    ev.update(pred([strip((0, 4)), strip((0, 6)), strip((4, 8))], [0, 0, 0], [0.9, 0.8, 0.7]),
              gt([strip((0, 4)), strip((4, 8))], [0, 0]))
    r = ev.evaluate()
    assert r["per_class"]["0.25"][0] == pytest.approx(5 / 6, abs=1e-12)
    assert r["per_class"]["0.5"][0] == pytest.approx(5 / 6, abs=1e-12)


def test_best_gt_taken_and_no_other_detection():
    # as above without d3: TP, FP with 2 GT -> precision 1, 1/2; recall 1/2, 1/2 -> AP = 1/2
    ev = VOCInstanceEvaluator(1)
    ev.update(pred([strip((0, 4)), strip((0, 6))], [0, 0], [0.9, 0.8]),
              gt([strip((0, 4)), strip((4, 8))], [0, 0]))
    assert ev.evaluate()["per_class"]["0.25"] == [0.5]


def test_detection_only_matches_gt_of_its_class():
    # the class-1 detection covers the class-0 GT exactly but is of class 1 -> FP, class 0 has no detection
    ev = VOCInstanceEvaluator(2)
    ev.update(pred([strip((0, 4))], [1], [0.9]), gt([strip((0, 4)), strip((6, 9))], [0, 1]))
    r = ev.evaluate()
    assert r["per_class"]["0.5"] == [0.0, 0.0] and r["mAP50"] == 0.0


def test_multi_image_accumulation():
    # class 0, 3 GT over two images; scores over both images: 0.9 TP (img1), 0.8 FP (img2),
    # 0.7 TP (img2), 0.6 FP (img1) -> TP FP TP FP with 3 GT -> AP = 5/9 (see test_voc_ap_hand_values)
    ev = VOCInstanceEvaluator(1, iou_thresholds=(0.5,))
    ev.update(pred([strip((0, 4)), strip((15, 19))], [0, 0], [0.9, 0.6]),
              gt([strip((0, 4)), strip((8, 12))], [0, 0]))
    ev.update(pred([strip((10, 12)), strip((0, 5))], [0, 0], [0.8, 0.7]),
              gt([strip((0, 5))], [0]))
    r = ev.evaluate()
    assert list(r) == ["mAP50", "per_class", "num_gt", "num_pred", "num_images"]
    assert r["mAP50"] == pytest.approx(5 / 9, abs=1e-12)
    assert r["num_gt"] == [3] and r["num_pred"] == [4] and r["num_images"] == 2


def test_ties_across_images_later_image_first_as_chainercv():
    # chainercv sorts with score.argsort()[::-1]: among equal scores the later entry comes first.
    # image 1: one GT, a matching detection (TP) at 0.5; image 2: one GT, a missing detection (FP) at 0.5
    # order FP (img2), TP (img1), 2 GT: precision 0, 1/2; recall 0, 1/2
    # envelope 1/2 on (0, 1/2] -> AP = 1/2 * 1/2 = 1/4
    tp_img = (pred([strip((0, 4))], [0], [0.5]), gt([strip((0, 4))], [0]))
    fp_img = (pred([strip((15, 19))], [0], [0.5]), gt([strip((0, 4))], [0]))
    ev = VOCInstanceEvaluator(1, iou_thresholds=(0.5,))
    ev.update(*tp_img)
    ev.update(*fp_img)
    assert ev.evaluate()["mAP50"] == pytest.approx(0.25, abs=1e-12)
    # images the other way round: TP first, precision 1, 1/2; recall 1/2, 1/2 -> AP = 1/2
    ev.reset()
    ev.update(*fp_img)
    ev.update(*tp_img)
    assert ev.evaluate()["mAP50"] == pytest.approx(0.5, abs=1e-12)


def test_ties_within_image_as_chainercv():
    # one GT [0,4); two detections with equal score: index 0 = [0,6) (IoU 4/6), index 1 = [0,4) (IoU 1).
    # chainercv per image: argsort()[::-1] -> index 1 first; across images argsort()[::-1] reverses the
    # tie again -> evaluation order index 0, index 1.
    # t = 0.5: index 1 takes the GT first (TP), index 0 finds it taken (FP); order FP, TP, 1 GT:
    #   precision 0, 1/2; recall 0, 1 -> AP = 1 * 1/2 = 1/2
    # t = 0.75: index 0 misses (4/6 < 0.75, FP), index 1 TP; same order FP, TP -> AP = 1/2
    ev = VOCInstanceEvaluator(1, iou_thresholds=(0.5, 0.75))
    ev.update(pred([strip((0, 6)), strip((0, 4))], [0, 0], [0.5, 0.5]), gt([strip((0, 4))], [0]))
    r = ev.evaluate()
    assert r["mAP50"] == pytest.approx(0.5) and r["mAP75"] == pytest.approx(0.5)


def test_no_detections_at_all():
    # classes 0 and 2 have GT and no detection -> AP 0; class 1 has no GT -> None, not in the mean
    ev = VOCInstanceEvaluator(3)
    ev.update(pred([], [], []), gt([strip((0, 4)), strip((5, 9))], [0, 2]))
    ev.update(pred([], [], []), gt([strip((0, 4))], [2]))
    r = ev.evaluate()
    assert r["per_class"]["0.5"] == [0.0, None, 0.0]
    assert r["mAP50"] == 0.0 and r["num_gt"] == [1, 0, 2] and r["num_pred"] == [0, 0, 0]
    out = eval_instance_segmentation_voc(
        [pred([], [], [])], [gt([strip((0, 4)), strip((5, 9))], [0, 2])], num_classes=3)
    np.testing.assert_array_equal(out["ap"], [0.0, np.nan, 0.0])
    assert out["map"] == 0.0


def test_class_absent_from_gt_is_none_and_left_out():
    # class 0: perfect (AP 1); class 1: only a false detection, no GT -> None; mean = 1
    ev = VOCInstanceEvaluator(2)
    ev.update(pred([strip((0, 4)), strip((10, 14))], [0, 1], [0.3, 0.9]), gt([strip((0, 4))], [0]))
    r = ev.evaluate()
    assert r["per_class"]["0.5"] == [1.0, None]
    assert r["mAP50"] == 1.0 and r["num_pred"] == [1, 1]


def test_no_gt_at_all_gives_none_means():
    ev = VOCInstanceEvaluator(2)
    ev.update(pred([strip((0, 4))], [1], [0.3]), gt([], []))
    r = ev.evaluate()
    assert r["mAP50"] is None and r["per_class"]["0.5"] == [None, None]
    assert VOCInstanceEvaluator(2).evaluate()["mAP25"] is None


def test_bad_input_raises():
    ev = VOCInstanceEvaluator(2)
    with pytest.raises(DataError, match="labels"):
        ev.update(pred([strip((0, 4))], [2], [0.3]), gt([], []))
    with pytest.raises(DataError, match="NaN"):
        ev.update(pred([strip((0, 4))], [0], [np.nan]), gt([], []))
    with pytest.raises(DataError, match="lacks 'scores'"):
        ev.update({"masks": np.zeros((0, 1, W), bool), "labels": np.zeros(0, np.int64)}, gt([], []))
    with pytest.raises(DataError, match="gt masks"):
        ev.update(pred([strip((0, 4))], [0], [0.3]), {"masks": np.ones((1, 2, W), bool), "labels": np.array([0])})
    with pytest.raises(DataError, match="predictions but"):
        eval_instance_segmentation_voc([pred([], [], [])], [])
    assert ev.num_images == 0


# ---------------------------------------------------------------- cross-check on random data

def _reference_chainercv(preds, gts, thresh, num_classes):
    """Literal per-class re-statement of chainercv's algorithm (loops), for cross-checking."""
    n_pos, score, match = defaultdict(int), defaultdict(list), defaultdict(list)
    for p, g in zip(preds, gts):
        for c in np.unique(np.concatenate([p["labels"], g["labels"]])):
            keep = p["labels"] == c
            pm, ps = p["masks"][keep], p["scores"][keep]
            order = np.argsort(ps, kind="stable")[::-1]
            pm, ps = pm[order], ps[order]
            gm = g["masks"][g["labels"] == c]
            n_pos[c] += len(gm)
            score[c].extend(ps.tolist())
            taken = np.zeros(len(gm), bool)
            for mask in pm:
                if len(gm) == 0:
                    match[c].append(0)
                    continue
                ious = [(mask & x).sum() / max((mask | x).sum(), 1) for x in gm]
                j = int(np.argmax(ious))
                if ious[j] >= thresh and not taken[j]:
                    match[c].append(1)
                    taken[j] = True
                else:
                    if ious[j] >= thresh:
                        taken[j] = True
                    match[c].append(0)
    aps = []
    for c in range(num_classes):
        if n_pos[c] == 0:
            aps.append(np.nan)
            continue
        s = np.array(score[c])
        mt = np.array(match[c], dtype=int)[np.argsort(s, kind="stable")[::-1]]
        tp, fp = np.cumsum(mt == 1), np.cumsum(mt == 0)
        prec = tp / np.maximum(tp + fp, 1)
        rec = tp / n_pos[c]
        mpre = np.concatenate(([0], prec, [0]))
        mrec = np.concatenate(([0], rec, [1]))
        for i in range(len(mpre) - 1, 0, -1):
            mpre[i - 1] = max(mpre[i - 1], mpre[i])
        ap = sum((mrec[i + 1] - mrec[i]) * mpre[i + 1] for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i])
        aps.append(ap)
    return np.array(aps)


def test_matches_reference_on_random_images():
    rng = np.random.default_rng(7)
    c, h, w = 4, 24, 30
    preds, gts = [], []
    for _ in range(40):
        m = rng.integers(0, 4)
        g_masks = np.zeros((m, h, w), bool)
        for k in range(m):
            y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
            g_masks[k, y:y + rng.integers(3, 9), x:x + rng.integers(3, 9)] = True
        g_labels = rng.integers(0, c, m)
        # predictions: jittered GT copies, duplicates, random boxes; scores quantised to make ties
        p_list, p_lab = [], []
        for k in range(m):
            for _ in range(rng.integers(0, 3)):
                p_list.append(np.roll(g_masks[k], rng.integers(-2, 3, size=2), axis=(0, 1)))
                p_lab.append(g_labels[k] if rng.random() < 0.8 else rng.integers(0, c))
        for _ in range(rng.integers(0, 3)):
            r = np.zeros((h, w), bool)
            y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
            r[y:y + 5, x:x + 5] = True
            p_list.append(r)
            p_lab.append(rng.integers(0, c))
        p_masks = np.stack(p_list) if p_list else np.zeros((0, h, w), bool)
        preds.append({"masks": p_masks, "labels": np.array(p_lab, np.int64),
                      "scores": (rng.integers(0, 5, len(p_list)) / 4).astype(np.float32)})
        gts.append({"masks": g_masks, "labels": g_labels.astype(np.int64)})
    ev = VOCInstanceEvaluator(c)
    for p, g in zip(preds, gts):
        ev.update(p, g)
    r = ev.evaluate()
    for t in (0.25, 0.5, 0.7, 0.75):
        ref = _reference_chainercv(preds, gts, t, c)
        ours = np.array([np.nan if a is None else a for a in r["per_class"][f"{t:g}"]])
        np.testing.assert_allclose(ours, ref, atol=1e-12)
        np.testing.assert_allclose(eval_instance_segmentation_voc(preds, gts, t, num_classes=c)["ap"], ref, atol=1e-12)
        assert r[f"mAP{round(t * 100)}"] == pytest.approx(np.nanmean(ref), abs=1e-12)


# ---------------------------------------------------------------- real data

def _load_voc_instances(image_id: str) -> dict:
    from PIL import Image

    obj = np.array(Image.open(DATA / "SegmentationObject" / f"{image_id}.png"))
    cls = np.array(Image.open(DATA / "SegmentationClass" / f"{image_id}.png"))
    ids = [i for i in np.unique(obj) if i not in (0, 255)]
    masks = np.stack([obj == i for i in ids]) if ids else np.zeros((0, *obj.shape), bool)
    labels = np.array([np.bincount(cls[obj == i]).argmax() - 1 for i in ids], np.int64)
    return {"masks": masks, "labels": labels}


@pytest.mark.skipif(not DATA.is_dir(), reason=f"real data folder {DATA} is absent")
def test_real_gt_against_itself_and_eroded():
    ids = (DATA / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    ev_self = VOCInstanceEvaluator(20)
    ev_miss = VOCInstanceEvaluator(20)
    n_gt = np.zeros(20, int)
    for image_id in ids:
        g = _load_voc_instances(image_id)
        assert g["labels"].min(initial=0) >= 0 and g["labels"].max(initial=0) < 20
        n_gt += np.bincount(g["labels"], minlength=20)
        scores = np.linspace(1.0, 0.5, len(g["labels"])).astype(np.float32)
        ev_self.update(dict(g, scores=scores), g)
        # drop every second instance: recall halves, precision stays 1
        keep = np.arange(len(g["labels"])) % 2 == 0
        ev_miss.update({"masks": g["masks"][keep], "labels": g["labels"][keep], "scores": scores[keep]}, g)
    r = ev_self.evaluate()
    assert r["num_gt"] == n_gt.tolist() and sum(r["num_gt"]) > 0
    for t in ("0.25", "0.5", "0.7", "0.75"):
        assert all((a == 1.0) if n else (a is None) for a, n in zip(r["per_class"][t], n_gt))
    assert r["mAP25"] == r["mAP75"] == 1.0
    # with precision 1 everywhere, AP = recall reached = kept / total per class
    r2 = ev_miss.evaluate()
    for a, kept, n in zip(r2["per_class"]["0.5"], r2["num_pred"], r2["num_gt"]):
        assert (a is None) if n == 0 else a == pytest.approx(kept / n)
