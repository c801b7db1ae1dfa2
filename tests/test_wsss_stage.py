"""Tests of bestie.stages.make_wsss (the WSSS stage, its outputs), bestie.stages.import_wsss (the PNG import)
and bestie.io.palette."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bestie.config import from_dict
from bestie.errors import ArtifactError, ConfigError, DataError
from bestie.io.palette import voc_palette, write_palette_png
from bestie.stages.import_wsss import run as import_wsss_pngs
from bestie.stages.make_wsss import WsssConfig, resolve_threshold, run

torch.set_num_threads(1)
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco128-voc"


def _proxy_cams(gt: np.ndarray, labels, stride: int = 4) -> np.ndarray:
    """Test fixture only: coarse, blurred CAM-like maps made from the GT mask of each labelled class."""
    h, w = gt.shape
    out = []
    for c in labels:
        m = cv2.GaussianBlur((gt == c + 1).astype(np.float32), (0, 0), 3.0)
        m = cv2.resize(m, (-(-w // stride), -(-h // stride)), interpolation=cv2.INTER_AREA)
        out.append(m / (m.max() + 1e-5))
    return np.stack(out).astype(np.float16)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from bestie.data import DEMO_CLASSES, build_dataset, generate_demo_dataset
    from bestie.io.h5store import H5Writer

    root = tmp_path_factory.mktemp("demo")
    generate_demo_dataset(root, num_train=4, num_val=0, image_size=(64, 80))
    ds_cfg = {"format": "voc", "root": str(root), "split": "train", "classes": list(DEMO_CLASSES)}
    ds = build_dataset(ds_cfg)
    cams = root / "cams.h5"
    with H5Writer(cams, attrs={"stage": "cams"}) as w:
        for i in ds.ids:
            labels = sorted(ds.labels(i))
            w.write(i, cams=_proxy_cams(ds.semantic_gt(i), labels), classes=np.array(labels, np.int16))
            w.set_attrs(i, image_size=ds.image(i).shape[:2])
    return ds_cfg, ds, cams


def _read_maps(path: Path) -> dict[str, np.ndarray]:
    from bestie.io.h5store import H5Reader

    with H5Reader(path) as r:
        return {i: r.read(i)["wsss"] for i in r.ids()}


def _check_maps(maps, ds):
    assert list(maps) == list(ds.ids)
    for i, m in maps.items():
        assert m.dtype == np.uint8 and m.shape == ds.image(i).shape[:2]
        assert set(np.unique(m).tolist()) <= {0, 255} | {c + 1 for c in ds.labels(i)}


def test_crf_stage_outputs(demo, tmp_path):
    from bestie.data.images import load_label_png

    ds_cfg, ds, cams = demo
    out_h5, out_json, png_dir = tmp_path / "wsss.h5", tmp_path / "diag.json", tmp_path / "png"
    diag = run(WsssConfig(method="crf", bg_threshold=0.3), ds_cfg, cams, out_h5, out_json, png_dir)
    maps = _read_maps(out_h5)
    _check_maps(maps, ds)
    assert json.loads(out_json.read_text()) == json.loads(json.dumps(diag))
    # share of 255 recounted from the stored maps
    n255 = sum(int((m == 255).sum()) for m in maps.values())
    assert diag["share_uncertain"] == pytest.approx(n255 / sum(m.size for m in maps.values()))
    assert diag["num_scored"] == 4 and diag["bg_threshold"] == 0.3
    assert diag["cam_argmax"]["threshold"] == 0.3
    for key in ("mIoU", "wsss", "dense", "cam_sweep", "timing"):
        assert key in diag
    assert 0 <= diag["wsss"]["mIoU_confident"] <= 100
    # flat-coloured shapes with blurred CAMs: the CRF map beats the CAM argmax at the same threshold
    assert diag["mIoU"] > diag["cam_argmax"]["mIoU"]
    # palette PNGs hold the same indices, with the VOC colours
    from PIL import Image

    for i, m in maps.items():
        p = png_dir / f"{i}.png"
        np.testing.assert_array_equal(load_label_png(p), m)
        with Image.open(p) as im:
            assert im.mode == "P"
            assert im.getpalette()[3:6] == [128, 0, 0]


def test_auto_threshold_and_errors(demo, tmp_path):
    ds_cfg, ds, cams = demo
    good = tmp_path / "cam_diag.json"
    good.write_text(json.dumps({"best_threshold": 0.4, "best_mIoU": 20.0}))
    assert resolve_threshold("auto", good) == 0.4
    assert resolve_threshold(0.25, None) == 0.25
    diag = run(WsssConfig(method="crf", bg_threshold="auto", crf=False), ds_cfg, cams, tmp_path / "a.h5",
               tmp_path / "a.json", None, cam_diagnostics=good)
    assert diag["bg_threshold"] == 0.4
    with pytest.raises(ConfigError):
        resolve_threshold("auto", None)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"best_threshold": None}))
    with pytest.raises(ArtifactError, match="bad.json"):
        resolve_threshold("auto", bad)


def test_missing_and_foreign_cams_are_reported(demo, tmp_path):
    from bestie.io.h5store import H5Writer

    ds_cfg, ds, _ = demo
    partial = tmp_path / "partial.h5"
    with H5Writer(partial) as w:
        i = ds.ids[0]
        w.write(i, cams=np.zeros((1, 16, 20), np.float16), classes=np.array([ds.labels(i)[0]], np.int16))
    with pytest.raises(ArtifactError, match=ds.ids[1]):
        run(WsssConfig(method="crf", crf=False), ds_cfg, partial, tmp_path / "o.h5", tmp_path / "o.json")
    assert not (tmp_path / "o.h5").exists()
    foreign = tmp_path / "foreign.h5"
    with H5Writer(foreign) as w:
        for i in ds.ids:
            absent = sorted(set(range(3)) - set(ds.labels(i)))[0]
            w.write(i, cams=np.zeros((1, 16, 20), np.float16), classes=np.array([absent], np.int16))
    with pytest.raises(ArtifactError, match="not in its image label"):
        run(WsssConfig(method="crf", crf=False), ds_cfg, foreign, tmp_path / "o.h5", tmp_path / "o.json")
    with pytest.raises(ArtifactError, match="does not exist"):
        run(WsssConfig(), ds_cfg, tmp_path / "nope.h5", tmp_path / "o.h5", tmp_path / "o.json")


def test_affinity_stage_trains_saves_and_reloads(demo, tmp_path):
    ds_cfg, ds, cams = demo
    cfg = WsssConfig(method="affinity", bg_threshold=0.3, affinity_epochs=1, affinity_batch_size=2,
                     affinity_crop=64, affinity_radius=4, affinity_logt=4)
    ckpt = tmp_path / "aff.pt"
    d1 = run(cfg, ds_cfg, cams, tmp_path / "w1.h5", tmp_path / "d1.json", None, device="cpu",
             affinity_checkpoint=ckpt)
    assert ckpt.is_file() and "affinity_train_seconds" in d1["timing"]
    m1 = _read_maps(tmp_path / "w1.h5")
    _check_maps(m1, ds)
    d2 = run(cfg, ds_cfg, cams, tmp_path / "w2.h5", tmp_path / "d2.json", None, device="cpu",
             affinity_checkpoint=ckpt)
    assert d2["timing"]["affinity_loaded"] == str(ckpt)
    m2 = _read_maps(tmp_path / "w2.h5")
    for i in ds.ids:
        np.testing.assert_array_equal(m1[i], m2[i])
    other = WsssConfig(**{**cfg.__dict__, "affinity_epochs": 2})
    with pytest.raises(ArtifactError, match="other settings"):
        run(other, ds_cfg, cams, tmp_path / "w3.h5", tmp_path / "d3.json", None, device="cpu",
            affinity_checkpoint=ckpt)


def test_import_pngs(demo, tmp_path, caplog):
    ds_cfg, ds, _ = demo
    png = tmp_path / "maps"
    png.mkdir()
    for i in ds.ids:
        write_palette_png(png / f"{i}.png", ds.semantic_gt(i))
    out = tmp_path / "imp.h5"
    stats = import_wsss_pngs(png, ds, out)
    assert stats == {"images": 4, "clamped_images": 0, "clamped_pixels": 0}
    maps = _read_maps(out)
    for i in ds.ids:
        np.testing.assert_array_equal(maps[i], ds.semantic_gt(i))
    # a class absent from the image label: set to 255 with a warning, or DataError when strict
    i0 = ds.ids[0]
    absent = sorted(set(range(3)) - set(ds.labels(i0)))[0] + 1
    m = ds.semantic_gt(i0).copy()
    m[:3, :3] = absent
    write_palette_png(png / f"{i0}.png", m)
    with caplog.at_level(logging.WARNING):
        stats = import_wsss_pngs(png, ds, out)
    assert stats["clamped_images"] == 1 and stats["clamped_pixels"] == 9
    assert f"{i0}.png" in caplog.text
    assert (_read_maps(out)[i0][:3, :3] == 255).all()
    with pytest.raises(DataError, match=f"{i0}.png"):
        import_wsss_pngs(png, ds, out, strict=True)
    # a value outside 0..C and 255
    m[:3, :3] = 200
    write_palette_png(png / f"{i0}.png", m)
    with pytest.raises(DataError, match=r"\[200\]"):
        import_wsss_pngs(png, ds, out)
    # wrong size, missing file
    write_palette_png(png / f"{i0}.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(DataError, match="10x10"):
        import_wsss_pngs(png, ds, out)
    (png / f"{i0}.png").unlink()
    with pytest.raises(DataError, match="missing"):
        import_wsss_pngs(png, ds, out)


def test_voc_palette_known_colours():
    pal = voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert pal[0].tolist() == [0, 0, 0]
    assert pal[1].tolist() == [128, 0, 0]  # aeroplane
    assert pal[2].tolist() == [0, 128, 0]  # bicycle
    assert pal[15].tolist() == [192, 128, 128]  # person
    assert pal[255].tolist() == [224, 224, 192]  # VOC boundary / ignore


def test_config_validation():
    assert from_dict(WsssConfig, {"bg_threshold": "auto", "import_png_dir": None}, "wsss").bg_threshold == "auto"
    with pytest.raises(ConfigError):
        from_dict(WsssConfig, {"method": "saliency"}, "wsss")
    with pytest.raises(ConfigError):
        from_dict(WsssConfig, {"bg_threshold": "best"}, "wsss")
    with pytest.raises(ConfigError):
        from_dict(WsssConfig, {"no_such_key": 1}, "wsss")
    with pytest.raises(ConfigError, match="crf"):
        WsssConfig(crf_unary="softmax")
    with pytest.raises(ConfigError):
        WsssConfig(fg_seed=0.3, bg_seed=None)
    with pytest.raises(ConfigError):
        WsssConfig(affinity_crop=100)
