"""The synthetic demo dataset: determinism, idempotence, VOC conventions, readable by VOCDataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bestie.data import DEMO_CLASSES, VOCDataset, build_dataset, generate_demo_dataset, load_label_png
from bestie.data.demo import voc_palette
from bestie.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_voc_palette_known_entries():
    pal = voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert pal[0].tolist() == [0, 0, 0] and pal[1].tolist() == [128, 0, 0] and pal[2].tolist() == [0, 128, 0]
    assert pal[15].tolist() == [192, 128, 128]  # person
    assert pal[255].tolist() == [224, 224, 192]  # VOC boundary colour


def test_default_set_reads_back(tmp_path):
    root = generate_demo_dataset(tmp_path / "demo")
    assert root == tmp_path / "demo"
    ds = VOCDataset(root, "train", class_names=DEMO_CLASSES)
    assert len(ds) == 48 and ds.ids[0] == "demo_0001" and ds.ids[-1] == "demo_0048"
    val = VOCDataset(root, "val", class_names=DEMO_CLASSES)
    assert val.ids == [f"demo_{i:04d}" for i in range(49, 65)]
    assert len(VOCDataset(root, "trainval", class_names=DEMO_CLASSES)) == 64
    n_inst, counts = 0, np.zeros(3, int)
    for i in ds.ids + val.ids:
        d = ds if i in ds.ids else val
        img = d.image(i)
        assert img.shape == (160, 160, 3) and img.dtype == np.uint8
        gt = d.instances_gt(i)
        xml_names = [o.findtext("name") for o in ET.parse(d.xml_path(i)).getroot().iter("object")]
        # one XML object per instance, same class, same order
        assert [DEMO_CLASSES[k] for k in gt["labels"]] == xml_names
        assert 1 <= len(xml_names) <= 4
        assert d.labels(i) == tuple(sorted(set(gt["labels"].tolist())))
        assert gt["masks"].sum(axis=(1, 2)).min() >= 80
        assert not (gt["masks"].sum(axis=0) > 1).any()  # instances are disjoint
        cls = load_label_png(d.class_png_path(i))
        obj = load_label_png(d.object_png_path(i))
        np.testing.assert_array_equal(cls == 255, obj == 255)  # the band is in both maps
        assert (cls == 255).any()
        assert set(np.unique(cls)) <= {0, 1, 2, 3, 255}
        n_inst += len(gt["labels"])
        counts += np.bincount(gt["labels"], minlength=3)
    assert counts.min() >= 15  # every class is well represented
    assert 64 <= n_inst <= 4 * 64
    with Image.open(ds.class_png_path(ds.ids[0])) as im:
        assert im.mode == "P" and im.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
    meta = json.loads((root / "demo.json").read_text())
    assert meta["num_train"] == 48 and meta["image_size"] == [160, 160] and meta["classes"] == list(DEMO_CLASSES)
    cfg = {"format": "voc", "root": str(root), "split": "train", "classes": list(DEMO_CLASSES)}
    assert build_dataset(cfg, split="val").ids == val.ids


def test_deterministic_and_seed_dependent(tmp_path):
    a = _files(generate_demo_dataset(tmp_path / "a", num_train=5, num_val=2, image_size=(96, 128), seed=3))
    b = _files(generate_demo_dataset(tmp_path / "b", num_train=5, num_val=2, image_size=(96, 128), seed=3))
    assert a.keys() == b.keys() and len(a) == 7 * 4 + 3 + 1
    assert a == b  # byte-identical: maps, XML, JPEGs, lists
    c = _files(generate_demo_dataset(tmp_path / "c", num_train=5, num_val=2, image_size=(96, 128), seed=4))
    assert c["SegmentationObject/demo_0001.png"] != a["SegmentationObject/demo_0001.png"]
    img = np.asarray(Image.open(tmp_path / "a" / "JPEGImages" / "demo_0001.jpg"))
    assert img.shape == (96, 128, 3)


def test_idempotent_and_regenerates(tmp_path):
    root = tmp_path / "d"
    generate_demo_dataset(root, num_train=4, num_val=1, image_size=(64, 64))
    target = root / "SegmentationClass" / "demo_0002.png"
    stamp = 1_000_000_000
    os.utime(target, (stamp, stamp))
    generate_demo_dataset(root, num_train=4, num_val=1, image_size=(64, 64))
    assert target.stat().st_mtime == stamp  # complete and same parameters: nothing rewritten
    target.unlink()  # incomplete: regenerated
    generate_demo_dataset(root, num_train=4, num_val=1, image_size=(64, 64))
    assert target.is_file()
    generate_demo_dataset(root, num_train=2, num_val=1, image_size=(64, 64))  # new parameters: smaller set
    assert not (root / "JPEGImages" / "demo_0004.jpg").exists()
    assert (root / "ImageSets/Segmentation/trainval.txt").read_text().split() == ["demo_0001", "demo_0002", "demo_0003"]
    assert json.loads((root / "demo.json").read_text())["num_train"] == 2


def test_bad_parameters(tmp_path):
    with pytest.raises(ConfigError, match="at least 64"):
        generate_demo_dataset(tmp_path, image_size=(32, 160))
    with pytest.raises(ConfigError, match="num_train"):
        generate_demo_dataset(tmp_path, num_train=0)


def test_cli(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(
        [sys.executable, "-m", "bestie.data.demo", "--root", str(tmp_path / "cli"), "--num-train", "2",
         "--num-val", "1", "--size", "64", "80"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "RuntimeWarning" not in r.stderr and r.stdout.strip() == str(tmp_path / "cli")
    ds = VOCDataset(tmp_path / "cli", "trainval", class_names=DEMO_CLASSES)
    assert len(ds) == 3 and ds.image(ds.ids[0]).shape == (64, 80, 3)
