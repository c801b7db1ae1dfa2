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
from bestie.report.figures import draw_instances, instance_colors, loss_curve_png, overlay_panel, score_text, tag_boxes
from bestie.report.units import percent
from bestie.stages import report as rp

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CAMS = {"best_mIoU": 20.64, "best_threshold": 0.35, "miou_per_threshold": [10.0, 20.64]}
WSSS = {"mIoU": 31.25, "method": "crf"}
BESTIE = {"split": "train", "mAP25": 0.5012, "mAP50": 0.4567, "mAP70": 0.2, "mAP75": 0.15, "voc": {},
          "semantic_drift": 0.01234}
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
    assert re.search(r"train\s+-\s+50\.1\s+45\.7\s+20\.0\s+15\.0\s+-\s+-\s+-\s+1\.2$", bestie), bestie  # drift
    assert re.search(r"val\s+-\s+61\.0\s+53\.5\s+30\.0\s+-\s+28\.7\s+40\.0\s+25\.0\s+-$", mrcnn), mrcnn
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
    np.testing.assert_allclose(out[21, 20].astype(float), expected, atol=1)  # inside, below the tag, off the edge
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
    # BESTIE's records: named keys, only the "train" events (a start record with a config is no curve)
    bestie = [{"event": "start", "iteration": 0, "config": {"lr": 0.1}}] + [
        {"event": "train", "iteration": 20 * i, "seg": 1.0 / i, "center": 2.0 / i, "offset": 0.1, "total": 3.0 / i}
        for i in range(1, 4)] + [{"event": "end", "iterations": 60}]
    assert loss_curve_png(bestie, "BESTIE") is None  # no key containing "loss"
    assert loss_curve_png(bestie, "BESTIE", ("total", "seg", "center", "offset")).startswith(PNG_MAGIC)
    assert loss_curve_png(bestie[:1] + bestie[-1:], "BESTIE", ("total",)) is None


def test_percent_formats_fractions_and_percent_values():
    assert percent(0.2017827931458517) == "20.2" and percent(65.63263437516986, fraction=False) == "65.6"
    assert percent(None) == "n/a" and percent(float("nan"), missing="-") == "-" and percent(True) == "n/a"
    assert percent(1) == "100.0" and percent(0.00049) == "0.0"


def test_best_f1_threshold_by_hand():
    m = np.zeros((3, 10, 10), bool)
    m[0, :5, :5] = m[1, 5:, 5:] = m[2, :5, 5:] = True
    gt = {"masks": m[:2], "labels": np.array([0, 0])}
    # image 1: TP 0.9, FP 0.8 (no GT there), TP 0.4; image 2: one GT, a wrong-class detection 0.7
    pred1 = {"masks": m[[0, 2, 1]], "labels": np.array([0, 0, 0]), "scores": np.array([0.9, 0.8, 0.4])}
    pred2 = {"masks": m[:1], "labels": np.array([1]), "scores": np.array([0.7])}
    gt2 = {"masks": m[:1], "labels": np.array([0])}
    thr, info = rp.best_f1_threshold([(pred1, gt), (pred2, gt2)], num_classes=2)
    # by score: 0.9 TP, 0.8 FP, 0.7 FP, 0.4 TP; 3 GT: F1 = 2TP/(k+3) = 0.5, 0.4, 0.333, 0.571 -> k = 4
    assert thr == pytest.approx(0.4)
    assert info["f1"] == pytest.approx(4 / 7) and info["precision"] == 0.5 and info["recall"] == pytest.approx(2 / 3)
    assert info["num_detections"] == 4 and info["num_gt"] == 3 and info["num_images"] == 2
    none, info = rp.best_f1_threshold([(pred2, gt2)], num_classes=2)
    assert none is None and info["f1"] is None


def test_read_benchmarks_and_per_class_rows(tmp_path):
    head = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    (tmp_path / "train_bestie.tsv").write_text(head + "54.35\t0:00:54\t1366.04\t1\t1\t1\t1\t1\t149.2\t81.72\n")
    (tmp_path / "demo_data.tsv").write_text(head + "1.16\t0:00:01\tNA\t1\t1\t1\t1\t1\t1\t0.91\n")
    (tmp_path / "empty.tsv").write_text(head)
    import os
    os.utime(tmp_path / "demo_data.tsv", (1, 1))  # finished first
    rows = rp.read_benchmarks(tmp_path)
    assert rows == [{"job": "demo_data", "s": 1.16, "cpu_time": 0.91, "max_rss": None},
                    {"job": "train_bestie", "s": 54.35, "cpu_time": 81.72, "max_rss": 1366.04}]
    assert rp.read_benchmarks(tmp_path / "absent") == []
    voc = {"per_class": {"0.25": [0.5, None], "0.5": [0.25, None], "0.7": [0.0, None], "0.75": [0.0, None]},
           "num_gt": [4, 0]}
    rows = rp.per_class_rows({"voc": voc, "class_names": ["disc", "square"]})
    assert rows == [{"class": "disc", "num_gt": 4, "AP25": 0.5, "AP50": 0.25, "AP70": 0.0, "AP75": 0.0},
                    {"class": "square", "num_gt": 0, "AP25": None, "AP50": None, "AP70": None, "AP75": None}]
    assert rp.per_class_rows(MASKRCNN) == MASKRCNN["per_class"] and rp.per_class_rows({"voc": {}}) is None


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


def _results_dir(tmp_path):
    """A small results folder as the workflow leaves it, from the demo data: BESTIE instances = the GT of
    each train image (score 0.9) plus one false positive (score 0.3, a GT mask of another image), the Mask
    R-CNN predictions = the val GT (score 0.7), WSSS maps = the GT semantic maps, CAM overlay PNGs, the
    training logs in each stage's record format and Snakemake benchmark files."""
    from bestie.report.figures import png_bytes

    root = generate_demo_dataset(tmp_path / "demo", num_train=3, num_val=2, image_size=(64, 64))
    cfg = {"format": "voc", "root": str(root), "classes": list(DEMO_CLASSES), "train_split": "train",
           "eval_split": "val"}
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    out = tmp_path / "results"
    for d in ("bestie", "evaluate", "cams/pam_overlays", "cams/dense_overlays", "classifier", "maskrcnn", "wsss",
              "benchmarks"):
        (out / d).mkdir(parents=True)
    ids = list(train.ids)
    with H5Writer(out / "bestie" / "instances_train.h5") as w, H5Writer(out / "wsss" / "wsss.h5") as ws:
        for k, i in enumerate(ids):
            gt = train.instances_gt(i)
            other = train.instances_gt(ids[(k + 1) % len(ids)])
            fp = other["masks"][:1] & ~gt["masks"].any(axis=0)
            w.write(i, masks=np.concatenate([gt["masks"], fp]), labels=np.concatenate([gt["labels"], other["labels"][:1]]),
                    scores=np.array([0.9] * len(gt["labels"]) + [0.3], np.float32))
            ws.write(i, wsss=train.semantic_gt(i))
    results = []
    for k, i in enumerate(val.ids, start=1):
        gt = val.instances_gt(i)
        recs = instances_to_coco_results(k, {**gt, "scores": np.full(len(gt["labels"]), 0.7)}, lambda c: c + 1)
        results += [{**r, "image_key": i} for r in recs]
    write_coco_results(out / "evaluate" / "predictions_val.json", results)
    (out / "evaluate" / "metrics_val.json").write_text(json.dumps(MASKRCNN))
    voc = {"per_class": {"0.25": [1.0, 1.0, 1.0], "0.5": [1.0, 0.5, 1.0], "0.7": [1.0, 0.5, 1.0],
                         "0.75": [1.0, 0.5, 1.0]}, "num_gt": [2, 3, 1]}
    (out / "bestie" / "metrics_train.json").write_text(json.dumps({**BESTIE, "voc": voc, "class_names": list(DEMO_CLASSES)}))
    for kind in ("pam", "dense"):
        for k, i in enumerate(ids[:2]):
            (out / "cams" / f"{kind}_overlays" / f"{k:03d}_{i}.png").write_bytes(png_bytes(train.image(i)))
        (out / "classifier" / f"{kind}_log.jsonl").write_text("\n".join(
            [json.dumps({"event": "start", "iteration": 0})]
            + [json.dumps({"iteration": i, "epoch": 1, "loss": 1.0 / i, "lr": 0.1}) for i in range(1, 5)]
            + [json.dumps({"event": "epoch_end", "epoch": 1, "iteration": 4, "loss": 0.5})]))
    (out / "bestie" / "train_log.jsonl").write_text("\n".join(json.dumps(
        {"event": "train", "iteration": 20 * i, "seg": 1.0 / i, "center": 9.0 / i, "offset": 0.2, "total": 2.0 / i})
        for i in range(1, 4)))
    (out / "maskrcnn" / "train_log.jsonl").write_text("\n".join(json.dumps(
        {"iteration": i, "loss": 2.0 / i, "loss_mask": 1.0 / i}) for i in range(1, 4)))
    head = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    (out / "benchmarks" / "train_bestie.tsv").write_text(head + "54.3\t0:00:54\t1366\t1\t1\t1\t1\t1\t149\t81.7\n")
    inputs = {"maskrcnn": out / "evaluate" / "metrics_val.json", "bestie": out / "bestie" / "metrics_train.json",
              "wsss": out / "wsss" / "missing.json",
              "classifier_pam_log": out / "classifier" / "pam_log.jsonl",
              "classifier_dense_log": out / "classifier" / "dense_log.jsonl",
              "bestie_log": out / "bestie" / "train_log.jsonl", "maskrcnn_log": out / "maskrcnn" / "train_log.jsonl",
              "instances": out / "bestie" / "instances_train.h5", "predictions": out / "evaluate" / "predictions_val.json",
              "wsss_maps": out / "wsss" / "wsss.h5", "cam_overlays_pam": out / "cams" / "pam_overlays",
              "cam_overlays_dense": out / "cams" / "dense_overlays", "benchmarks": out / "benchmarks"}
    return cfg, inputs, train


def _section(page: str, heading: str) -> str:
    """The HTML between ``<h2>heading</h2>`` and the next ``<h2>``."""
    start = page.index(f"<h2>{heading}</h2>")
    end = page.find("<h2>", start + 1)
    return page[start: end if end >= 0 else len(page)]


def test_run_workflow_report_on_demo(tmp_path):
    cfg, inputs, train = _results_dir(tmp_path)
    combined = rp.run_workflow_report("demo", cfg, {k: str(v) for k, v in inputs.items()}, tmp_path / "r.html",
                                      tmp_path / "metrics.json")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(combined)) and saved["run"] == "demo"
    assert "53.5" in rp.metrics_table(saved) and saved["stages"]["bestie"]["drift"] == pytest.approx(1.234)
    page = (tmp_path / "r.html").read_text()
    assert "<b>splits</b>: train, held-out val" in page
    png = r'<img[^>]* src="data:image/png;base64,'
    sections = {  # heading -> images in it
        "Metrics": 0, "Stage times": 0, "Per class: BESTIE instances (pseudo labels)": 0, "Per class: Mask R-CNN": 0,
        "Training losses": 4, "Precision-recall": 2, "Overlays: CAMs, pam classifier": 2,
        "Overlays: CAMs, dense classifier": 2, "Overlays: WSSS maps on train": 3,
        "Overlays: BESTIE pseudo labels on train": 3, "Overlays: Mask R-CNN on val": 2,
    }
    for heading, n in sections.items():
        assert len(re.findall(png, _section(page, heading))) == n, heading
    assert len(re.findall(png, page)) == sum(sections.values())
    losses = _section(page, "Training losses")
    assert "no loss records" not in losses
    assert [t for t in re.findall(r"<figcaption>([^<]*)</figcaption>", losses)] == [
        "classifier dense training", "classifier pam training", "BESTIE training", "Mask R-CNN training"]
    assert ">train_bestie<" in _section(page, "Stage times") and ">54 s<" in _section(page, "Stage times")
    assert ">1.2<" in _section(page, "Metrics")  # semantic drift 0.01234 in percent
    bestie_pc = _section(page, "Per class: BESTIE instances (pseudo labels)")
    assert "<td>square</td><td class=\"num\">3</td>" in bestie_pc and ">50.0<" in bestie_pc
    # the GT (score 0.9) is every BESTIE instance but the false positives (0.3): best F1 at 0.9, F1 100 %
    bestie_ov = _section(page, "Overlays: BESTIE pseudo labels on train")
    assert "score &gt;= 0.900" in bestie_ov and "F1 100.0" in bestie_ov
    n_gt = [len(train.instances_gt(i)["labels"]) for i in train.ids]
    assert re.findall(r"\(GT \| prediction, (\d+) drawn at score &gt;= 0\.900\)", bestie_ov) == [str(n) for n in n_gt]
    mrcnn_ov = _section(page, "Overlays: Mask R-CNN on val")
    assert "score &gt;= 0.700" in mrcnn_ov and "0 drawn" not in mrcnn_ov
    # BESTIE's curve, computed by the report from the instances: precision 1 up to recall 1 (the false
    # positives rank last)
    curve = rp.pr_curve_from_instances(train, inputs["instances"])
    assert curve["precision"][-1] == pytest.approx(1.0) and "3 images" in curve["source"]


def test_workflow_report_without_optional_inputs(tmp_path):
    cfg, inputs, _ = _results_dir(tmp_path)
    inputs = {"maskrcnn": inputs["maskrcnn"], "bestie": tmp_path / "missing.json",
              "maskrcnn_log": tmp_path / "nolog.jsonl", "benchmarks": tmp_path / "nobench"}
    rp.run_workflow_report("demo", cfg, inputs, tmp_path / "r.html", tmp_path / "metrics.json")
    page = (tmp_path / "r.html").read_text()
    assert "Mask R-CNN training: no loss records" in page and "no benchmark files" in page
    assert len(re.findall(r"data:image/png;base64,", page)) == 1  # the Mask R-CNN PR curve


def test_tags_stay_inside_the_image_and_do_not_cover_each_other():
    # three instances whose masks start at the same corner, one at the right edge, one at the bottom
    anchors = [(10, 5), (10, 5), (10, 5), (95, 40), (20, 58)]
    sizes = [(40, 12)] * 5
    boxes = tag_boxes(anchors, sizes, (60, 100))
    for x, y, w, h in boxes:
        assert 0 <= x and x + w <= 100 and 0 <= y and y + h <= 60
    assert boxes[0] == (10, 0, 40, 12)  # the first wants y = 5 - 12 < 0: moved down to the top edge
    assert [b[1] for b in boxes[:3]] == [0, 12, 24]  # the same corner: stacked one tag height apart
    assert boxes[3][0] == 60  # the right-edge tag shifted left to fit
    for i in range(len(boxes)):
        for j in range(i):
            (x1, y1, w1, h1), (x2, y2, w2, h2) = boxes[i], boxes[j]
            assert not (x1 < x2 + w2 and x2 < x1 + w1 and y1 < y2 + h2 and y2 < y1 + h1), (i, j)


def test_score_text_keeps_small_scores_readable():
    assert [score_text(s) for s in (0.857, 0.1, 0.0023, 0.000087, 0.0)] == ["0.86", "0.10", "0.0023", "0.000087", "0.00"]
