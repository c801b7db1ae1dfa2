"""The final report: metrics table, self-contained HTML page, figures."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

from bestie.data import build_dataset, generate_demo_dataset
from bestie.data.demo import DEMO_CLASSES
from bestie.io.coco_json import instances_to_coco_results, write_coco_results
from bestie.io.h5store import H5Writer
from bestie.report.figures import draw_instances, instance_colors, loss_curve_png, overlay_panel
from bestie.stages import report as rp

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CAMS = {"best_mIoU": 20.64, "best_threshold": 0.35, "miou_per_threshold": [10.0, 20.64]}
WSSS = {"mIoU": 31.25, "method": "crf"}
BESTIE = {"split": "train", "mAP25": 0.5012, "mAP50": 0.4567, "mAP70": 0.2, "mAP75": 0.15, "voc": {}}
MASKRCNN = {"split": "val", "mAP25": 0.61, "mAP50": 0.5349, "mAP70": 0.3, "mAP75": None, "AP": 0.2871,
            "AP50": 0.4, "AP75": 0.25,
            "per_class": [{"class": "disc", "num_gt": 3, "AP25": 0.75, "AP50": 0.5, "AP70": 0.0, "AP75": 0.0,
                           "coco_AP": 0.123}],
            "pr_curve": {"iou": 0.5, "recall": list(np.linspace(0, 1, 101)),
                         "precision": [1.0] * 50 + [0.5] * 51,
                         "per_class": [{"name": "disc", "precision": [1.0] * 50 + [0.5] * 51}],
                         "source": "test"}}


def test_summarize_units():
    s = rp.summarize_metrics(MASKRCNN)
    assert s["mAP50"] == pytest.approx(53.49) and s["AP"] == pytest.approx(28.71)
    assert s["mAP75"] is None and s["mIoU"] is None and s["split"] == "val"
    assert rp.summarize_metrics(CAMS)["mIoU"] == pytest.approx(20.64)  # percent already: unchanged
    assert rp.summarize_metrics(WSSS)["mIoU"] == pytest.approx(31.25)


def test_metrics_table_values(tmp_path):
    path = tmp_path / "bestie.json"
    path.write_text(json.dumps(BESTIE))
    text = rp.metrics_table({"maskrcnn": MASKRCNN, "bestie": path, "wsss": tmp_path / "absent.json",
                             "cams_dense": CAMS})
    lines = text.splitlines()
    # known stages in pipeline order, whatever the input order
    body = lines[3:]
    assert [ln.split("  ")[0].strip() for ln in body] == [
        "CAMs (dense classifier)", "WSSS maps", "BESTIE instances (pseudo labels)", "Mask R-CNN"]
    cams, wsss, bestie, mrcnn = body
    assert "20.6" in cams and "(missing)" in wsss
    assert re.search(r"train\s+-\s+50\.1\s+45\.7\s+20\.0\s+15\.0\s+-\s+-\s+-$", bestie), bestie
    assert re.search(r"val\s+-\s+61\.0\s+53\.5\s+30\.0\s+-\s+28\.7\s+40\.0\s+25\.0$", mrcnn), mrcnn
    # the combined form (as written by run_workflow_report) prints the same table
    combined = {"stages": rp.collect_metrics({"bestie": path})}
    assert rp.metrics_table(combined) == rp.metrics_table({"bestie": path})


def test_draw_instances_blends_mask_colour():
    img = np.full((30, 40, 3), 100, np.uint8)
    m = np.zeros((1, 30, 40), bool)
    m[0, 5:25, 5:35] = True
    out = draw_instances(img, {"masks": m, "labels": np.array([0])}, ["thing"], alpha=0.5)
    color = instance_colors(1)[0].astype(np.float64)
    expected = np.clip(np.round(100 * 0.5 + color * 0.5), 0, 255)
    np.testing.assert_allclose(out[15, 20].astype(float), expected, atol=1)  # inside, away from edge and tag
    np.testing.assert_array_equal(out[0, 39], [100, 100, 100])                # outside: untouched
    assert out[24, 20].tolist() == color.astype(np.uint8).tolist()  # outline (bottom edge) in the colour
    assert np.array_equal(draw_instances(img, None, []), img)
    panel = overlay_panel(img, {"masks": m, "labels": np.array([0]), "scores": np.array([0.9])},
                          {"masks": m, "labels": np.array([0])}, ["thing"])
    # small image enlarged x8: the largest integer factor with 40 * f <= 320 (and 2 * 40 * f + 4 <= 720)
    assert panel.shape == (30 * 8, (40 + 40) * 8 + 4, 3)
    np.testing.assert_array_equal(panel[:, 320:324], 255)  # the white gap between GT and prediction


def test_loss_curve_needs_loss_values():
    assert loss_curve_png([{"iteration": 1, "lr": 0.1}], "x") is None
    png = loss_curve_png([{"iteration": i, "loss": 1.0 / i, "loss_mask": "nan"} for i in range(1, 5)], "x")
    assert png.startswith(PNG_MAGIC)


def test_run_writes_self_contained_html(tmp_path):
    logp = tmp_path / "train_log.jsonl"
    logp.write_text("\n".join(json.dumps({"iteration": i, "loss": 2.0 / i, "loss_mask": 1.0 / i}) for i in range(1, 6))
                    + "\n{truncated")
    img = np.zeros((50, 60, 3), np.uint8)
    m = np.zeros((1, 50, 60), bool)
    m[0, 10:30, 10:40] = True
    inst = {"masks": m, "labels": np.array([0]), "scores": np.array([0.8])}
    out = tmp_path / "report.html"
    combined = rp.run({"maskrcnn": MASKRCNN, "bestie": BESTIE, "wsss": tmp_path / "none.json"},
                      {"Mask R-CNN": logp}, [("img 1", img, inst, inst, ["disc"]), (img, inst, None)], out,
                      info={"run": "unit"})
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "unit" in page
    for value in ("53.5", "28.7", "45.7", "61.0"):  # table values in percent
        assert f">{value}<" in page
    assert "missing" in page and "Per class: Mask R-CNN" in page and ">12.3<" in page  # coco_AP 0.123
    assert "src=\"http" not in page and "<script" not in page  # nothing external
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 4  # loss curve, PR curve, 2 overlays
    assert all(base64.b64decode(b).startswith(PNG_MAGIC) for b in images)
    assert combined["stages"]["maskrcnn"]["mAP50"] == pytest.approx(53.49)
    assert combined["stages"]["wsss"]["missing"] is True
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_run_workflow_report_on_demo(tmp_path):
    root = generate_demo_dataset(tmp_path / "demo", num_train=2, num_val=2, image_size=(64, 64))
    cfg = {"format": "voc", "root": str(root), "classes": list(DEMO_CLASSES), "train_split": "train",
           "eval_split": "val"}
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    with H5Writer(tmp_path / "inst.h5") as w:  # "predictions" = GT
        for i in train.ids:
            gt = train.instances_gt(i)
            w.write(i, masks=gt["masks"], labels=gt["labels"], scores=np.ones(len(gt["labels"]), np.float32))
    results = []
    for k, i in enumerate(val.ids, start=1):
        gt = val.instances_gt(i)
        recs = instances_to_coco_results(k, {**gt, "scores": np.full(len(gt["labels"]), 0.7)}, lambda c: c + 1)
        results += [{**r, "image_key": i} for r in recs]
    write_coco_results(tmp_path / "preds.json", results)
    (tmp_path / "mrcnn.json").write_text(json.dumps(MASKRCNN))
    inputs = {"maskrcnn": tmp_path / "mrcnn.json", "bestie": tmp_path / "missing.json",
              "maskrcnn_log": tmp_path / "nolog.jsonl", "instances": tmp_path / "inst.h5",
              "predictions": tmp_path / "preds.json"}
    combined = rp.run_workflow_report("demo", cfg, inputs, tmp_path / "r.html", tmp_path / "metrics.json")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(combined)) and saved["run"] == "demo"
    assert "53.5" in rp.metrics_table(saved)
    page = (tmp_path / "r.html").read_text()
    assert "Mask R-CNN on val" in page and "BESTIE pseudo labels on train" in page
    assert "maskrcnn training: no loss records" in page
    # 2 + 2 overlays and a PR curve
    assert len(re.findall(r"data:image/png;base64,", page)) == 5
