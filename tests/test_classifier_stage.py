"""Stages 1-2: classifier model and training (resume, log, checkpoint), CAM / peak stage outputs."""

import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bestie import engine
from bestie.errors import ConfigError, TrainingError
from bestie.models.classifier import CAMClassifier
from bestie.stages import make_cams as mc
from bestie.stages import train_classifier as tc

REAL_VOC = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128-voc"


def test_average_precision_by_hand():
    scores = np.array([[0.9, 0.1, 0.3], [0.8, 0.2, 0.2], [0.7, 0.3, 0.1], [0.6, 0.4, 0.0]])
    labels = np.array([[1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]])
    ap = tc.average_precision(scores, labels)
    assert ap[0] == pytest.approx((1 / 1 + 2 / 3) / 2)  # positives at ranks 1 and 3
    assert ap[1] == pytest.approx(1.0)  # the single positive has the top score
    assert np.isnan(ap[2])  # no positive


@torch.no_grad()
def test_cam_classifier_outputs_and_param_groups():
    torch.set_num_threads(1)
    model = CAMClassifier("tf_efficientnet_lite0", 5, weights=None, use_pam=True, num_extra_convs=2,
                          extra_channels=16, output_stride=16, freeze_bn=True, warn_random=False)
    out = model.eval()(torch.randn(2, 3, 64, 96))
    assert out["cams"].shape == (2, 5, 4, 6) and out["logits"].shape == (2, 5)
    torch.testing.assert_close(out["logits"], out["cams"].mean((2, 3)))
    assert model.stride == 16 and model.mean == (0.5, 0.5, 0.5)
    # frozen BN: the backbone's only biases (BN) are left out of the optimizer
    assert [g["name"] for g in model.param_groups(0.01)] == ["backbone_weight", "new_weight", "new_bias"]
    trainable_bn = CAMClassifier("tf_efficientnet_lite0", 5, weights=None, extra_channels=16, freeze_bn=False,
                                 warn_random=False)
    groups = trainable_bn.param_groups(0.01, weight_decay=1e-4)
    by_name = {g["name"]: g for g in groups}
    assert {k: v["lr"] for k, v in by_name.items()} == pytest.approx(
        {"backbone_weight": 0.01, "backbone_bias": 0.02, "new_weight": 0.1, "new_bias": 0.2})
    assert all(g["weight_decay"] == 1e-4 for g in groups)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(trainable_bn.parameters()))
    new = {id(p) for p in [*trainable_bn.extra.parameters(), *trainable_bn.classifier.parameters()]}
    assert {id(p) for p in by_name["new_weight"]["params"] + by_name["new_bias"]["params"]} == new
    model.train()
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and not any(p.requires_grad for m in bns for p in m.parameters())
    plain = CAMClassifier("tf_efficientnet_lite0", 5, weights=None, use_pam=False, num_extra_convs=0,
                          backbone_head=True, warn_random=False)
    assert not any(type(m).__name__ == "PAM" for m in plain.modules())
    assert plain.classifier.in_channels == 1280  # class maps on the ImageNet feature head
    assert plain.eval()(torch.randn(1, 3, 64, 64))["cams"].shape == (1, 5, 2, 2)
    head_ids = {id(p) for p in plain.backbone.head.parameters()}
    assert head_ids <= {id(p) for g in plain.param_groups(0.1) if g["name"].startswith("backbone") for p in g["params"]}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from bestie.data import generate_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    generate_demo_dataset(root, num_train=6, num_val=0, image_size=(64, 80), seed=1)
    return {"format": "voc", "root": str(root), "split": "train", "classes": ["disc", "square", "triangle"]}


def _cfg(**kw):
    base = dict(weights=None, epochs=2, batch_size=2, resize=64, crop_size=48, checkpoint_every=2,
                num_extra_convs=1, extra_channels=16, lr_steps=(2,), optimizer="sgd", lr=0.01)
    base.update(kw)
    return tc.ClassifierConfig(**base)


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_train_stage_resumes_to_the_same_model(demo, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    cfg = _cfg()
    straight = tmp_path / "a" / "pam.pt"
    tc.run(cfg, demo, straight, tmp_path / "a" / "log.jsonl", device="cpu")
    ck = torch.load(straight, map_location="cpu", weights_only=True)
    assert ck["extra"]["kind"] == "cam_classifier" and ck["extra"]["num_classes"] == 3
    assert ck["iteration"] == 6  # 6 images / batch 2 = 3 iterations x 2 epochs
    lines = [json.loads(l) for l in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [l["iteration"] for l in lines if "loss" in l and "event" not in l] == [1, 2, 3, 4, 5, 6]
    assert lines[-1]["event"] == "final" and 0 <= lines[-1]["train_mAP"] <= 100
    # lr / 10 at the start of epoch 2 (iteration 4)
    assert [l["lr"] for l in lines if l.get("iteration") in (3, 4) and "event" not in l] == pytest.approx([0.01, 0.001])

    # kill the run during iteration 5 (after the partial checkpoint of iteration 4), then rerun
    out = tmp_path / "b" / "pam.pt"
    real = engine.check_finite

    def dies_at_4(losses, it):
        if it == 4:
            raise TrainingError("simulated crash")
        real(losses, it)

    monkeypatch.setattr(engine, "check_finite", dies_at_4)
    with pytest.raises(TrainingError):
        tc.run(cfg, demo, out, tmp_path / "b" / "log.jsonl", device="cpu")
    partial = tc.partial_checkpoint_path(out)
    assert partial == tmp_path / "b" / "pam.pt.partial" and partial.is_file() and not out.exists()
    monkeypatch.setattr(engine, "check_finite", real)
    with pytest.raises(ConfigError, match="partial"):  # another config must not resume this run
        tc.run(replace(cfg, lr=0.02), demo, out, tmp_path / "b" / "log.jsonl", device="cpu")
    tc.run(cfg, demo, out, tmp_path / "b" / "log.jsonl", device="cpu")
    assert out.is_file() and not partial.exists()
    wa, wb = _weights(straight), _weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_make_cams_outputs_and_scores(demo, tmp_path):
    torch.set_num_threads(1)
    from bestie.data import build_dataset
    from bestie.io.h5store import H5Reader

    ckpt = tmp_path / "pam.pt"
    tc.run(_cfg(epochs=1), demo, ckpt, tmp_path / "log.jsonl", device="cpu")
    cfg = mc.CamConfig(out_stride=4, overlays=2, peak_threshold=0.0)
    paths = dict(out_cams=tmp_path / "cams.h5", out_points=tmp_path / "points.h5",
                 out_diagnostics=tmp_path / "diag.json", out_overlay_dir=tmp_path / "ov")
    mc.run(cfg, demo, ckpt, device="cpu", **paths)
    ds = build_dataset(demo)
    diag = json.loads(paths["out_diagnostics"].read_text())
    n = len(ds.class_names) + 1
    conf_bg = np.zeros((n, n), np.int64)
    conf_t = np.zeros((n, n), np.int64)
    t_index = mc.THRESHOLDS.index(0.5)
    with H5Reader(paths["out_cams"]) as rc, H5Reader(paths["out_points"]) as rp:
        assert rc.ids() == list(ds.ids) == rp.ids()
        for img_id in ds.ids:
            arr = rc.read(img_id)
            labels = ds.labels(img_id)
            assert arr["cams"].dtype == np.float16 and arr["classes"].dtype == np.int16
            assert arr["classes"].tolist() == list(labels)
            assert arr["cams"].shape == (len(labels), 16, 20)  # ceil(64 / 4), ceil(80 / 4)
            assert tuple(rc.attrs(img_id)["image_size"]) == (64, 80)
            pts = rp.read(img_id)["points"]
            assert pts.dtype == np.float32 and pts.shape[1] == 4
            assert set(pts[:, 2].astype(int)) <= set(labels)
            assert (pts[:, 0] >= 0).all() and (pts[:, 0] < 80).all() and (pts[:, 1] < 64).all()
            gt = ds.semantic_gt(img_id)
            valid = gt != 255
            g = gt[valid].astype(np.int64)
            conf_bg += np.bincount(g * n, minlength=n * n).reshape(n, n)
            # independent threshold-0.5 label map from the stored CAMs
            up = np.stack([cv2.resize(c.astype(np.float32), (80, 64), interpolation=cv2.INTER_LINEAR)
                           for c in arr["cams"]]) if len(labels) else np.zeros((0, 64, 80), np.float32)
            pred = np.zeros((64, 80), np.int64)
            if len(labels):
                pred = np.where(up.max(0) > 0.5, np.asarray(labels)[up.argmax(0)] + 1, 0)
            conf_t += np.bincount(g * n + pred[valid], minlength=n * n).reshape(n, n)

    def miou(cm):
        tp = np.diag(cm).astype(float)
        union = cm.sum(0) + cm.sum(1) - tp
        return 100 * np.mean(tp[union > 0] / union[union > 0])

    assert diag["baselines"]["all_background"] == pytest.approx(miou(conf_bg))
    assert diag["miou_per_threshold"][t_index] == pytest.approx(miou(conf_t), abs=0.5)  # fp16 storage
    assert diag["best_mIoU"] == pytest.approx(max(diag["miou_per_threshold"]))
    assert diag["best_threshold"] in mc.THRESHOLDS and diag["num_scored"] == len(ds.ids)
    assert 0 <= diag["peaks"]["instances_one_peak"] <= diag["peaks"]["instances"]
    assert len(list(paths["out_overlay_dir"].glob("*.png"))) == 2

    # inference at output stride 8 of a stride-16 model: same weights, the stride-16 function on a twice
    # denser grid (TF-same padding puts the stride-16 samples at the odd positions); borders differ
    dense = tmp_path / "dense.pt"
    tc.run(_cfg(epochs=1, use_pam=False, checkpoint_every=0), demo, dense, tmp_path / "dense.jsonl", device="cpu")
    m16, _ = mc.load_classifier(dense, torch.device("cpu"))
    m8, _ = mc.load_classifier(dense, torch.device("cpu"), output_stride=8)
    assert m8.extra[0].dilation == (2, 2)  # the extra 3x3 conv follows the finer grid
    assert (m16.stride, m8.stride) == (16, 8)
    x = torch.randn(1, 3, 128, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = m16(x)["cams"], m8(x)["cams"]
    assert a.shape[-2:] == (8, 10) and b.shape[-2:] == (16, 20)
    torch.testing.assert_close(b[..., 1::2, 1::2][..., 2:-2, 2:-2], a[..., 2:-2, 2:-2], rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError):
        mc.load_classifier(dense, torch.device("cpu"), output_stride=32)


def test_make_cams_of_an_ensemble_averages_its_members(demo, tmp_path):
    torch.set_num_threads(1)
    from bestie.cam import average_cams
    from bestie.errors import ArtifactError
    from bestie.io.h5store import H5Reader

    members = []
    for seed in (1, 2):
        ckpt = tmp_path / f"dense_seed{seed}.pt"
        tc.run(_cfg(epochs=1, use_pam=False, checkpoint_every=0, seed=seed), demo, ckpt,
               tmp_path / f"log{seed}.jsonl", device="cpu")
        members.append(ckpt)
    cfg = mc.CamConfig(out_stride=1, overlays=0)

    def cams(checkpoint, name):
        mc.run(cfg, demo, checkpoint, tmp_path / f"{name}.h5", None, tmp_path / f"{name}.json", None, device="cpu")
        with H5Reader(tmp_path / f"{name}.h5") as r:
            return {i: r.read(i)["cams"].astype(np.float32) for i in r.ids()}, json.loads(
                (tmp_path / f"{name}.json").read_text())

    (one, d1), (two, d2) = cams(members[0], "one"), cams(members[1], "two")
    ens, diag = cams(members, "ens")
    assert diag["checkpoint"] == [str(m) for m in members] and d1["checkpoint"] == str(members[0])
    assert diag["classification_mAP"]["train"] == pytest.approx(
        (d1["classification_mAP"]["train"] + d2["classification_mAP"]["train"]) / 2)
    differs = False
    for img_id, got in ens.items():
        # out_stride 1: the stored CAMs are the full-resolution ones (float16)
        np.testing.assert_allclose(got, average_cams([one[img_id], two[img_id]]), atol=2e-3)
        differs |= bool(got.size) and not np.allclose(one[img_id], two[img_id], atol=1e-2)
    assert differs  # the seeds gave different members, so the average is not a copy of one

    pam = tmp_path / "pam.pt"
    tc.run(_cfg(epochs=1, checkpoint_every=0), demo, pam, tmp_path / "pam.jsonl", device="cpu")
    with pytest.raises(ArtifactError, match="differ in classes or in PAM use"):
        mc.run(cfg, demo, [members[0], pam], tmp_path / "bad.h5", None, tmp_path / "bad.json", None, device="cpu")
    assert not (tmp_path / "bad.h5").exists()


def test_ensemble_seeds_must_be_distinct_and_several():
    assert tc.ClassifierConfig(ensemble_seeds=(1, 2)).ensemble_seeds == (1, 2)
    for bad in ((5,), (1, 1)):
        with pytest.raises(ConfigError, match="ensemble_seeds"):
            tc.ClassifierConfig(ensemble_seeds=bad)


def test_peak_quality_counts_by_hand():
    masks = np.zeros((2, 10, 10), bool)
    masks[0, :5, :5] = True
    masks[1, 5:, 5:] = True
    sem = np.zeros((10, 10), np.uint8)
    sem[:5, :5] = 1
    sem[5:, 5:] = 3
    pts = np.array([[1, 1, 0, 0.9], [2, 2, 0, 0.8], [7, 7, 2, 0.9], [8, 1, 0, 0.95], [3, 3, 0, 0.2]], np.float32)
    got = mc.peak_quality(pts, {"masks": masks, "labels": np.array([0, 2])}, sem)
    # instance 0 holds two strong peaks of its class, instance 1 exactly one; (8, 1) lies on background;
    # the 0.2 peak is below 0.7 and not counted
    assert got == {"instances": 2, "instances_one_peak": 1, "peaks": 4, "peaks_on_background": 1}


def test_train_set_on_real_data():
    if not REAL_VOC.is_dir():
        pytest.skip(f"real data folder {REAL_VOC} is absent")
    from bestie.data import build_dataset

    ds = build_dataset({"format": "voc", "root": str(REAL_VOC), "split": "train"})
    ts = tc.ClassifierTrainSet(ds, tc.ClassifierConfig(), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    x, y = ts[(3, 0)]
    assert x.shape == (3, 321, 321) and x.dtype == torch.float32 and -1.0 <= x.min() and x.max() <= 1.0
    assert np.flatnonzero(y.numpy()).tolist() == list(ds.labels(ds.ids[3]))
    assert torch.equal(ts[(3, 0)][0], x)  # same (index, epoch): same augmentation
    assert not torch.equal(ts[(3, 1)][0], x)  # next epoch: another one


def test_train_stage_under_single_process_ddp_matches_plain_run(demo, tmp_path, monkeypatch):
    """The torchrun path (env RANK / WORLD_SIZE, gloo on CPU, DDP wrapper) gives the plain run's model."""
    import socket

    torch.set_num_threads(1)
    cfg = _cfg(epochs=1, checkpoint_every=0)
    plain = tmp_path / "plain.pt"
    tc.run(cfg, demo, plain, tmp_path / "plain.jsonl", device="cpu")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    ddp = tmp_path / "ddp.pt"
    try:
        tc.run(cfg, demo, ddp, tmp_path / "ddp.jsonl", device="cpu")
        assert torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    wa, wb = _weights(plain), _weights(ddp)
    assert set(wa) == set(wb)  # saved unwrapped: no "module." prefix
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6) for k in wa)


def test_images_without_labels_are_negatives():
    class Stub:
        ids = ["a", "b"]
        num_classes = 4
        class_names = ("w", "x", "y", "z")

        def image(self, img_id):
            return np.full((40, 50, 3), 100 if img_id == "a" else 200, np.uint8)

        def labels(self, img_id):
            return (1, 3) if img_id == "a" else ()

    ts = tc.ClassifierTrainSet(Stub(), tc.ClassifierConfig(resize=40, crop_size=32), (0.5,) * 3, (0.5,) * 3)
    assert len(ts) == 2
    x, y = ts[(1, 0)]
    assert x.shape == (3, 32, 32) and y.tolist() == [0, 0, 0, 0]  # all-negative target, still a sample
    assert ts[(0, 0)][1].tolist() == [0, 1, 0, 1]


def test_configured_weights_missing_or_mismatched_fail_before_training(demo, tmp_path):
    from bestie.errors import WeightsError
    from bestie.models.backbones import create_backbone

    out, log = tmp_path / "run" / "pam.pt", tmp_path / "run" / "log.jsonl"
    with pytest.raises(WeightsError, match=r"nowhere/lite0\.pth"):
        tc.run(_cfg(weights=str(tmp_path / "nowhere" / "lite0.pth")), demo, out, log, device="cpu")
    assert not out.parent.exists()  # nothing written: no log, no partial, no checkpoint
    state = create_backbone("tf_efficientnet_lite0", None, warn_random=False).body.state_dict()
    state["conv_stem.weight"] = torch.zeros(5, 3, 3, 3)  # 5 output channels instead of 32
    bad = tmp_path / "bad_lite0.pth"
    torch.save(state, bad)
    with pytest.raises(WeightsError, match=r"bad_lite0\.pth.*conv_stem\.weight"):
        tc.run(_cfg(weights=str(bad)), demo, out, log, device="cpu")
    assert not out.parent.exists()


def test_one_image_with_an_odd_id_and_more_workers_than_images(tmp_path):
    from bestie.data import generate_demo_dataset

    root = tmp_path / "tiny"
    generate_demo_dataset(root, num_train=1, num_val=0, image_size=(64, 80), seed=3)
    odd = "Ünï-001.a_b(2)"  # not the YYYY_NNNNNN form; a dot, non-ASCII letters, brackets
    for sub, ext in (("JPEGImages", ".jpg"), ("Annotations", ".xml"), ("SegmentationClass", ".png"),
                     ("SegmentationObject", ".png")):
        (root / sub / f"demo_0001{ext}").rename(root / sub / f"{odd}{ext}")
    (root / "ImageSets/Segmentation/train.txt").write_text(odd + "\n")
    ds_cfg = {"format": "voc", "root": str(root), "split": "train", "classes": ["disc", "square", "triangle"]}
    out = tmp_path / "run" / "pam.pt"
    tc.run(_cfg(epochs=2, batch_size=2, num_workers=2, checkpoint_every=1, lr_steps=()), ds_cfg, out,
           tmp_path / "run" / "log.jsonl", device="cpu")
    ck = torch.load(out, map_location="cpu", weights_only=True)
    assert ck["iteration"] == 2 and ck["extra"]["num_images"] == 1  # one batch of one image per epoch
    assert not tc.partial_checkpoint_path(out).exists()
    lines = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [l["loss"] for l in lines if "loss" in l and "event" not in l]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_final_log_holds_held_out_classification_map(tmp_path):
    from bestie.data import build_dataset, generate_demo_dataset

    torch.set_num_threads(1)
    root = tmp_path / "demo"
    generate_demo_dataset(root, num_train=4, num_val=3, image_size=(64, 80), seed=2)
    ds_cfg = {"format": "voc", "root": str(root), "train_split": "train", "eval_split": "val",
              "classes": ["disc", "square", "triangle"]}
    cfg = _cfg(epochs=1, checkpoint_every=0)
    out = tmp_path / "dense.pt"
    tc.run(cfg, ds_cfg, out, tmp_path / "log.jsonl", device="cpu")
    final = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    ck = torch.load(out, map_location="cpu", weights_only=True)
    # recomputed independently on the 3 val images from the saved weights
    model = tc.build_model(cfg, 3, load_weights=False)
    model.load_state_dict(ck["model"])
    val = build_dataset(ds_cfg, split="val")
    assert len(val.ids) == 3
    expected = tc._evaluate_map(model, val, cfg, model.mean, model.std, torch.device("cpu"))
    assert final["val_mAP"] == pytest.approx(expected) and ck["extra"]["val_mAP"] == pytest.approx(expected)
    assert 0 <= expected <= 100
