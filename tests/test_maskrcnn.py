"""Stage 6: the Mask R-CNN models, training on pseudo labels (with resume) and the final evaluation."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from bestie.data import build_dataset
from bestie.data.demo import DEMO_CLASSES
from bestie.engine import read_checkpoint
from bestie.errors import ArtifactError, ConfigError, DataError, TrainingError, WeightsError
from bestie.io.coco_json import instances_to_coco_results
from bestie.models.backbones import create_backbone
from bestie.models.maskrcnn import build_maskrcnn
from bestie.stages import evaluate as ev
from bestie.stages import train_maskrcnn as tr
from demo_util import demo_with_gt_pseudo_labels


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo data (4 train, 2 val, 96x96) and pseudo labels = the GT instances of the train images."""
    tmp = tmp_path_factory.mktemp("mrcnn")
    cfg, pseudo = demo_with_gt_pseudo_labels(tmp, num_train=4, num_val=2)
    return cfg, pseudo, tmp


def _tiny_cfg(**kw) -> tr.MaskRCNNConfig:
    base = dict(weights=None, min_size=96, max_size=96, max_iters=4, batch_size=2, num_workers=0, log_every=1,
                checkpoint_every=2, amp=False)
    base.update(kw)
    return tr.MaskRCNNConfig(**base)


# ----------------------------------------------------------------------------------------------- model
def test_lite0_imagenet_weights_frozen_stages_and_rebuild():
    model = build_maskrcnn("maskrcnn_efficientnet_lite0_fpn", 3, "imagenet", min_size=128, max_size=128)
    ref = create_backbone("tf_efficientnet_lite0", weights="imagenet", out_indices=(1, 2, 3, 4))
    body = model.backbone.body.body
    # the package's ImageNet tensors are in the detector's backbone
    torch.testing.assert_close(body.conv_stem.weight, ref.body.conv_stem.weight, rtol=0, atol=0)
    torch.testing.assert_close(body.blocks[6][0].conv_pw.weight, ref.body.blocks[6][0].conv_pw.weight, rtol=0, atol=0)
    # trainable_backbone_layers=3: stem, blocks 0 and 1 frozen, blocks 2.. trained; no BatchNorm statistics updated
    assert not body.conv_stem.weight.requires_grad and not body.blocks[1][0].conv_pw.weight.requires_grad
    assert body.blocks[2][0].conv_pw.weight.requires_grad
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.body.modules())
    assert list(model.transform.image_mean) == [0.5, 0.5, 0.5]
    # C + 1 outputs
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4
    # the spec rebuilds the same modules
    again = build_maskrcnn(**model.bestie_spec, weights=None, warn_random=False)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def test_lite0_forward_train_and_eval():
    torch.manual_seed(0)
    model = build_maskrcnn("maskrcnn_efficientnet_lite0_fpn", 3, None, min_size=96, max_size=96)
    masks = torch.zeros(1, 96, 96, dtype=torch.uint8)
    masks[0, 20:50, 30:70] = 1
    targets = [{"boxes": torch.tensor([[30.0, 20.0, 70.0, 50.0]]), "labels": torch.tensor([2]), "masks": masks}]
    losses = model([torch.rand(3, 96, 96)], targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 80, 112)])[0]
    assert out["masks"].shape[1:] == (1, 80, 112)  # masks at the input size
    assert out["labels"].numel() == 0 or (out["labels"].min() >= 1 and out["labels"].max() <= 3)


def test_weights_errors(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        build_maskrcnn("maskrcnn_efficientnet_lite0_fpn", 3, tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match="ResNet-50"):
        build_maskrcnn("maskrcnn_resnet50_fpn", 3, "imagenet")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="bad.pth"):
        build_maskrcnn("maskrcnn_resnet50_fpn", 3, bad)
    # a lite0 detector file does not fit the ResNet detector
    lite = tmp_path / "lite.pth"
    torch.save(build_maskrcnn("maskrcnn_efficientnet_lite0_fpn", 3, None).state_dict(), lite)
    with pytest.raises(WeightsError, match="lite.pth"):
        build_maskrcnn("maskrcnn_resnet50_fpn", 3, lite)


def test_detector_file_with_other_class_count_replaces_predictors(tmp_path):
    torch.manual_seed(1)
    src = build_maskrcnn("maskrcnn_efficientnet_lite0_fpn", 5, None)
    path = tmp_path / "det.pth"
    torch.save({"model": src.state_dict()}, path)
    model = build_maskrcnn("maskrcnn_efficientnet_lite0_fpn", 3, path)
    s, m = src.state_dict(), model.state_dict()
    for key in ("backbone.body.body.conv_stem.weight", "backbone.fpn.layer_blocks.0.0.weight",
                "rpn.head.cls_logits.weight", "roi_heads.box_head.fc6.weight", "roi_heads.mask_head.0.0.weight"):
        torch.testing.assert_close(m[key], s[key], rtol=0, atol=0)
    assert m["roi_heads.box_predictor.cls_score.weight"].shape == (4, 512)
    assert m["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape[0] == 4


def test_resnet50_imagenet_file_goes_into_the_backbone(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(2)
    net = resnet50()
    path = tmp_path / "resnet50.pth"
    torch.save(net.state_dict(), path)  # includes fc.*, which is ignored
    model = build_maskrcnn("maskrcnn_resnet50_fpn", 3, path, min_size=128, max_size=128)
    body = model.backbone.body
    torch.testing.assert_close(body.layer3[2].conv2.weight, net.layer3[2].conv2.weight, rtol=0, atol=0)
    torch.testing.assert_close(body.bn1.running_var, net.bn1.running_var, rtol=0, atol=0)
    assert not body.layer1[0].conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad
    assert model.bestie_spec["frozen_bn"] is True


def test_masks_to_boxes_hand_checked():
    m = np.zeros((3, 10, 12), bool)
    m[0, 5, 3] = True                 # one pixel at column 3, row 5
    m[1, 2:4, 7:12] = True            # rows 2-3, columns 7-11
    m[2, 0, 0] = m[2, 9, 11] = True   # two corners
    np.testing.assert_array_equal(tr.masks_to_boxes(m), [[3, 5, 4, 6], [7, 2, 12, 4], [0, 0, 12, 10]])


# -------------------------------------------------------------------------------------- train + eval
def test_train_resume_and_evaluate_end_to_end(demo, tmp_path, monkeypatch):
    cfg_ds, pseudo, _ = demo
    cfg = _tiny_cfg()

    # 1) uninterrupted run of 4 iterations
    ck_a, log_a = tmp_path / "a" / "model.pt", tmp_path / "a" / "log.jsonl"
    summary = tr.run(cfg, cfg_ds, pseudo, ck_a, log_a, device="cpu")
    assert summary["iterations"] == 4 and summary["num_train_images"] == 4
    state_a = read_checkpoint(ck_a)
    extra = state_a["extra"]
    assert extra["kind"] == "maskrcnn" and extra["class_names"] == list(DEMO_CLASSES)
    assert extra["category_ids"] == [1, 2, 3] and extra["iterations"] == 4
    assert not (tmp_path / "a" / "model.pt.partial").exists()
    records = [json.loads(line) for line in log_a.read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    for r in records:
        parts = [r[k] for k in ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")]
        assert np.isfinite(parts).all() and r["loss"] == pytest.approx(sum(parts), rel=1e-5)
    # warm-up capped at one epoch minus one iteration (2 batches per epoch -> 1 warm-up iteration)
    assert records[0]["lr"] == pytest.approx(cfg.lr * cfg.warmup_factor)
    assert records[1]["lr"] == pytest.approx(cfg.lr)
    # lr steps at round(16/26 * 4) = 2 and round(22/26 * 4) = 3 (0-based iteration indices)
    assert records[2]["lr"] == pytest.approx(cfg.lr * 0.1)
    assert records[3]["lr"] == pytest.approx(cfg.lr * 0.01)

    # the same run logged every 4 iterations (log_every does not change training): its one record
    # holds the means of the four single-iteration records, not the last iteration's values
    log_w = tmp_path / "w" / "log.jsonl"
    tr.run(_tiny_cfg(log_every=4), cfg_ds, pseudo, tmp_path / "w" / "model.pt", log_w, device="cpu")
    (rec_w,) = [json.loads(line) for line in log_w.read_text().splitlines()]
    assert rec_w["iteration"] == 4 and rec_w["lr"] == pytest.approx(records[3]["lr"])
    for k in ("loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"):
        assert rec_w[k] == pytest.approx(np.mean([r[k] for r in records]), rel=1e-5), k
    assert rec_w["loss"] != pytest.approx(records[3]["loss"], rel=1e-3)

    # 2) a run killed at iteration 3 leaves the partial checkpoint of iteration 2; the rerun resumes
    #    from it and ends with exactly the weights of the uninterrupted run
    ck_b, log_b = tmp_path / "b" / "model.pt", tmp_path / "b" / "log.jsonl"
    import bestie.engine as engine

    orig = engine.check_finite

    def crash_at_3(losses, iteration):
        if iteration == 2:  # 0-based: the third iteration
            raise TrainingError("simulated crash")
        orig(losses, iteration)

    monkeypatch.setattr(engine, "check_finite", crash_at_3)
    with pytest.raises(TrainingError, match="simulated"):
        tr.run(cfg, cfg_ds, pseudo, ck_b, log_b, device="cpu")
    monkeypatch.setattr(engine, "check_finite", orig)
    partial = tmp_path / "b" / "model.pt.partial"
    assert partial.is_file() and not ck_b.exists()
    assert read_checkpoint(partial)["iteration"] == 2
    with pytest.raises(ConfigError, match="maskrcnn.lr"):  # a partial state of other settings is not resumed
        tr.run(_tiny_cfg(lr=0.001), cfg_ds, pseudo, ck_b, log_b, device="cpu")
    tr.run(cfg, cfg_ds, pseudo, ck_b, log_b, device="cpu")
    assert not partial.exists()
    state_b = read_checkpoint(ck_b)
    for k, v in state_a["model"].items():
        torch.testing.assert_close(state_b["model"][k], v, rtol=0, atol=0, msg=k)
    recs_b = [json.loads(x) for x in log_b.read_text().splitlines()]
    assert [r["iteration"] for r in recs_b if "event" not in r] == [1, 2, 3, 4]
    assert [(r["event"], r["iteration"]) for r in recs_b if "event" in r] == [("resume", 2)]  # issue 18

    # 3) evaluation on the val split: documented keys and ranges, predictions JSON usable by pycocotools
    out_m, out_p = tmp_path / "metrics.json", tmp_path / "preds.json"
    metrics = ev.run(ev.EvalConfig(score_threshold=0.0), cfg_ds, "val", ck_a, out_m, out_p, device="cpu")
    assert json.loads(out_m.read_text()) == json.loads(json.dumps(metrics))
    assert metrics["num_images"] == 2 and metrics["num_images_scored"] == 2
    for key in ("mAP25", "mAP50", "mAP70", "mAP75", "AP", "AP50", "AP75"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert [r["class"] for r in metrics["per_class"]] == list(DEMO_CLASSES)
    pr = metrics["pr_curve"]
    assert len(pr["recall"]) == len(pr["precision"]) == 101
    assert all(p is None or 0.0 <= p <= 1.0 for p in pr["precision"])
    results = json.loads(out_p.read_text())
    assert len(results) == metrics["num_detections"] <= 2 * 100
    val_ids = set(build_dataset(cfg_ds, "val").ids)
    assert all(r["image_key"] in val_ids and r["category_id"] in (1, 2, 3) for r in results)


def test_train_rejects_pseudo_labels_of_other_classes(demo, tmp_path):
    cfg_ds, pseudo, _ = demo
    data = json.loads(Path(pseudo).read_text())
    data["annotations"][0]["category_id"] = 7
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(DataError, match="category id 7"):
        tr.run(_tiny_cfg(), cfg_ds, bad, tmp_path / "m.pt", tmp_path / "l.jsonl", device="cpu")
    with pytest.raises(ArtifactError, match="does not exist"):
        tr.run(_tiny_cfg(), cfg_ds, tmp_path / "none.json", tmp_path / "m.pt", tmp_path / "l.jsonl", device="cpu")


def test_evaluate_perfect_predictions_score_one(demo, tmp_path, monkeypatch):
    """With a detector that returns the GT, every VOC mAP and the COCO AP are exactly 1."""
    cfg_ds, pseudo, tmp = demo
    ck = tmp / "perfect_model.pt"
    if not ck.exists():
        tr.run(_tiny_cfg(max_iters=1, checkpoint_every=0), cfg_ds, pseudo, ck, tmp / "perfect_log.jsonl", device="cpu")
    val = build_dataset(cfg_ds, "val")
    gts = {val.image(i).tobytes(): val.instances_gt(i) for i in val.ids}

    def oracle(model, image, device, **kw):
        gt = gts[image.tobytes()]
        n = len(gt["labels"])
        return {"masks": gt["masks"], "labels": gt["labels"], "scores": np.linspace(0.9, 0.5, n).astype(np.float32)}

    monkeypatch.setattr(ev, "predict_image", oracle)
    m = ev.run(ev.EvalConfig(), cfg_ds, "val", ck, tmp_path / "m.json", tmp_path / "p.json", device="cpu")
    for key in ("mAP25", "mAP50", "mAP70", "mAP75", "AP", "AP50", "AP75"):
        assert m[key] == pytest.approx(1.0), key
    assert m["pr_curve"]["precision"] == [pytest.approx(1.0)] * 101


def test_pr_curves_hand_checked():
    """One class, 2 GT; detections: a hit (0.9) then a miss (0.8): recall reaches 0.5 at precision 1,
    never 1, so COCO's interpolated precision is 1 for recall <= 0.5 and 0 beyond."""
    h = w = 40
    g = np.zeros((2, h, w), bool)
    g[0, 0:10, 0:10] = True
    g[1, 20:30, 20:30] = True
    coco_gt = ev.build_coco_gt([{"masks": g, "labels": np.array([0, 0])}], [1], [1], ["thing"])
    miss = np.zeros((h, w), bool)
    miss[0:10, 30:40] = True
    pred = {"masks": np.stack([g[0], miss]), "labels": np.array([0, 0]), "scores": np.array([0.9, 0.8], np.float32)}
    res = instances_to_coco_results(1, pred, lambda c: c + 1)
    pr = ev.pr_curves(coco_gt, res, 0.5)
    expected = [1.0 if r <= 0.5 + 1e-9 else 0.0 for r in np.linspace(0, 1, 101)]
    assert pr["precision"] == pytest.approx(expected)
    assert pr["per_class"][0]["precision"] == pytest.approx(expected)
    with contextlib.redirect_stdout(io.StringIO()):
        assert isinstance(coco_gt, COCO) and len(coco_gt.getAnnIds()) == 2


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "coco128").is_dir(), reason=f"real data not found at {SHARED}/coco128")
def test_evaluate_coco_dataset_ids_and_categories(tmp_path, monkeypatch):
    """coco128 (real COCO ids with gaps): GT returned as predictions on 3 images scores 1 in both protocols,
    so image ids and category ids map back to the COCO ground truth correctly."""
    from bestie.engine import save_checkpoint

    cfg_ds = {"format": "coco", "ann_file": str(SHARED / "coco128/annotations/instances_train.json"),
              "image_dir": str(SHARED / "coco128/images")}
    full = build_dataset(cfg_ds, "train")
    ids = [i for i in full.ids if len(full.labels(i))][:3]

    class Few:
        def __init__(self, base):
            self.base, self.ids = base, ids

        def __getattr__(self, name):
            return getattr(self.base, name)

    model = build_maskrcnn("maskrcnn_efficientnet_lite0_fpn", full.num_classes, None, min_size=64, max_size=64)
    ck = tmp_path / "m.pt"
    save_checkpoint(ck, model, extra={"kind": "maskrcnn", "model_spec": model.bestie_spec,
                                      "class_names": list(full.class_names)})
    gts = {}
    for i in ids:
        gt = full.instances_gt(i)
        keep = ~gt["iscrowd"] & gt["masks"].any(axis=(1, 2))
        gts[full.image(i).tobytes()] = {"masks": gt["masks"][keep], "labels": gt["labels"][keep]}

    def oracle(model, image, device, **kw):
        gt = gts[image.tobytes()]
        return {**gt, "scores": np.linspace(0.9, 0.5, len(gt["labels"])).astype(np.float32)}

    monkeypatch.setattr(ev, "predict_image", oracle)
    m = ev.run(ev.EvalConfig(), cfg_ds, "train", ck, tmp_path / "m.json", tmp_path / "p.json", device="cpu",
               dataset=Few(full))
    assert m["num_images_scored"] == 3
    assert m["mAP50"] == pytest.approx(1.0) and m["AP"] == pytest.approx(1.0)
    results = json.loads((tmp_path / "p.json").read_text())
    assert {r["image_id"] for r in results} == {int(i) for i in ids}
    assert {r["category_id"] for r in results} <= set(full.cat_ids)


def test_an_export_without_any_pseudo_instance_stops_before_training(tmp_path):
    """The first coco128 run (2026-12-02) exported no instance: Mask R-CNN must stop naming the file."""
    from bestie.data.demo import generate_demo_dataset
    from bestie.data import build_dataset
    from bestie.errors import DataError
    from bestie.stages.train_maskrcnn import PseudoLabelDataset

    root = tmp_path / "demo"
    generate_demo_dataset(root, num_train=2, num_val=1)
    ds = build_dataset({"format": "voc", "root": str(root), "classes": ["disc", "square", "triangle"]}, "train")
    pseudo = {"images": [{"id": k + 1, "image_key": i, "file_name": f"{i}.jpg", "height": 160, "width": 160}
                         for k, i in enumerate(ds.ids)],
              "annotations": [], "categories": [{"id": c + 1, "name": n} for c, n in enumerate(ds.class_names)]}
    with pytest.raises(DataError, match=r"empty\.json: no image has a pseudo instance"):
        PseudoLabelDataset(pseudo, ds, source=str(tmp_path / "empty.json"))
