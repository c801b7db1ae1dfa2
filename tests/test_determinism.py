"""Same config, seed and thread count: the classifier and Mask R-CNN stages write the same bytes; the
number of data-loader workers changes nothing but the recorded config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bestie.data import build_dataset, generate_demo_dataset
from bestie.data.demo import DEMO_CLASSES
from bestie.stages import export_pseudo_labels as ex
from bestie.stages import train_classifier as tc
from bestie.stages import train_maskrcnn as tr


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo data (4 train images, 64 x 64) and pseudo labels = the GT instances of the train images."""
    tmp = tmp_path_factory.mktemp("determinism")
    root = generate_demo_dataset(tmp / "demo", num_train=4, num_val=1, image_size=(64, 64), seed=2)
    cfg = {"format": "voc", "root": str(root), "classes": list(DEMO_CLASSES), "train_split": "train",
           "eval_split": "val", "split": "train"}
    ds = build_dataset(cfg, "train")
    preds = {i: {**ds.instances_gt(i), "scores": np.full(len(ds.instances_gt(i)["labels"]), 0.9, np.float32)}
             for i in ds.ids}
    pseudo = tmp / "pseudo.json"
    ex.run(ex.ExportConfig(score_threshold=0.0, min_area=1), cfg, "train", preds, pseudo)
    return cfg, pseudo


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _same_tensors(a: dict, b: dict) -> list[str]:
    """Keys of the model state dicts whose tensors differ (bit for bit)."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_classifier_runs_are_byte_identical_and_workers_change_nothing(demo, tmp_path):
    cfg_ds, _ = demo
    # 2 epochs (2 iterations each): a second epoch is where a loader's per-epoch seeding would show
    cfg = tc.ClassifierConfig(weights=None, epochs=2, batch_size=2, resize=64, crop_size=48, checkpoint_every=0,
                              num_extra_convs=1, extra_channels=8, lr_steps=(2,), optimizer="sgd", lr=0.01)
    paths = []
    for name, workers in (("a", 0), ("b", 0), ("w", 2)):
        out = tmp_path / name / "pam.pt"
        tc.run(tc.ClassifierConfig(**{**cfg.__dict__, "num_workers": workers}), cfg_ds, out, tmp_path / name / "log.jsonl",
               device="cpu")
        paths.append(out)
    assert paths[0].read_bytes() == paths[1].read_bytes()  # the whole file, metadata included
    a, w = _state(paths[0]), _state(paths[2])
    assert _same_tensors(a["model"], w["model"]) == []
    assert a["extra"]["num_threads"] == 1
    assert {**a["extra"]["config"], "num_workers": 2} == w["extra"]["config"]
    assert {k: v for k, v in a["extra"].items() if k != "config"} == {k: v for k, v in w["extra"].items() if k != "config"}


def test_maskrcnn_runs_are_byte_identical_and_workers_change_nothing(demo, tmp_path):
    cfg_ds, pseudo = demo
    # 4 images, batch 2: 2 iterations per epoch, 4 iterations = 2 epochs. Before the loader had its own
    # generator, num_workers 0 and 2 parted from the first iteration of epoch 2.
    base = dict(weights=None, min_size=64, max_size=64, max_iters=4, batch_size=2, log_every=1, checkpoint_every=0,
                amp=False)
    paths = []
    for name, workers in (("a", 0), ("b", 0), ("w", 2)):
        out = tmp_path / name / "model.pt"
        tr.run(tr.MaskRCNNConfig(**base, num_workers=workers), cfg_ds, pseudo, out, tmp_path / name / "log.jsonl",
               device="cpu")
        paths.append(out)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    a, w = _state(paths[0]), _state(paths[2])
    assert _same_tensors(a["model"], w["model"]) == []
    assert a["extra"]["num_threads"] == 1
    assert {k: v for k, v in a["extra"].items() if k != "config"} == {k: v for k, v in w["extra"].items() if k != "config"}
