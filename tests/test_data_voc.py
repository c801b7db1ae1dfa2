"""VOCDataset on hand-made VOC trees and on ../shared/data/coco128-voc; build_dataset."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bestie.data import VOC_CLASSES, VOCDataset, build_dataset
from bestie.errors import ConfigError, DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOC128 = SHARED / "coco128-voc"

H, W = 6, 8


def _palette_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.frombytes("P", (arr.shape[1], arr.shape[0]), np.ascontiguousarray(arr, np.uint8).tobytes())
    im.putpalette([(i * 37) % 256 for i in range(768)])
    im.save(path)


def _xml(path: Path, names: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    objs = "".join(f"<object><name>{n}</name><difficult>0</difficult></object>" for n in names)
    path.write_text(f"<annotation><filename>x.jpg</filename>{objs}</annotation>")


def make_tree(root: Path) -> dict:
    """Three images: 'a1' (XML cat, dog, cat), 'img_2' (no XML; class + object PNGs), 'x' (XML, no objects)."""
    for d in ("JPEGImages", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in ("a1", "img_2", "x"):
        Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
    _xml(root / "Annotations" / "a1.xml", ["cat", "dog", "cat"])
    _xml(root / "Annotations" / "x.xml", [])
    # img_2: instance 1 = bird (class value 3) in the top-left 2x3 block, one of its pixels labelled
    # person (15) in the class map: majority still bird; instance 2 = person at rows 3..4, cols 4..6;
    # 255 on a border pixel of each; pixel (5, 0) is class 15 but instance 0 (no instance).
    cls = np.zeros((H, W), np.uint8)
    obj = np.zeros((H, W), np.uint8)
    cls[0:2, 0:3] = 3
    obj[0:2, 0:3] = 1
    cls[1, 2] = 15
    cls[3:5, 4:7] = 15
    obj[3:5, 4:7] = 2
    cls[0, 0] = obj[0, 0] = 255
    cls[4, 6] = obj[4, 6] = 255
    cls[5, 0] = 15
    _palette_png(root / "SegmentationClass" / "img_2.png", cls)
    _palette_png(root / "SegmentationObject" / "img_2.png", obj)
    (root / "ImageSets/Segmentation/train.txt").write_text("a1\nimg_2\n\nx\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("img_2\n")
    return {"cls": cls, "obj": obj}


def test_ids_labels_and_paths(tmp_path):
    make_tree(tmp_path)
    ds = VOCDataset(tmp_path, "train")
    assert ds.ids == ["a1", "img_2", "x"] and len(ds) == 3
    assert ds.class_names == VOC_CLASSES and ds.num_classes == 20
    assert VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[-1] == "tvmonitor" and len(VOC_CLASSES) == 20
    assert ds.labels("a1") == (7, 11)  # cat = 7, dog = 11, duplicates merged
    assert ds.labels("img_2") == (2, 14)  # from the class PNG: 3 -> bird (2), 15 -> person (14)
    assert ds.labels("x") == ()  # empty label set allowed
    assert ds.image_path("a1") == tmp_path / "JPEGImages" / "a1.jpg"
    img = ds.image("x")
    assert img.shape == (H, W, 3) and img.dtype == np.uint8
    with pytest.raises(DataError, match="'nope'"):
        ds.image_path("nope")


def test_gt_maps_and_instances(tmp_path):
    ref = make_tree(tmp_path)
    ds = VOCDataset(tmp_path, "train")
    assert not ds.has_gt("a1") and ds.semantic_gt("a1") is None and ds.instances_gt("a1") is None
    assert ds.has_gt("img_2")
    np.testing.assert_array_equal(ds.semantic_gt("img_2"), ref["cls"])
    inst = ds.instances_gt("img_2")
    assert inst["masks"].dtype == bool and inst["masks"].shape == (2, H, W)
    assert inst["labels"].dtype == np.int64
    np.testing.assert_array_equal(inst["labels"], [2, 14])
    m1 = np.zeros((H, W), bool)
    m1[0:2, 0:3] = True
    m1[0, 0] = False  # the 255 pixel belongs to no instance
    m2 = np.zeros((H, W), bool)
    m2[3:5, 4:7] = True
    m2[4, 6] = False
    np.testing.assert_array_equal(inst["masks"][0], m1)
    np.testing.assert_array_equal(inst["masks"][1], m2)
    assert not inst["masks"][:, 5, 0].any()  # class pixel with object value 0: no instance


def test_list_file_labels(tmp_path):
    make_tree(tmp_path)
    lst = tmp_path / "train_cls.txt"
    lst.write_text("x 0 19\na1 3\n")
    ds = VOCDataset(tmp_path, list_file=lst)
    assert ds.ids == ["x", "a1"]
    assert ds.labels("x") == (0, 19) and ds.labels("a1") == (3,)  # the file wins over the XML


def test_list_file_errors(tmp_path):
    make_tree(tmp_path)
    lst = tmp_path / "bad.txt"
    lst.write_text("a1 3\nx 20\n")
    with pytest.raises(DataError, match=r"bad\.txt, line 2: class index 20 outside 0\.\.19"):
        VOCDataset(tmp_path, list_file=lst)
    lst.write_text("a1 three\n")
    with pytest.raises(DataError, match=r"bad\.txt, line 1: class index 'three'"):
        VOCDataset(tmp_path, list_file=lst)
    lst.write_text("a1 1\na1 2\n")
    with pytest.raises(DataError, match=r"duplicate id 'a1'"):
        VOCDataset(tmp_path, list_file=lst)
    with pytest.raises(DataError, match=r"list file not found.*missing\.txt"):
        VOCDataset(tmp_path, list_file=tmp_path / "missing.txt")


def test_missing_images_all_listed_or_skipped(tmp_path, caplog):
    make_tree(tmp_path)
    (tmp_path / "ImageSets/Segmentation/train.txt").write_text("a1\nghost1\nimg_2\nghost2\n")
    with pytest.raises(DataError) as exc:
        VOCDataset(tmp_path, "train")
    msg = str(exc.value)
    assert "2 of 4" in msg and "ghost1" in msg and "ghost2" in msg and "JPEGImages/ghost1.jpg" in msg
    with caplog.at_level(logging.WARNING, logger="bestie.data.voc"):
        ds = VOCDataset(tmp_path, "train", skip_bad_images=True)
    assert ds.ids == ["a1", "img_2"]
    assert any("ghost1" in r.getMessage() for r in caplog.records)


def _spoil_images(root: Path) -> None:
    """'a1.jpg' cut to half its bytes (truncated JPEG); 'x.jpg' a text file with an image name."""
    jpg = root / "JPEGImages" / "a1.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpg, quality=95)
    data = jpg.read_bytes()
    jpg.write_bytes(data[: len(data) // 2])
    (root / "JPEGImages" / "x.jpg").write_text("not an image")


def test_undecodable_images_raise_naming_file_or_are_skipped(tmp_path, caplog):
    make_tree(tmp_path)
    _spoil_images(tmp_path)
    ds = VOCDataset(tmp_path, "train")  # off: found at read time, named
    assert ds.ids == ["a1", "img_2", "x"]
    with pytest.raises(DataError, match=r"cannot read image .*JPEGImages/a1\.jpg"):
        ds.image("a1")
    with pytest.raises(DataError, match=r"cannot read image .*JPEGImages/x\.jpg"):
        ds.image("x")
    with caplog.at_level(logging.WARNING, logger="bestie.data.voc"):
        ds = VOCDataset(tmp_path, "train", skip_bad_images=True)
    assert ds.ids == ["img_2"] and ds.image("img_2").shape == (H, W, 3)
    skipped = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(skipped) == 2 and "a1.jpg" in skipped[0] and "x.jpg" in skipped[1]
    assert any("skipped 2 of 3 image(s)" in r.getMessage() for r in caplog.records)
    cfg = {"format": "voc", "root": str(tmp_path), "skip_bad_images": True}
    assert build_dataset(cfg).ids == ["img_2"]


def test_image_without_label_source(tmp_path):
    make_tree(tmp_path)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "JPEGImages" / "lonely.jpg")
    (tmp_path / "ImageSets/Segmentation/train.txt").write_text("a1\nlonely\n")
    with pytest.raises(DataError, match=r"no label source.*lonely"):
        VOCDataset(tmp_path, "train")


def test_unknown_xml_name_and_bad_class_values(tmp_path):
    make_tree(tmp_path)
    _xml(tmp_path / "Annotations" / "a1.xml", ["cat", "unicorn"])
    ds = VOCDataset(tmp_path, "train")
    with pytest.raises(DataError, match=r"a1\.xml.*'unicorn'"):
        ds.labels("a1")
    (tmp_path / "Annotations" / "x.xml").write_text("<annotation><object>")
    with pytest.raises(DataError, match=r"x\.xml"):
        ds.labels("x")
    cls = np.zeros((H, W), np.uint8)
    cls[0, 0] = 21  # 20 classes: 21 is neither a class nor 255
    _palette_png(tmp_path / "SegmentationClass" / "img_2.png", cls)
    with pytest.raises(DataError, match=r"img_2\.png.*\[21\]"):
        ds.semantic_gt("img_2")


def test_custom_classes_split_and_errors(tmp_path):
    make_tree(tmp_path)
    ds = VOCDataset(tmp_path, "val", class_names=["a", "b", "bird_", "x"])
    assert ds.ids == ["img_2"] and ds.num_classes == 4
    with pytest.raises(DataError, match=r"\[15\]"):  # 15 > 4 classes
        ds.labels("img_2")
    with pytest.raises(DataError, match=r"test\.txt.*available splits: \['train', 'val'\]"):
        VOCDataset(tmp_path, "test")
    with pytest.raises(ConfigError, match="duplicate"):
        VOCDataset(tmp_path, "train", class_names=["a", "a"])
    with pytest.raises(DataError, match="not a directory"):
        VOCDataset(tmp_path / "nowhere")


def test_png_image_accepted_when_no_jpg(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "JPEGImages" / "x.jpg").unlink()
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "JPEGImages" / "x.png")
    ds = VOCDataset(tmp_path)
    assert ds.image_path("x").name == "x.png"


def test_build_dataset_voc(tmp_path):
    make_tree(tmp_path)
    cfg = {"format": "voc", "root": str(tmp_path), "split": "train", "list_file": None, "classes": None,
           "skip_bad_images": False}
    ds = build_dataset(cfg)
    assert isinstance(ds, VOCDataset) and len(ds) == 3 and ds.class_names == VOC_CLASSES
    assert build_dataset(cfg, split="val").ids == ["img_2"]
    ds = build_dataset({**cfg, "classes": ["p", "q", "bird"]}, split="val")
    assert ds.class_names == ("p", "q", "bird")
    with pytest.raises(ConfigError, match=r"'yolo'.*voc, coco"):
        build_dataset({**cfg, "format": "yolo"})
    with pytest.raises(ConfigError, match=r"dataset\.root"):
        build_dataset({"format": "voc"})


def test_build_dataset_list_file_only_for_the_training_split(tmp_path):
    make_tree(tmp_path)
    lst = tmp_path / "train_cls.txt"
    lst.write_text("x 0 19\na1 3\n")
    cfg = {"format": "voc", "root": str(tmp_path), "train_split": "train", "list_file": str(lst)}
    train = build_dataset(cfg)  # the default split is train_split: the list file applies
    assert train.ids == ["x", "a1"] and train.labels("x") == (0, 19)
    assert build_dataset(cfg, split="train").ids == ["x", "a1"]
    val = build_dataset(cfg, split="val")  # a held-out split is listed by its own ImageSets file
    assert val.ids == ["img_2"] and val.list_file is None and val.labels("img_2") == (2, 14)
    # a {split} placeholder makes the list file apply to every split
    (tmp_path / "val_cls.txt").write_text("img_2 5\n")
    per_split = {**cfg, "list_file": str(tmp_path / "{split}_cls.txt")}
    assert build_dataset(per_split, split="val").labels("img_2") == (5,)
    with pytest.raises(DataError, match=r"list file not found.*trainval_cls\.txt"):
        build_dataset(per_split, split="trainval")
    # train_split other than "train": the default split follows it
    (tmp_path / "ImageSets/Segmentation/mine.txt").write_text("x\n")
    assert build_dataset({"format": "voc", "root": str(tmp_path), "train_split": "mine"}).ids == ["x"]


@pytest.mark.skipif(not VOC128.is_dir(), reason=f"shared data not found at {VOC128}")
def test_coco128_voc_counts():
    ds = VOCDataset(VOC128, "train")
    assert len(ds) == 97
    n_inst, classes = 0, set()
    for i in ds.ids:
        gt = ds.instances_gt(i)
        assert gt is not None
        n_inst += len(gt["labels"])
        classes |= set(gt["labels"].tolist())
        # XML labels and the class set of the instance masks agree on this data
        assert set(ds.labels(i)) == set(gt["labels"].tolist()), i
        img = ds.image(i)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert img.shape[:2] == gt["masks"].shape[1:]
        assert gt["masks"].sum(axis=(1, 2)).min() > 0
    assert n_inst == 452
    assert len(classes) == 18
    assert {VOC_CLASSES.index("cow"), VOC_CLASSES.index("sheep")}.isdisjoint(classes)
    assert len(VOCDataset(VOC128, "val")) == 25


# ------------------------------------------------------------------ issue 18: split lists, Unicode
def _real_tree(root: Path, names: dict[str, str]) -> Path:
    """JPEGImages/<name>.jpg + Annotations/<name>.xml copied from real coco128-voc files (source id -> name)."""
    import shutil

    for sub in ("JPEGImages", "Annotations", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for src, name in names.items():
        shutil.copy(VOC128 / "JPEGImages" / f"{src}.jpg", root / "JPEGImages" / f"{name}.jpg")
        shutil.copy(VOC128 / "Annotations" / f"{src}.xml", root / "Annotations" / f"{name}.xml")
    return root


@pytest.mark.skipif(not VOC128.is_dir(), reason="needs ../shared/data/coco128-voc")
def test_split_list_ids_are_whole_lines(tmp_path):
    root = _real_tree(tmp_path, {"2017_000030": "a b", "2017_000036": "a"})
    sets = root / "ImageSets" / "Segmentation"
    (sets / "train.txt").write_text("a b\r\n\na\n")
    ds = VOCDataset(root, "train")
    assert ds.ids == ["a b", "a"]  # "a b" is its own image, never "a"
    assert ds.image("a b").shape == (428, 640, 3) and ds.image("a").shape == (640, 481, 3)
    assert ds.labels("a b") == VOCDataset(VOC128, "train").labels("2017_000030")
    (sets / "blank.txt").write_text("a\n a b\na \n")
    with pytest.raises(DataError, match=r"blank\.txt: 2 bad line\(s\): line 2: id ' a b' starts or ends with a "
                                        r"blank.*; line 3: id 'a ' starts"):
        VOCDataset(root, "blank")
    (root / "JPEGImages" / "a b.jpg").unlink()
    with pytest.raises(DataError, match=r"have no image file: a b \(.*a b\.jpg"):  # not silently 'a'
        VOCDataset(root, "train")


@pytest.mark.skipif(not VOC128.is_dir(), reason="needs ../shared/data/coco128-voc")
@pytest.mark.parametrize("disk_form, list_form", [("NFD", "NFC"), ("NFC", "NFD")])
def test_ids_and_file_names_compared_after_nfc(tmp_path, disk_form, list_form):
    import unicodedata

    name = "café_01"
    on_disk = unicodedata.normalize(disk_form, name)
    root = _real_tree(tmp_path, {"2017_000042": on_disk})
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text(unicodedata.normalize(list_form, name) + "\n")
    ds = VOCDataset(root, "train")
    assert ds.ids == [unicodedata.normalize("NFC", name)]
    assert ds.image_path(ds.ids[0]).name == f"{on_disk}.jpg"  # the file under its name on disk
    assert ds.image(ds.ids[0]).shape == (478, 640, 3)
    assert ds.labels(ds.ids[0]) == VOCDataset(VOC128, "train").labels("2017_000042")  # XML found too


@pytest.mark.skipif(not VOC128.is_dir(), reason="needs ../shared/data/coco128-voc")
def test_missing_id_names_the_near_miss_file(tmp_path):
    root = _real_tree(tmp_path, {"2017_000042": "café_01"})
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("Cafe_01\n")
    with pytest.raises(DataError, match=r"no image file: Cafe_01 \(.*Cafe_01\.jpg; nearest file on disk: 'café_01\.jpg'\)"):
        VOCDataset(root, "train")
