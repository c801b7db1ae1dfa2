"""`bestie predict`: instance masks for new images from BESTIE and Mask R-CNN checkpoints (bestie.stages.predict)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from bestie.cli import main
from bestie.config import to_dict
from bestie.data import build_dataset
from bestie.data.demo import DEMO_CLASSES
from bestie.data.images import load_rgb
from bestie.engine import read_checkpoint, save_checkpoint
from bestie.errors import ArtifactError, ConfigError, DataError
from bestie.io.coco_json import decode_rle, instances_to_coco_results
from bestie.models.instance import BestieNet
from bestie.models.maskrcnn import build_maskrcnn
from bestie.stages import evaluate as ev
from bestie.stages import export_pseudo_labels as ex
from bestie.stages import train_maskrcnn as tr
from bestie.stages.predict import PredictConfig, expand_inputs, load_predictor, run, working_size
from bestie.stages.predict_instances import InferenceConfig, predict_image
from bestie.stages.train_bestie import BestieConfig
from coco_interop import assert_dataset_fields, assert_results_fields, quiet_coco
from demo_util import demo_with_gt_pseudo_labels

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GAP_IDS = [1, 44, 90]  # COCO-like category ids with gaps for the BESTIE checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo data (4 train, 3 val, 96x96), a Mask R-CNN trained 4 iterations by the real trainer on the GT
    of the train images, and a folder with 2 val images and a truncated JPEG."""
    tmp = tmp_path_factory.mktemp("predict")
    cfg, pseudo = demo_with_gt_pseudo_labels(tmp, num_train=4, num_val=3)
    ck = tmp / "maskrcnn" / "model.pt"
    tr.run(tr.MaskRCNNConfig(weights=None, min_size=96, max_size=96, max_iters=4, batch_size=2, num_workers=0,
                             checkpoint_every=0, amp=False), cfg, pseudo, ck, tmp / "log.jsonl", device="cpu")
    val = build_dataset(cfg, "val")
    folder = tmp / "images"
    folder.mkdir()
    for i in val.ids[:2]:
        shutil.copy(val.image_path(i), folder / Path(val.image_path(i)).name)
    data = Path(val.image_path(val.ids[2])).read_bytes()
    (folder / "broken.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    return {"cfg": cfg, "tmp": tmp, "maskrcnn": ck, "val": val, "folder": folder}


@pytest.fixture(scope="module")
def bestie_ck(demo):
    """A BESTIE checkpoint through the real save path, with the keys train_bestie's checkpoints carry
    plus 'category_ids' and 'inference'. The seg head's bias favours class 1 and the centre
    threshold is 0, so each image has instances."""
    torch.manual_seed(0)
    model = BestieNet("tf_efficientnet_lite0", 3, None, "light", head_channels=32, fusion_channels=16, warn_random=False)
    with torch.no_grad():
        model.heads["seg"].out.bias.copy_(torch.tensor([0.0, 0.0, 3.0, 0.0]))
    extra = {"model_config": dict(model.config), "mean": list(model.mean), "std": list(model.std),
             "class_names": list(DEMO_CLASSES), "category_ids": GAP_IDS, "kind": "last",
             "inference": to_dict(InferenceConfig(center_threshold=0.0, min_area=20)),
             "train_config": to_dict(BestieConfig(weights=None, resize=96, crop_size=96))}
    path = demo["tmp"] / "bestie" / "model.pt"
    save_checkpoint(path, model, iteration=1, extra=extra)
    return path


def _json(path):
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------------------- Mask R-CNN
def test_maskrcnn_predicts_folder_and_skips_corrupt_file(demo, tmp_path):
    out = tmp_path / "out"
    summary = run(PredictConfig(score_threshold=0.0, batch_size=2, overlay_threshold=0.0), demo["maskrcnn"],
                  [demo["folder"]], out, "cpu")
    assert summary["num_inputs"] == 3 and summary["num_images"] == 2 and summary["num_skipped"] == 1
    assert summary["skipped"][0]["path"].endswith("broken.jpg") and "broken.jpg" in summary["skipped"][0]["fault"]
    assert _json(out / "summary.json") == json.loads(json.dumps(summary))
    meta = _json(out / "images.json")
    assert [Path(im["file_name"]).name for im in meta["images"]] == ["demo_0005.jpg", "demo_0006.jpg"]
    assert [im["id"] for im in meta["images"]] == [1, 2]
    assert all(im["height"] == im["width"] == 96 for im in meta["images"])
    assert_dataset_fields(meta, DEMO_CLASSES, [1, 2, 3])
    results = _json(out / "predictions.json")
    assert isinstance(results, list) and len(results) == summary["num_instances"] > 0
    assert_results_fields(results, {im["id"]: im for im in meta["images"]}, [1, 2, 3])
    # loadRes on the sidecar: no GT file needed
    coco = quiet_coco(str(out / "images.json"))
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco.loadRes(str(out / "predictions.json"))
    assert len(dt.getAnnIds()) == len(results)
    # the records are exactly those of the evaluation's predict_image on each image (same model, thresholds)
    model, extra = ev.load_maskrcnn(demo["maskrcnn"], score_threshold=0.0)
    assert extra["inference"] == {"score_threshold": 0.05, "mask_threshold": 0.5, "max_dets": 100}
    expected = []
    for im in meta["images"]:
        pred = ev.predict_image(model, load_rgb(im["file_name"]), "cpu", score_threshold=0.0)
        expected += instances_to_coco_results(im["id"], pred, lambda c: c + 1)
    assert [(r["image_id"], r["category_id"], r["segmentation"]) for r in results] == \
        [(r["image_id"], r["category_id"], r["segmentation"]) for r in expected]
    np.testing.assert_allclose([r["score"] for r in results], [r["score"] for r in expected], rtol=1e-5)
    # overlays: one per readable image, the 96 px image enlarged 3x by overlay_panel
    pngs = sorted(p.name for p in (out / "overlays").iterdir())
    assert pngs == ["demo_0005.png", "demo_0006.png"]
    assert load_rgb(out / "overlays" / "demo_0005.png").shape == (288, 288, 3)
    # overlays draw only instances >= overlay_threshold: at 1.0 the overlay is the bare (enlarged) image
    from bestie.report.figures import overlay_panel

    run(PredictConfig(score_threshold=0.0, overlay_threshold=1.0, overlay_top_k=0), demo["maskrcnn"], [demo["folder"]],
        tmp_path / "t", "cpu")
    bare = overlay_panel(load_rgb(demo["folder"] / "demo_0005.jpg"), None, None, DEMO_CLASSES)
    np.testing.assert_array_equal(load_rgb(tmp_path / "t" / "overlays" / "demo_0005.png"), bare)
    assert not np.array_equal(load_rgb(out / "overlays" / "demo_0005.png"), bare)
    # the checkpoint's score threshold by default: fewer (or as many) instances, all >= 0.05
    default = run(PredictConfig(overlays=False), demo["maskrcnn"], [demo["folder"]], tmp_path / "d", "cpu")
    assert default["settings"]["score_threshold"] == 0.05
    assert all(r["score"] >= 0.05 for r in _json(tmp_path / "d" / "predictions.json"))
    assert not any((tmp_path / "d" / "overlays").iterdir())


def test_predictions_scored_by_pycocotools_equal_the_evaluate_figure(demo, tmp_path):
    """The 3 val images: predictions.json (image ids from a GT file via ids_from) scored with COCOeval
    gives the AP of `bestie evaluate` on the same images and model."""
    val = demo["val"]
    metrics = ev.run(ev.EvalConfig(score_threshold=0.0), demo["cfg"], "val", demo["maskrcnn"], tmp_path / "m.json",
                     tmp_path / "p.json", device="cpu")
    # the GT evaluate builds for a VOC split (ids 1..N in dataset order), written with the real file names
    gt = ev.build_coco_gt([val.instances_gt(i) for i in val.ids], list(range(1, 4)), [1, 2, 3], DEMO_CLASSES)
    gt_data = dict(gt.dataset)
    gt_data["images"] = [{**im, "file_name": Path(val.image_path(i)).name} for im, i in zip(gt_data["images"], val.ids)]
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(gt_data))
    paths = [val.image_path(i) for i in reversed(val.ids)]  # any order: ids come from the GT file
    run(PredictConfig(score_threshold=0.0, ids_from=str(gt_file), overlays=False), demo["maskrcnn"], paths,
        tmp_path / "out", "cpu")
    results = _json(tmp_path / "out" / "predictions.json")
    assert len(results) == metrics["num_detections"]
    coco_gt = quiet_coco(str(gt_file))
    with contextlib.redirect_stdout(io.StringIO()):
        e = COCOeval(coco_gt, coco_gt.loadRes(str(tmp_path / "out" / "predictions.json")), "segm")
        e.evaluate()
        e.accumulate()
        e.summarize()
    assert metrics["AP"] > 0  # a non-trivial figure: ids that did not match would give 0
    assert e.stats[0] == pytest.approx(metrics["AP"], abs=1e-12)
    assert e.stats[1] == pytest.approx(metrics["AP50"], abs=1e-12)


def test_maskrcnn_flip_merges_both_views(demo, tmp_path):
    s = run(PredictConfig(score_threshold=0.0, flip=True, overlays=False), demo["maskrcnn"], [demo["folder"]],
            tmp_path / "f", "cpu")
    assert s["settings"]["flip"] is True and 0 < s["num_instances"] <= 2 * 100
    results = _json(tmp_path / "f" / "predictions.json")
    for k in (1, 2):
        scores = [r["score"] for r in results if r["image_id"] == k]
        assert scores == sorted(scores, reverse=True) and len(scores) <= 100


def test_large_image_is_predicted_at_the_cap_and_mapped_back(demo, tmp_path):
    """A 2400 x 1800 image (a demo image enlarged 25x / 18.75x) with max_side 96: the network sees the
    96 x 72 working image; masks come back at 1800 x 2400 and agree with the working-size masks enlarged."""
    small = load_rgb(demo["val"].image_path(demo["val"].ids[0]))
    big = cv2.resize(small, (2400, 1800), interpolation=cv2.INTER_LINEAR)
    path = tmp_path / "big.png"
    cv2.imwrite(str(path), big[:, :, ::-1])
    assert working_size(1800, 2400, 96) == (72, 96) and working_size(50, 60, 96) == (50, 60)
    s = run(PredictConfig(score_threshold=0.0, max_side=96), demo["maskrcnn"], [path], tmp_path / "o", "cpu")
    assert s["settings"]["max_side"] == 96 and s["num_instances"] > 0
    meta = _json(tmp_path / "o" / "images.json")
    assert (meta["images"][0]["height"], meta["images"][0]["width"]) == (1800, 2400)
    results = _json(tmp_path / "o" / "predictions.json")
    assert all(r["segmentation"]["size"] == [1800, 2400] for r in results)
    # the same prediction on the working image, probabilities enlarged by torch's bilinear resize (half-pixel
    # centres, as OpenCV's) and thresholded: the full-size masks are those, not shifted or transposed
    pred = load_predictor(demo["maskrcnn"], PredictConfig(score_threshold=0.0, max_side=96), "cpu")
    work = cv2.resize(big, (96, 72), interpolation=cv2.INTER_AREA)
    inst = pred.predict([work])[0]
    assert len(inst["labels"]) == len(results)
    for k in range(min(5, len(results))):
        prob = torch.nn.functional.interpolate(torch.from_numpy(inst["masks"][k])[None, None], size=(1800, 2400),
                                               mode="bilinear", align_corners=False)[0, 0].numpy()
        ref = prob > 0.5
        got = decode_rle(results[k]["segmentation"])
        union = (ref | got).sum()
        assert union > 0 and (ref & got).sum() / union > 0.99
    # the overlay is drawn at the working size, not 2400 px
    assert max(load_rgb(tmp_path / "o" / "overlays" / "big.png").shape[:2]) <= 320


# ------------------------------------------------------------------------------------------------ BESTIE
def test_bestie_checkpoint_three_images_one_corrupt(demo, bestie_ck, tmp_path):
    files = sorted(demo["folder"].iterdir())  # broken.jpg, demo_0005.jpg, demo_0006.jpg
    s = run(PredictConfig(), bestie_ck, [str(f) for f in files], tmp_path / "b", "cpu")
    assert s["model"] == "bestie" and (s["num_inputs"], s["num_images"], s["num_skipped"]) == (3, 2, 1)
    assert s["settings"]["max_side"] == 1333 and s["settings"]["inference"]["flip"] is True
    meta = _json(tmp_path / "b" / "images.json")
    assert_dataset_fields(meta, DEMO_CLASSES, GAP_IDS)
    assert [im["id"] for im in meta["images"]] == [1, 2]  # 1..N over the readable inputs
    results = _json(tmp_path / "b" / "predictions.json")
    assert_results_fields(results, {im["id"]: im for im in meta["images"]}, GAP_IDS)
    assert {r["category_id"] for r in results} == {44}  # class 1 -> its category id, gaps kept
    # the instances are those of predict_instances.predict_image with the checkpoint's inference settings
    model, extra = __import__("bestie.stages.predict_instances", fromlist=["x"]).load_bestie_model(bestie_ck)
    inf = InferenceConfig(**extra["inference"])
    expected = []
    for im in meta["images"]:
        inst = predict_image(model, load_rgb(im["file_name"]), extra["mean"], extra["std"], inf, "cpu")
        assert len(inst["labels"]) > 0
        expected += instances_to_coco_results(im["id"], inst, lambda c: GAP_IDS[c])
    assert [r["segmentation"] for r in results] == [r["segmentation"] for r in expected]
    np.testing.assert_allclose([r["score"] for r in results], [r["score"] for r in expected], rtol=1e-6)
    # --no-flip and a score threshold above every score
    s2 = run(PredictConfig(flip=False, score_threshold=1.0, overlays=False), bestie_ck, [demo["folder"]],
             tmp_path / "c", "cpu")
    assert s2["settings"]["inference"]["flip"] is False and s2["num_instances"] == 0
    assert _json(tmp_path / "c" / "predictions.json") == []


def test_bestie_checkpoint_without_new_keys_is_refused(demo, bestie_ck, tmp_path):
    state = read_checkpoint(bestie_ck)
    for key in ("category_ids", "inference"):
        extra = {k: v for k, v in state["extra"].items() if k != key}
        path = tmp_path / f"no_{key}.pt"
        torch.save({**state, "extra": extra}, path)
        with pytest.raises(ArtifactError, match=f"'{key}'"):
            load_predictor(path, PredictConfig(), "cpu")


# ------------------------------------------------------------------------------------------------ errors
def test_errors_name_the_fault(demo, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no input image"):
        run(PredictConfig(), demo["maskrcnn"], [empty, str(tmp_path / "*.jpg")], tmp_path / "o", "cpu")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="none of the 1 input file"):
        run(PredictConfig(), demo["maskrcnn"], [bad], tmp_path / "o", "cpu")
    # foreign checkpoints: a bare state dict, and a checkpoint of another stage
    model = build_maskrcnn("maskrcnn_efficientnet_lite0_fpn", 3, None, warn_random=False)
    sd = tmp_path / "state_dict.pt"
    torch.save(model.state_dict(), sd)
    with pytest.raises(ArtifactError, match="expected a dict with a 'model'"):
        load_predictor(sd, PredictConfig(), "cpu")
    other = tmp_path / "classifier.pt"
    save_checkpoint(other, torch.nn.Linear(2, 2), extra={"kind": "classifier"})
    with pytest.raises(ArtifactError, match="not a BESTIE or Mask R-CNN checkpoint"):
        load_predictor(other, PredictConfig(), "cpu")
    # class-count mismatch: 3-class weights, 2 class names
    state = read_checkpoint(demo["maskrcnn"])
    wrong = tmp_path / "wrong.pt"
    torch.save({**state, "extra": {**state["extra"], "class_names": ["disc", "square"]}}, wrong)
    with pytest.raises(ArtifactError, match="class count mismatch"):
        load_predictor(wrong, PredictConfig(), "cpu")
    wrong_spec = tmp_path / "wrong_spec.pt"
    torch.save({**state, "extra": {**state["extra"], "model_spec": {**state["extra"]["model_spec"], "num_classes": 5}}},
               wrong_spec)
    with pytest.raises(ArtifactError, match="box predictor has 3 classes"):
        load_predictor(wrong_spec, PredictConfig(), "cpu")
    old = tmp_path / "old.pt"
    torch.save({**state, "extra": {k: v for k, v in state["extra"].items() if k != "inference"}}, old)
    with pytest.raises(ArtifactError, match="'inference'"):
        load_predictor(old, PredictConfig(), "cpu")
    with pytest.raises(ConfigError, match="device"):
        load_predictor(demo["maskrcnn"], PredictConfig(), "tpu")
    with pytest.raises(ConfigError, match="batch_size"):
        PredictConfig(batch_size=0)
    with pytest.raises(ConfigError, match="predict.model"):
        PredictConfig(model="yolo")
    # ids_from that does not list an input
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [{"id": 7, "file_name": "other.jpg", "height": 96, "width": 96}],
                              "categories": [{"id": c, "name": n} for c, n in zip([1, 2, 3], DEMO_CLASSES)]}))
    with pytest.raises(DataError, match="no image named"):
        run(PredictConfig(ids_from=str(gt)), demo["maskrcnn"], [demo["folder"]], tmp_path / "o", "cpu")


def test_expand_inputs_files_folders_globs(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("x.jpg", "y.png", ".hidden.jpg"):
        (tmp_path / "a" / name).write_bytes(b"")
    (tmp_path / "a" / "sub").mkdir()
    (tmp_path / "a" / "sub" / "z.jpg").write_bytes(b"")
    got = expand_inputs([tmp_path / "a", str(tmp_path / "a" / "x.jpg"), str(tmp_path / "**" / "*.jpg")])
    assert [p.relative_to(tmp_path).as_posix() for p in got] == ["a/x.jpg", "a/y.png", "a/sub/z.jpg"]


def test_cli_predict_and_its_errors(demo, tmp_path, capsys):
    rc = main(["predict", str(demo["maskrcnn"]), str(demo["folder"]), "--out", str(tmp_path / "o"), "--device", "cpu",
               "--score-threshold", "0.5", "--no-overlays", "--batch-size", "2"])
    assert rc == 0
    assert "2 images" in capsys.readouterr().out
    s = _json(tmp_path / "o" / "summary.json")
    assert s["settings"]["score_threshold"] == 0.5 and s["settings"]["batch_size"] == 2 and s["num_skipped"] == 1
    rc = main(["predict", str(demo["folder"] / "demo_0005.jpg"), str(demo["folder"]), "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "predict: error: checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- coco128 category ids
@pytest.mark.skipif(not (SHARED / "coco128").is_dir(), reason=f"real data not found at {SHARED}/coco128")
def test_coco128_category_and_image_ids_survive_predict(tmp_path):
    """A Mask R-CNN checkpoint for coco128's 71 classes (real save path, category ids with gaps): the
    results carry COCO's category ids and, with ids_from=instances_train.json, its image ids, so COCOeval
    runs against the original annotation file."""
    ann = SHARED / "coco128" / "annotations" / "instances_train.json"
    cfg_ds = {"format": "coco", "ann_file": str(ann), "image_dir": str(SHARED / "coco128" / "images")}
    ds = build_dataset(cfg_ds, "train")
    cats = ex.category_ids(ds)
    assert 90 in cats and max(cats) > ds.num_classes
    torch.manual_seed(0)
    model = build_maskrcnn("maskrcnn_efficientnet_lite0_fpn", ds.num_classes, None, min_size=64, max_size=64,
                           warn_random=False)
    ck = tmp_path / "m.pt"
    save_checkpoint(ck, model, extra={"kind": "maskrcnn", "model_spec": model.bestie_spec,
                                      "class_names": list(ds.class_names), "category_ids": cats,
                                      "inference": {"score_threshold": 0.0, "mask_threshold": 0.5, "max_dets": 100}})
    ids = ds.ids[:3]
    s = run(PredictConfig(ids_from=str(ann), overlays=False), ck, [ds.image_path(i) for i in ids], tmp_path / "o", "cpu")
    assert s["num_images"] == 3 and s["num_instances"] > 0
    meta = _json(tmp_path / "o" / "images.json")
    assert [im["id"] for im in meta["images"]] == [int(i) for i in ids]
    assert_dataset_fields(meta, ds.class_names, cats)
    assert next(c["name"] for c in meta["categories"] if c["id"] == 90) == "toothbrush"
    results = _json(tmp_path / "o" / "predictions.json")
    assert_results_fields(results, {im["id"]: im for im in meta["images"]}, cats)
    gt = quiet_coco(str(ann))
    with contextlib.redirect_stdout(io.StringIO()):
        e = COCOeval(gt, gt.loadRes(str(tmp_path / "o" / "predictions.json")), "segm")
        e.params.imgIds = [int(i) for i in ids]
        e.evaluate()
        e.accumulate()
        e.summarize()
    assert 0.0 <= e.stats[0] <= 1.0


def test_overlay_selection_threshold_else_the_best_three():
    from bestie.stages.predict import overlay_selection

    np.testing.assert_array_equal(overlay_selection(np.array([0.5, 0.1, 0.31, 0.2]), 0.3, 3),
                                  [True, False, True, False])
    # nothing reaches 0.3 (a weak model): the 3 best are drawn instead of a blank overlay
    np.testing.assert_array_equal(overlay_selection(np.array([0.05, 0.16, 0.01, 0.1, 0.12]), 0.3, 3),
                                  [False, True, False, True, True])
    assert not overlay_selection(np.array([0.05, 0.16]), 0.3, 0).any()  # top_k 0: only the threshold
    assert overlay_selection(np.zeros(0), 0.3, 3).shape == (0,)
