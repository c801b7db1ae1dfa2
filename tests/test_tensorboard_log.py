"""TensorBoard mirror of the training logs (bestie.tensorboard_log, hooked into bestie.engine.JsonLog)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from bestie.engine import JsonLog
from bestie.errors import ConfigError
from bestie.tensorboard_log import ENV_VAR, TensorBoardLog, tensorboard_dir

tb = pytest.importorskip("tensorboard", reason="the tensorboard package is not installed")


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_off_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with JsonLog(tmp_path / "log.jsonl") as log:
        log.write(iteration=1, loss=0.5)
    assert not tensorboard_dir(tmp_path / "log.jsonl").exists()
    assert tensorboard_dir(tmp_path / "a" / "train_log.jsonl") == tmp_path / "a" / "train_log.tensorboard"


def test_records_become_scalars(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")
    path = tmp_path / "log.jsonl"
    with JsonLog(path) as log:
        log.write(event="start", iteration=0, resumed=False, config={"lr": 0.1}, device="cpu")
        log.write(event="train", iteration=20, total=torch.tensor(0.75), lr=np.float32(0.25), seg=float("nan"))
        log.write(event="train", iteration=40, total=0.5, lr=0.125)
        log.write({"iteration": 40, "loss_mask": 0.3})  # no event: tagged train/
        log.write(event="val", iteration=40, mAP50=0.125, voc={"mAP50": 0.125})
    assert len(path.read_text().splitlines()) == 5  # the JSON log is unchanged by the mirror
    s = _scalars(tensorboard_dir(path))
    assert s["train/total"] == [(20, 0.75), (40, 0.5)]
    assert s["train/lr"] == [(20, 0.25), (40, 0.125)]
    assert s["train/loss_mask"] == [(40, pytest.approx(0.3))]
    assert s["val/mAP50"] == [(40, 0.125)]
    # bools, strings, dicts and NaN are not scalars; the step keys and time are not either
    assert set(s) == {"train/total", "train/lr", "train/loss_mask", "val/mAP50"}


def test_fresh_log_clears_old_events_resumed_log_appends(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")
    path = tmp_path / "log.jsonl"
    with JsonLog(path) as log:
        log.write(iteration=1, loss=1.0)
    with JsonLog(path) as log:  # resumed: appends to the JSON log and to the events
        log.write(iteration=2, loss=2.0)
    assert _scalars(tensorboard_dir(path))["train/loss"] == [(1, 1.0), (2, 2.0)]
    path.unlink()  # a fresh run (Snakemake removes the log output before the job)
    with JsonLog(path) as log:
        log.write(iteration=1, loss=5.0)
    assert _scalars(tensorboard_dir(path))["train/loss"] == [(1, 5.0)]


def test_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match="needs the tensorboard package"):
        TensorBoardLog(tmp_path / "log.jsonl")


def test_mask_rcnn_training_log_mirrored(tmp_path, monkeypatch):
    """The real trainer with the mirror on: the event scalars equal the JSON log's values."""
    from bestie.data import build_dataset, generate_demo_dataset
    from bestie.data.demo import DEMO_CLASSES
    from bestie.stages import export_pseudo_labels as ex
    from bestie.stages import train_maskrcnn as tr

    torch.set_num_threads(1)
    root = generate_demo_dataset(tmp_path / "demo", num_train=2, num_val=1, image_size=(64, 64))
    cfg = {"format": "voc", "root": str(root), "classes": list(DEMO_CLASSES), "train_split": "train"}
    ds = build_dataset(cfg, "train")
    preds = {i: {**ds.instances_gt(i), "scores": np.ones(len(ds.instances_gt(i)["labels"]), np.float32)}
             for i in ds.ids}
    ex.run(ex.ExportConfig(score_threshold=0.0, min_area=1), cfg, "train", preds, tmp_path / "p.json")
    monkeypatch.setenv(ENV_VAR, "1")
    log = tmp_path / "m" / "train_log.jsonl"
    mcfg = tr.MaskRCNNConfig(weights=None, min_size=64, max_size=64, max_iters=2, batch_size=2, num_workers=0,
                             log_every=1, checkpoint_every=0, amp=False)
    tr.run(mcfg, cfg, tmp_path / "p.json", tmp_path / "m" / "model.pt", log, device="cpu")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    s = _scalars(tmp_path / "m" / "train_log.tensorboard")
    assert s["train/loss"] == [(r["iteration"], pytest.approx(r["loss"], rel=1e-6)) for r in records]
    assert {"train/loss_mask", "train/loss_classifier", "train/lr", "train/sec_per_iter"} <= set(s)
