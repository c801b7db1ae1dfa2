"""BESTIE training data (bestie.instance_data) and the training stage (bestie.stages.train_bestie):
samples and crop padding, sample order, DDP gradients, kill + resume, checkpoint naming, plain launch."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bestie.config import from_dict
from bestie.data import DEMO_CLASSES, build_dataset, centers_from_instances, generate_demo_dataset
from bestie.errors import ArtifactError, ConfigError
from bestie.engine import ResumableSampler
from bestie.instance_data import BestieTrainDataset, DenseTargets, collate_compact
from bestie.io.h5store import H5Writer
from bestie.params import PseudoLabelParams
from bestie.targets import make_pseudo_instance_labels

torch.set_num_threads(1)
MEAN = (0.5, 0.5, 0.5)
BAD_POINT_ID_INDEX = 0  # the first train image gets one off-image peak point


# ------------------------------------------------------------------------------------------ fixtures
def _write_inputs(root: Path) -> tuple[dict, Path, Path]:
    """Demo dataset (4 train + 2 val, 64x64), a WSSS store made of the GT class maps and a points store
    made of the GT instance centers (conf 1), one off-image point and one low-confidence point added."""
    generate_demo_dataset(root, num_train=4, num_val=2, image_size=(64, 64))
    ds_cfg = {"format": "voc", "root": str(root), "classes": list(DEMO_CLASSES), "train_split": "train"}
    wsss, points = root / "wsss.h5", root / "points.h5"
    ds = build_dataset(ds_cfg, "trainval")
    with H5Writer(wsss, attrs={"stage": "test"}) as ww, H5Writer(points, attrs={"stage": "test"}) as pw:
        for i, img_id in enumerate(ds.ids):
            ww.write(img_id, wsss=ds.semantic_gt(img_id))
            gt = ds.instances_gt(img_id)
            pts = centers_from_instances(gt["masks"], gt["labels"])
            if i == BAD_POINT_ID_INDEX:
                pts = np.concatenate([pts, np.array([[-7.0, 3.0, 0.0, 0.9], [5.0, 5.0, 0.0, 0.2]], np.float32)])
            pw.write(img_id, points=pts)
    return ds_cfg, wsss, points


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    return _write_inputs(tmp_path_factory.mktemp("bestie_demo"))


def _train_ds(inputs, **kw) -> BestieTrainDataset:
    ds_cfg, wsss, points = inputs
    setting = kw.pop("setting", "image")
    args = dict(pseudo=PseudoLabelParams(setting=setting, min_area=10), crop_size=48, resize=None, scales=(1.0,),
                mean=MEAN, std=MEAN)
    args.update(kw)
    pts = None if setting == "point" else points
    return BestieTrainDataset(build_dataset(ds_cfg, "train"), wsss, pts, **args)


def _tiny_cfg(**kw):
    from bestie.stages.train_bestie import BestieConfig

    base = dict(weights=None, batch_size=2, crop_size=48, resize=None, scales=(0.9, 1.0, 1.1), max_iters=4,
                warmup_iters=0, lr=1e-3, min_area=10, num_workers=0, checkpoint_every=2, val_every=2,
                val_split="val", log_every=1, head_channels=16, fusion_channels=16, amp=False)
    base.update(kw)
    return BestieConfig(**base)


# ------------------------------------------------------------------------------------------ samples
def test_sample_tensors(inputs) -> None:
    d = _train_ds(inputs)
    ds = d.dataset
    compact = d[(1, 0)]
    C, S = 3, 48
    # the loader's compact form: no dense (C, S, S) target, the semantic map as uint8
    assert compact["semantic"].shape == (S, S) and compact["semantic"].dtype == torch.uint8
    assert compact["components"].shape == (S, S) and compact["components"].dtype == torch.int16
    assert "center" not in compact and compact["table"].shape[1] == 4 and compact["gaussians"].shape[1] == 3
    s = DenseTargets(d)[(1, 0)]
    n = int(s["num_points"])
    ref = make_pseudo_instance_labels(compact["semantic"].numpy(), ds.labels(d.ids[1]), s["points"][:n].numpy(),
                                      num_classes=C, params=d.pseudo)
    for key in ("center", "offset", "weight"):  # the rendered targets are those of the dense function
        assert torch.equal(s[key], torch.from_numpy(ref[key])), key
    assert int(s["num_instances"]) == ref["num_instances"]
    assert s["image"].shape == (3, S, S) and s["image"].dtype == torch.float32
    assert s["semantic"].shape == (S, S) and s["semantic"].dtype == torch.int64
    assert s["center"].shape == (C, S, S) and s["offset"].shape == (2, S, S) and s["weight"].shape == (S, S)
    assert set(torch.unique(s["semantic"]).tolist()) <= {0, 1, 2, 3, 255}
    expected = torch.zeros(C)
    expected[list(ds.labels(d.ids[1]))] = 1
    assert torch.equal(s["labels"], expected)
    # weighted pixels lie on WSSS foreground; offsets vanish off the weighted pixels
    w = s["weight"] > 0
    assert w.any()
    assert bool(((s["semantic"] >= 1) & (s["semantic"] <= C))[w].all())
    assert float(s["offset"][:, ~w].abs().max()) == 0.0
    n = int(s["num_points"])
    assert s["points"].shape == (128, 4) and float(s["points"][n:].abs().sum()) == 0.0
    # deterministic per (seed, epoch, index); another epoch gives another augmentation
    again = d[(1, 0)]
    assert all(torch.equal(compact[k], again[k]) for k in compact)
    assert any(not torch.equal(d[(1, e)]["image"], s["image"]) for e in (1, 2, 3))


def test_off_image_points_dropped_and_counted(inputs) -> None:
    d = _train_ds(inputs, crop_size=64)
    raw = d.load_raw(BAD_POINT_ID_INDEX)
    assert raw["points_dropped"] == 1
    assert np.all((raw["points"][:, 0] >= 0) & (raw["points"][:, 1] >= 0))
    assert int(d[(BAD_POINT_ID_INDEX, 0)]["points_dropped"]) == 1
    assert int(d[(BAD_POINT_ID_INDEX + 1, 0)]["points_dropped"]) == 0


def test_crop_padding_is_ignore_not_background(inputs) -> None:
    """A 96 px crop of a 64 px image: the WSSS map appears unchanged in one 64x64 window, every other pixel
    is 255 (ignore) - never 0 (background, the public code's padding) - and carries no instance weight."""
    d = _train_ds(inputs, crop_size=96, photometric=False, flip=False)
    dense = DenseTargets(d)
    raw = d.load_raw(2)["semantic"]
    for epoch in range(3):
        s = dense[(2, epoch)]
        sem = s["semantic"].numpy()
        hits = [(y, x) for y in range(33) for x in range(33) if np.array_equal(sem[y:y + 64, x:x + 64], raw)]
        assert len(hits) >= 1
        y, x = hits[0]
        outside = np.ones_like(sem, dtype=bool)
        outside[y:y + 64, x:x + 64] = False
        assert outside.sum() == 96 * 96 - 64 * 64
        assert np.all(sem[outside] == 255)
        assert float(s["weight"].numpy()[outside].max()) == 0.0
        pad_value = (round(0.5 * 255) / 255 - 0.5) / 0.5  # image padded with the normalisation mean pixel
        assert np.allclose(s["image"].numpy()[:, outside], pad_value, atol=1e-6)


def test_point_setting_takes_gt_centers(inputs) -> None:
    d = _train_ds(inputs, setting="point", crop_size=64, photometric=False, flip=False)
    s = d[(1, 0)]
    gt = d.dataset.instances_gt(d.ids[1])
    ref = centers_from_instances(gt["masks"], gt["labels"])
    n = int(s["num_points"])
    assert n == len(ref)  # crop = image size: nothing is cut away
    got = s["points"][:n].numpy()
    key = lambda a: sorted(map(tuple, a.tolist()))  # noqa: E731
    assert key(got) == key(ref)


def test_empty_label_images_are_excluded(inputs) -> None:
    ds_cfg, wsss, points = inputs
    base = build_dataset(ds_cfg, "train")

    class OneEmpty:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def labels(self, img_id):
            return () if img_id == self.inner.ids[0] else self.inner.labels(img_id)

    d = BestieTrainDataset(OneEmpty(base), wsss, points, crop_size=32, resize=None, mean=MEAN, std=MEAN)
    assert len(d) == len(base.ids) - 1 and d.num_skipped_empty == 1
    assert base.ids[0] not in d.ids


def test_missing_store_entries_are_named(inputs, tmp_path: Path) -> None:
    ds_cfg, wsss, points = inputs
    ds = build_dataset(ds_cfg, "train")
    partial = tmp_path / "wsss_partial.h5"
    with H5Writer(partial) as w:
        w.write(ds.ids[0], wsss=ds.semantic_gt(ds.ids[0]))
    with pytest.raises(ArtifactError, match="wsss_partial.h5.*missing for 3 of 4"):
        BestieTrainDataset(ds, partial, points)
    with pytest.raises(ConfigError, match="points"):
        BestieTrainDataset(ds, wsss, None, pseudo=PseudoLabelParams(setting="image"))


def _stream(n: int, B: int, **kw) -> ResumableSampler:
    """BESTIE's sampler: the stream layout of the engine's sampler, numpy permutations."""
    return ResumableSampler(n, kw.pop("seed"), global_batch=B, permutation="numpy", **kw)


def test_iteration_sampler_is_shard_and_resume_consistent() -> None:
    n, B = 5, 4
    one = _stream(n, B, seed=3)
    two = [_stream(n, B, rank=r, world_size=2, seed=3) for r in range(2)]
    for t in range(6):
        assert one.keys_for_iteration(t) == two[0].keys_for_iteration(t) + two[1].keys_for_iteration(t)
    # each epoch visits every index exactly once
    stream = [k for t in range(5) for k in one.keys_for_iteration(t)]  # 20 keys = 4 epochs of 5
    for e in range(4):
        assert sorted(i for (i, ep) in stream if ep == e) == list(range(n))
    # a resumed sampler continues the same stream
    it_full, it_res = iter(_stream(n, B, seed=3)), iter(_stream(n, B, seed=3, start_iteration=3))
    full = [next(it_full) for _ in range(7 * B)]
    assert [next(it_res) for _ in range(4 * B)] == full[3 * B:]
    with pytest.raises(ConfigError, match="divisible"):
        _stream(n, 3, world_size=2, seed=3)


# ------------------------------------------------------------------------------------------ config
def test_config_defaults_and_validation() -> None:
    from bestie.stages.train_bestie import BestieConfig

    cfg = BestieConfig()
    assert (cfg.sigma, cfg.min_area, cfg.point_threshold, cfg.center_threshold_refine, cfg.nms_kernel, cfg.beta,
            cfg.max_instances) == (6.0, 50, 0.7, 0.3, 41, 3.0, 5)
    assert (cfg.seg_weight, cfg.center_weight, cfg.offset_weight, cfg.top_k_percent) == (1.0, 200.0, 0.01, 0.2)
    assert (cfg.lr, cfg.weight_decay, cfg.warmup_iters, cfg.max_iters, cfg.poly_power) == (5e-5, 0.0, 2000, 50000, 0.9)
    assert (cfg.batch_size, cfg.crop_size, cfg.resize, cfg.bn_momentum, cfg.seed) == (16, 416, 480, 0.01, 3407)
    assert cfg.scales == pytest.approx((0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3))
    got = from_dict(BestieConfig, {"scales": [0.5, 1.0], "setting": "point"}, "bestie")
    assert got.scales == (0.5, 1.0) and got.setting == "point"
    with pytest.raises(ConfigError, match="bestie.bogus"):
        from_dict(BestieConfig, {"bogus": 1}, "bestie")
    with pytest.raises(ConfigError, match="setting"):
        BestieConfig(setting="box")


# ------------------------------------------------------------------------------------------ training
def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


class _Killed(RuntimeError):
    pass


def test_kill_resume_matches_straight_run_and_names_checkpoints(inputs, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from bestie import engine
    from bestie.stages import train_bestie as tb
    from bestie.stages.predict_instances import load_bestie_model

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)  # a plain `python` launch: no torchrun variables at all
    ds_cfg, wsss, points = inputs
    cfg = _tiny_cfg()

    # 1) straight run of 4 iterations
    a_ckpt, a_log = tmp_path / "a" / "model.pt", tmp_path / "a" / "log.jsonl"
    summary = tb.run(cfg, ds_cfg, wsss, points, a_ckpt, a_log, device="cpu")
    assert summary["iterations"] == 4
    last = _state(a_ckpt)
    assert last["extra"]["kind"] == "last" and last["iteration"] == 4
    assert not tb.partial_checkpoint_path(a_ckpt).exists()
    recs = _records(a_log)
    train = [r for r in recs if r["event"] == "train"]
    assert [r["iteration"] for r in train] == [1, 2, 3, 4]
    assert all(r["refined"] == 1.0 for r in train)  # refine_iter 0: refinement from the first iteration
    assert all(0.0 <= r["refined_pixel_share"] <= 1.0 for r in train)
    assert summary["refinement"]["iterations_run"] == 4
    # 4 iterations x batch 2 = 2 epochs of the 4 images: the image with the off-image point is loaded
    # twice, and its dropped point is counted in the log each time
    assert sum(r["points_dropped"] for r in train) == 2
    vals = [r for r in recs if r["event"] == "val"]
    assert [r["iteration"] for r in vals] == [2, 4] and all(r["num_images"] == 2 for r in vals)
    best_path = tb.best_checkpoint_path(a_ckpt)
    assert best_path.name == "model.best.pt"
    scored = [r for r in vals if r["mAP50"] is not None]
    if scored:  # the best file holds the weights of the best validation, under its own name
        best = _state(best_path)
        assert best["extra"]["kind"] == "best"
        top = max(scored, key=lambda r: r["mAP50"])  # first maximum: later equal scores do not replace it
        assert best["iteration"] == top["iteration"] and best["extra"]["val"]["mAP50"] == top["mAP50"]
        assert last["extra"]["best"]["iteration"] == top["iteration"]
    else:
        assert not best_path.exists()
    from bestie.models.instance import BestieNet

    torch.manual_seed(cfg.seed)
    init = BestieNet("tf_efficientnet_lite0", 3, None, "light", head_channels=16, fusion_channels=16)
    assert any(not torch.equal(v, init.state_dict()[k]) for k, v in last["model"].items()
               if v.is_floating_point())  # training moved the weights

    # 2) the same run killed during iteration 3 (after the partial checkpoint of iteration 2) ...
    b_ckpt, b_log = tmp_path / "b" / "model.pt", tmp_path / "b" / "log.jsonl"
    real_step = tb.train_step

    def killing_step(model, batch, loss_fn, cfg_, iteration, *args, **kw):
        if iteration == 2:
            raise _Killed("simulated kill")
        return real_step(model, batch, loss_fn, cfg_, iteration, *args, **kw)

    monkeypatch.setattr(tb, "train_step", killing_step)
    with pytest.raises(_Killed):
        tb.run(cfg, ds_cfg, wsss, points, b_ckpt, b_log, device="cpu")
    partial = tb.partial_checkpoint_path(b_ckpt)
    assert partial.name == "model.pt.partial" and not b_ckpt.exists()
    assert _state(partial)["iteration"] == 2 and _state(partial)["extra"]["kind"] == "partial"
    monkeypatch.setattr(tb, "train_step", real_step)

    # ... a different config must not resume from it ...
    with pytest.raises(ConfigError, match="lr"):
        tb.run(dataclasses.replace(cfg, lr=2e-3), ds_cfg, wsss, points, b_ckpt, tmp_path / "x.jsonl", device="cpu")

    # ... and started again it resumes and ends with exactly the straight run's weights
    summary_b = tb.run(cfg, ds_cfg, wsss, points, b_ckpt, b_log, device="cpu")
    assert summary_b["resumed_from"] == 2
    resumed = _state(b_ckpt)
    assert resumed["iteration"] == 4 and not partial.exists()
    assert resumed["model"].keys() == last["model"].keys()
    for k, v in last["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    b_train = [r for r in _records(b_log) if r["event"] == "train"]
    a_by_it = {r["iteration"]: r["total"] for r in train}
    assert all(r["total"] == a_by_it[r["iteration"]] for r in b_train)  # identical losses, also after resume

    # the checkpoint rebuilds into a working network
    model, extra = load_bestie_model(b_ckpt)
    assert extra["kind"] == "last" and extra["class_names"] == list(DEMO_CLASSES)
    assert model(torch.zeros(1, 3, 32, 32))["seg"].shape == (1, 4, 32, 32)


def test_inert_refinement_is_logged_and_warned(inputs, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A centre head that never reaches center_threshold_refine gives no refined target: the run says so."""
    from bestie.stages import train_bestie as tb

    ds_cfg, wsss, points = inputs
    cfg = _tiny_cfg(max_iters=3, val_every=0, val_split=None, checkpoint_every=10, center_threshold_refine=1e6,
                    refine_iter=1)
    ckpt, log = tmp_path / "model.pt", tmp_path / "log.jsonl"
    with caplog.at_level("WARNING", logger="bestie.stages.train_bestie"):
        summary = tb.run(cfg, ds_cfg, wsss, points, ckpt, log, device="cpu")
    # iteration 0 is before refine_iter; iterations 1 and 2 refine but find no centre above 1e6
    assert summary["refinement"] == {"iterations_run": 2, "iterations_with_targets": 0}
    train = [r for r in _records(log) if r["event"] == "train"]
    assert [r["refined"] for r in train] == [0.0, 1.0, 1.0]
    assert [r["refined_pixel_share"] for r in train] == [0.0, 0.0, 0.0]
    # the refined terms are 0, so the total carries half the pseudo centre loss
    assert all(r["center_refined"] == 0.0 for r in train[1:])
    assert all(r["center"] == pytest.approx(0.5 * r["center_pseudo"]) for r in train[1:])
    assert any("never produced a refined target" in m for m in caplog.messages)
    # the learning probe is in every train record and the end record: a freshly initialised head
    # (N(0, 0.001) convs) sits at the all-zero prediction, so its MSE equals the zero-prediction MSE
    for rec in train + [summary["probe"]]:
        assert rec["probe_peaks"] > 0 and 0.0 <= rec["probe_peak_share"] <= 1.0
        assert rec["probe_center_mse_zero"] > 0
    assert train[0]["probe_peak_score"] == pytest.approx(0.0, abs=0.05)
    assert train[0]["probe_center_mse"] == pytest.approx(train[0]["probe_center_mse_zero"], rel=0.1)
    assert _records(log)[-1]["probe"] == summary["probe"]
    # the end record's second probe reads one crop of every training image (fewer than probe_final_images)
    final = summary["probe_final"]
    assert final["probe_crops"] == len(build_dataset(ds_cfg, "train").ids)
    assert final["probe_peaks"] >= summary["probe"]["probe_peaks"] > 0
    assert final["probe_center_mse"] == pytest.approx(final["probe_center_mse_zero"], rel=0.1)
    assert _records(log)[-1]["probe_final"] == final


def test_predict_instances_stage(inputs, tmp_path: Path) -> None:
    """The predict stage on a freshly initialised checkpoint: HDF5 per image + metrics JSON."""
    from bestie import engine
    from bestie.io.h5store import H5Reader
    from bestie.models.instance import BestieNet
    from bestie.stages.predict_instances import InferenceConfig, run

    ds_cfg, _, _ = inputs
    torch.manual_seed(0)
    net = BestieNet("tf_efficientnet_lite0", 3, None, "light", head_channels=16, fusion_channels=16)
    ckpt = tmp_path / "m.pt"
    engine.save_checkpoint(ckpt, net, iteration=0, extra={"model_config": net.config, "mean": list(net.mean),
                                                          "std": list(net.std), "kind": "last"})
    out_h5, out_json = tmp_path / "inst.h5", tmp_path / "metrics.json"
    metrics = run(InferenceConfig(min_area=5), ds_cfg, "val", ckpt, out_h5, out_json, device="cpu")
    assert json.loads(out_json.read_text())["num_images"] == 2 == metrics["num_images_with_gt"]
    by_source = metrics["instances_by_source"]
    assert sum(by_source.values()) == metrics["num_instances"]
    if metrics["num_instances"]:
        exp = (by_source["center"] + by_source["cluster"]) / metrics["num_instances"]
        assert metrics["center_instance_share"] == pytest.approx(exp)
    for key, n in by_source.items():  # a median area wherever there is an instance of that source
        area = metrics["median_area_by_source"][key]
        assert (area is None) == (n == 0) and (area is None or 0 < area <= 64 * 64)
    assert 0.0 <= metrics["semantic_drift"] <= 1.0 and metrics["mAP50"] is not None
    # a network that predicts background everywhere: no instance on any image, the summary's figures None
    with torch.no_grad():
        net.heads["seg"].out.weight.zero_()
        net.heads["seg"].out.bias.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))
    ckpt_bg = tmp_path / "bg.pt"
    engine.save_checkpoint(ckpt_bg, net, iteration=0, extra={"model_config": net.config, "mean": list(net.mean),
                                                             "std": list(net.std), "kind": "last"})
    m_bg = run(InferenceConfig(min_area=5), ds_cfg, "val", ckpt_bg, tmp_path / "bg.h5", tmp_path / "bg.json",
               device="cpu")
    assert m_bg["num_instances"] == 0 and m_bg["center_instance_share"] is None
    assert m_bg["median_area_by_source"] == {"center": None, "cluster": None, "fallback": None}
    with H5Reader(out_h5) as r:
        assert len(r.ids()) == 2
        arr = r.read(r.ids()[0])
        assert arr["masks"].ndim == 3 and arr["masks"].shape[1:] == (64, 64)
        assert arr["labels"].shape == arr["scores"].shape == (arr["masks"].shape[0],)
    assert metrics["image_labels_applied"] is False
    # instances.image_labels: on the training split only; elsewhere switched off (the GT labels would leak)
    m_val = run(InferenceConfig(min_area=5, image_labels=True), ds_cfg, "val", ckpt, tmp_path / "i3.h5",
                tmp_path / "m3.json", device="cpu")
    assert m_val["image_labels_applied"] is False
    assert (m_val["num_instances"], m_val["mAP50"]) == (metrics["num_instances"], metrics["mAP50"])
    m_train = run(InferenceConfig(min_area=5, image_labels=True), ds_cfg, "train", ckpt, tmp_path / "i4.h5",
                  tmp_path / "m4.json", device="cpu")
    assert m_train["image_labels_applied"] is True
    with pytest.raises(ConfigError, match="classes"):
        bad = dict(ds_cfg, classes=["a", "b"])
        run(InferenceConfig(), bad, "val", ckpt, tmp_path / "i2.h5", tmp_path / "m2.json", device="cpu")


# ------------------------------------------------------------------------------------------ DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_net():
    from bestie.models.instance import BestieNet

    torch.manual_seed(0)
    net = BestieNet("tf_efficientnet_lite0", 3, None, "light", head_channels=16, fusion_channels=16,
                    warn_random=False)
    net.train()
    for m in net.modules():  # frozen BN statistics: see test_ddp_gradients_match_single_process
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    return net


def _batch(ds: BestieTrainDataset, keys) -> dict:
    return torch.utils.data.default_collate([DenseTargets(ds)[k] for k in keys])


def _mean_loss(out: dict, batch: dict) -> torch.Tensor:
    """A loss that is a plain mean over pixels (ignored pixels count as 0): the mean of two equal halves."""
    ce = F.cross_entropy(out["seg"], batch["semantic"], ignore_index=255, reduction="none").mean()
    return ce + ((out["center"] - batch["center"]) ** 2).mean() + 0.01 * (out["offset"] - batch["offset"]).abs().mean()


def _grads(net) -> dict:
    return {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}


def _ddp_worker(rank: int, world: int, port: int, inputs, out_dir: str) -> None:
    from bestie.stages import train_bestie as tb

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        cfg = _tiny_cfg()
        ds = _train_ds(inputs)
        sampler = _stream(len(ds), 4, rank=rank, world_size=world, seed=cfg.seed)
        batch = _batch(ds, sampler.keys_for_iteration(0))
        net = _tiny_net()
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        loss_fn = tb._make_loss(cfg)
        tb.train_step(ddp, batch, loss_fn, cfg, 0, torch.device("cpu"))["total"].backward()
        g_bestie = _grads(net)
        ddp.zero_grad(set_to_none=True)
        _mean_loss(ddp(batch["image"]), batch).backward()
        g_mean = _grads(net)
        if rank == 0:
            torch.save({"bestie": g_bestie, "mean": g_mean}, Path(out_dir) / "ddp_grads.pt")
        # the training stage itself under this process group (Gloo, no SyncBN on CPU)
        tb.run(_tiny_cfg(max_iters=2, val_every=0, val_max_images=1), inputs[0], inputs[1], inputs[2],
               Path(out_dir) / "ddp_model.pt", Path(out_dir) / "ddp_log.jsonl", device="cpu")
    finally:
        torch.distributed.destroy_process_group()


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 50
    for k in a:
        diff = float((a[k] - b[k]).norm())
        assert diff <= 1e-4 * float(a[k].norm()) + 1e-9, (k, diff, float(a[k].norm()))


def test_ddp_gradients_match_single_process(inputs, tmp_path: Path) -> None:
    """2 Gloo processes with half a batch each give the single-process gradients.

    SyncBatchNorm runs only on GPUs, and per-process BatchNorm batch statistics would differ from the
    full-batch ones, so BN layers are in eval mode (fixed statistics) here. With a plain pixel-mean loss
    the DDP gradient equals that of the concatenated batch. BestieLoss normalises per process (hard-pixel
    top-k and the weighted losses' count of weighted pixels are taken over the process's own batch, as in
    the public 4-GPU code), so its DDP gradient is the mean of the two half-batch gradients.
    """
    from bestie.stages import train_bestie as tb

    out_dir = tmp_path / "ddp"
    out_dir.mkdir()
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), inputs, str(out_dir)), nprocs=2, join=True)
    ddp = torch.load(out_dir / "ddp_grads.pt", weights_only=True)

    cfg = _tiny_cfg()
    ds = _train_ds(inputs)
    keys = _stream(len(ds), 4, seed=cfg.seed).keys_for_iteration(0)
    full = _batch(ds, keys)
    net = _tiny_net()
    _mean_loss(net(full["image"]), full).backward()
    _close(_grads(net), ddp["mean"])

    loss_fn = tb._make_loss(cfg)
    halves = []
    for part in (keys[:2], keys[2:]):
        net.zero_grad(set_to_none=True)
        tb.train_step(net, _batch(ds, part), loss_fn, cfg, 0, torch.device("cpu"))["total"].backward()
        halves.append(_grads(net))
    _close({k: 0.5 * (halves[0][k] + halves[1][k]) for k in halves[0]}, ddp["bestie"])

    # the DDP run of the stage wrote one final checkpoint (rank 0) and a log from rank 0 only
    last = _state(out_dir / "ddp_model.pt")
    assert last["iteration"] == 2 and last["extra"]["kind"] == "last"
    start = [r for r in _records(out_dir / "ddp_log.jsonl") if r["event"] == "start"]
    assert len(start) == 1 and start[0]["world_size"] == 2


# ------------------------------------------------------------------------------------------ real data
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco128-voc"


@pytest.mark.skipif(not REAL.is_dir(), reason=f"real data folder {REAL} is absent")
def test_real_images_resize_scale_crop_and_point_targets(tmp_path: Path) -> None:
    """coco128-voc, reference geometry: long side 480, scale 0.7 -> 336 px long side, crop 416: the crop is
    padded on both axes, the padding is 255 and the GT-center points give pseudo instances."""
    full = build_dataset({"format": "voc", "root": str(REAL)}, "train")
    ids = full.ids[:3]
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{i} {' '.join(map(str, full.labels(i)))}\n" for i in ids))
    ds_cfg = {"format": "voc", "root": str(REAL), "list_file": str(lst)}
    ds = build_dataset(ds_cfg)
    wsss = tmp_path / "wsss.h5"
    with H5Writer(wsss) as w:
        for i in ids:
            w.write(i, wsss=ds.semantic_gt(i))
    d = BestieTrainDataset(ds, wsss, None, pseudo=PseudoLabelParams(setting="point"), crop_size=416, resize=480,
                           scales=(0.7,), flip=False)
    for k, img_id in enumerate(ids):
        h, w = full.image(img_id).shape[:2]
        s = DenseTargets(d)[(k, 0)]
        sem = s["semantic"].numpy()
        rh, rw = round(round(h * 480 / max(h, w)) * 0.7), round(round(w * 480 / max(h, w)) * 0.7)
        valid = sem != 255
        rows, cols = np.flatnonzero(valid.any(1)), np.flatnonzero(valid.any(0))
        assert rows[-1] - rows[0] + 1 <= rh and cols[-1] - cols[0] + 1 <= rw  # content fits the scaled image
        assert (sem == 255).sum() >= 416 * 416 - rh * rw  # everything else is ignore, never background
        n_gt = len(ds.instances_gt(img_id)["labels"])
        assert int(s["num_points"]) == n_gt  # nothing is cropped away: every GT center is kept
        assert int(s["num_instances"]) >= 1 and float(s["weight"].sum()) > 0


def test_validation_and_probe_group_with_the_instances_grouping(inputs, tmp_path: Path) -> None:
    """Issue 19: in-training validation, the learning probe and the checkpoints' inference settings take the
    grouping passed to run() (the instances section's), not the bestie section's nms_kernel / min_area."""
    from bestie.params import GroupingParams
    from bestie.stages import train_bestie as tb

    ds_cfg, wsss, points = inputs
    cfg = _tiny_cfg(max_iters=2, val_every=2, val_max_images=1, checkpoint_every=10, nms_kernel=7, beta=2.0)
    shares = {}
    for name, grouping in (("default", None), ("zero", GroupingParams(center_threshold=0.0, nms_kernel=5, beta=1.5,
                                                                       min_area=3, min_center_support=0.2))):
        ckpt, log = tmp_path / name / "model.pt", tmp_path / name / "log.jsonl"
        summary = tb.run(cfg, ds_cfg, wsss, points, ckpt, log, device="cpu", grouping=grouping)
        expected = GroupingParams() if grouping is None else grouping
        assert _state(ckpt)["extra"]["inference"] == {
            "center_threshold": expected.center_threshold, "nms_kernel": expected.nms_kernel, "beta": expected.beta,
            "min_area": expected.min_area, "min_center_support": expected.min_center_support, "flip": cfg.val_flip,
            "resize": None, "size_divisor": 32, "image_labels": False}
        assert [r["iteration"] for r in _records(log) if r["event"] == "val"] == [2]
        shares[name] = summary["probe"]["probe_peak_share"]
    # a fresh centre head scores about 0 (either sign) at every peak: none reaches the default 0.1, most reach 0.0
    assert shares["default"] == 0.0 and shares["zero"] >= 0.5


def test_compact_batch_gives_the_losses_of_the_dense_batch(inputs) -> None:
    """The loader's compact batch, rendered in train_step (render_targets), trains on exactly the targets of
    the host-rendered dense batch: equal losses, refinement included."""
    from bestie.stages import train_bestie as tb

    for setting in ("image", "point"):
        cfg = _tiny_cfg(refine_iter=0, setting=setting)
        ds = _train_ds(inputs, setting=setting)
        keys = [(0, 0), (1, 0), (2, 0)]
        net, loss_fn = _tiny_net(), tb._make_loss(cfg)
        compact = collate_compact([ds[k] for k in keys])
        assert compact["table"].shape[1] == 5 and compact["first_row"].tolist()[0] == 0
        a = tb.train_step(net, compact, loss_fn, cfg, 0, torch.device("cpu"))
        b = tb.train_step(net, _batch(ds, keys), loss_fn, cfg, 0, torch.device("cpu"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (setting, k, a[k], b[k])
        assert float(a["center_pseudo"].detach()) > 0


def test_train_step_device_refinement_path_gives_the_host_losses(inputs, monkeypatch) -> None:
    """train_step with refinement on the batched device path (forced on the CPU, fed the loader's components)
    gives the host path's losses."""
    import bestie.refine as refine_mod
    from bestie.stages import train_bestie as tb

    for setting in ("image", "point"):
        cfg = _tiny_cfg(refine_iter=0, center_threshold_refine=0.0, setting=setting)
        ds = _train_ds(inputs, setting=setting)
        net, loss_fn = _tiny_net(), tb._make_loss(cfg)
        batch = collate_compact([ds[k] for k in [(0, 0), (1, 0), (2, 0), (3, 0)]])
        monkeypatch.setattr(refine_mod, "_device_path", lambda device: False)
        host = tb.train_step(net, batch, loss_fn, cfg, 0, torch.device("cpu"))
        monkeypatch.setattr(refine_mod, "_device_path", lambda device: True)
        dev = tb.train_step(net, batch, loss_fn, cfg, 0, torch.device("cpu"))
        assert float(host["refined_pixel_share"]) > 0.05, setting  # refinement had targets to make
        for k in host:
            assert float(dev[k].detach()) == pytest.approx(float(host[k].detach()), rel=1e-5, abs=1e-7), (setting, k)
