"""Pre-flight checks (issue 18): every fault of a run found at once, before any training starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from bestie.check import check_disk, check_gpus, run_checks
from bestie.cli import main
from workflow_util import REPO, SHARED_DATA, snakemake, tiny_config, write_config

VOC128 = SHARED_DATA / "coco128-voc"
IDS = ["2017_000030", "2017_000036", "2017_000042", "2017_000064"]

pytestmark = pytest.mark.skipif(not VOC128.is_dir(), reason=f"real data {VOC128} is absent")


def _copy_voc(root: Path, ids: list[str], split_lists: dict[str, list[str]]) -> Path:
    """A VOC-layout folder with copies of real images, XML and masks of ``ids``."""
    for sub, ext in (("JPEGImages", ".jpg"), ("Annotations", ".xml"), ("SegmentationClass", ".png"),
                     ("SegmentationObject", ".png")):
        (root / sub).mkdir(parents=True)
        for i in ids:
            shutil.copy(VOC128 / sub / f"{i}{ext}", root / sub / f"{i}{ext}")
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    for split, listed in split_lists.items():
        (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in listed))
    return root


def _three_faults(root: Path) -> dict[str, Path]:
    """No val.txt (the default eval split), one class mask of the wrong size, one XML class 'unicorn'."""
    _copy_voc(root, IDS, {"train": IDS})
    mask = root / "SegmentationClass" / f"{IDS[1]}.png"
    with Image.open(mask) as im:
        im.resize((im.width // 2, im.height // 2), Image.NEAREST).save(mask)
    xml = root / "Annotations" / f"{IDS[2]}.xml"
    text = xml.read_text()
    first = text.index("<name>") + len("<name>")
    xml.write_text(text[:first] + "unicorn" + text[text.index("</name>", first):])
    return {"val": root / "ImageSets" / "Segmentation" / "val.txt", "mask": mask, "xml": xml}


def _config(root: Path, run: str = "chk") -> dict:
    cfg = tiny_config(run, {"format": "voc", "root": str(root), "train_split": "train", "eval_split": "val"})
    return cfg


def test_all_three_faults_reported_at_once_by_the_library_and_the_cli(tmp_path, capsys):
    where = _three_faults(tmp_path / "voc")
    report = run_checks(_config(tmp_path / "voc"), out_dir=tmp_path / "results", weights=False)
    text = report.text()
    assert len(report.faults) == 3, text
    assert f"{where['val']}: split list of split 'val' not found (available splits: ['train'])" in text
    assert str(where["mask"]) in text and f"mask is 240x320 (WxH) but its image {IDS[1]}.jpg is 481x640" in text
    assert str(where["xml"]) in text and "'unicorn' is not one of the 20 dataset classes" in text

    cfg_file = write_config(tmp_path / "cfg.yaml", _config(tmp_path / "voc"))
    out = tmp_path / "results" / "check.json"
    code = main(["check", "--config", str(cfg_file), "--out", str(out), "--skip-weights"])
    err = capsys.readouterr().err
    assert code == 2 and "3 fault(s) found before any training" in err
    assert str(where["val"]) in err and str(where["mask"]) in err and str(where["xml"]) in err
    assert not out.exists()  # no report: the workflow's stages never start


def test_clean_copy_passes_and_writes_the_report(tmp_path):
    root = _copy_voc(tmp_path / "voc", IDS, {"train": IDS, "val": IDS[:2]})
    out = tmp_path / "check.json"
    code = main(["check", "--config", json.dumps(_config(root)), "--out", str(out), "--skip-weights",
                 "--out-dir", str(tmp_path)])
    assert code == 0
    rep = json.loads(out.read_text())
    assert rep["ok"] and rep["counts"]["images"] == {"train": 4, "val": 2}
    # the estimate grows with the pixels read from the headers: 640x428, 481x640, 640x478, 480x640, then
    # the first two again for the val split
    pixels = 640 * 428 + 481 * 640 + 640 * 478 + 480 * 640 + 640 * 428 + 481 * 640
    assert rep["counts"]["estimated_bytes"] == (1 << 30) + 8 * pixels
    # --set on the whole config: only the train split is checked when it is also the eval split
    code = main(["check", "--config", json.dumps(_config(root)), "--out", str(out), "--skip-weights",
                 "--out-dir", str(tmp_path), "--set", "dataset.eval_split=train"])
    assert code == 0 and json.loads(out.read_text())["counts"]["images"] == {"train": 4}


def test_missing_image_line_number_near_miss_and_point_masks(tmp_path):
    root = _copy_voc(tmp_path / "voc", IDS, {"val": IDS[:1]})
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text(
        f"{IDS[0]}\n\n{IDS[1]}x\n {IDS[2]}\n{IDS[3]}\n")
    (root / "SegmentationObject" / f"{IDS[3]}.png").unlink()
    cfg = _config(root)
    cfg["bestie"]["setting"] = "point"
    faults = [str(f) for f in run_checks(cfg, out_dir=tmp_path, weights=False).faults]
    train = root / "ImageSets" / "Segmentation" / "train.txt"
    assert any(f.startswith(f"{train}, line 3: id '{IDS[1]}x' has no image file") and
               f"nearest file on disk: '{IDS[1]}.jpg'" in f for f in faults), faults
    assert any(f.startswith(f"{train}, line 4: id ' {IDS[2]}' starts or ends with a blank") for f in faults), faults
    assert any(f.startswith(f"{train}, line 5: id '{IDS[3]}' lacks the SegmentationClass / SegmentationObject")
               for f in faults), faults
    assert len(faults) == 3, faults


def test_weights_gpu_and_disk_faults(tmp_path):
    root = _copy_voc(tmp_path / "voc", IDS[:1], {"train": IDS[:1], "val": IDS[:1]})
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    cfg = _config(root)
    cfg["classifier_dense"]["weights"] = str(tmp_path / "nowhere.pth")
    cfg["bestie"]["weights"] = str(bad)
    cfg["maskrcnn"]["weights"] = None  # explicit random start: no fault
    cfg["gpus"] = 64
    faults = run_checks(cfg, out_dir=tmp_path).faults
    text = "\n".join(map(str, faults))
    assert f"config key classifier_dense.weights: weights file not found: {tmp_path / 'nowhere.pth'}" in text
    assert "config key bestie.weights" in text and "bad.pth" in text
    assert "gpus: 64 but" in text
    assert {f.kind for f in faults} == {"weights", "gpu"}
    assert check_gpus(0) == []
    assert check_disk(tmp_path, 1) == []
    assert "GB free, the run needs about" in str(check_disk(tmp_path / "not" / "yet", 1 << 62)[0])


def test_snakemake_stops_at_the_check_before_any_training(tmp_path):
    where = _three_faults(tmp_path / "voc")
    work = tmp_path / "work"
    work.mkdir()
    cfg = write_config(tmp_path / "cfg.yaml", _config(tmp_path / "voc"))
    proc = snakemake(work, "results/chk/classifier/pam.pt", "--cores", "1", "--configfile", str(cfg), check=False)
    assert proc.returncode != 0
    log = (work / "results" / "chk" / "logs" / "check.log").read_text()
    for path in where.values():
        assert str(path) in log
    assert "3 fault(s) found before any training" in log
    out = work / "results" / "chk"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["logs/check.log"]


def test_check_reruns_on_data_changes_only(tmp_path):
    from workflow_util import planned_jobs

    root = _copy_voc(tmp_path / "voc", IDS, {"train": IDS, "val": IDS[:2]})
    work = tmp_path / "work"
    work.mkdir()
    cfg = _config(root)
    path = write_config(tmp_path / "cfg.yaml", cfg)
    snakemake(work, "results/chk/check.json", "--cores", "1", "--configfile", str(path))
    assert json.loads((work / "results" / "chk" / "check.json").read_text())["ok"] is True

    def planned(change: dict | None = None) -> dict:
        c = json.loads(json.dumps(cfg))
        for section, values in (change or {}).items():
            c[section].update(values)
        p = write_config(tmp_path / "c.yaml", c)
        return planned_jobs(snakemake(work, "-n", "results/chk/classifier/pam.pt", "--configfile", str(p)).stdout)

    # stage keys rerun no check (and so nothing upstream of their stage)
    assert planned({"classifier_pam": {"lr": 0.5}}) == {"train_classifier": 1}
    assert planned({"classifier_pam": {"weights": None}}) == {"train_classifier": 1}
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("".join(f"{i}\n" for i in IDS[:3]))
    assert planned() == {"check": 1, "train_classifier": 1}  # the data changed: checked again, then the stage


COCO128 = SHARED_DATA / "coco128"


@pytest.mark.skipif(not COCO128.is_dir(), reason=f"real data {COCO128} is absent")
def test_coco_sizes_categories_and_unreadable_images_all_reported(tmp_path):
    data = json.loads((COCO128 / "annotations" / "instances_train.json").read_text())
    keep = data["images"][:3]
    images = tmp_path / "images"
    images.mkdir()
    for im in keep:
        shutil.copy(COCO128 / "images" / im["file_name"], images / im["file_name"])
    (images / keep[2]["file_name"]).write_bytes(b"not a jpeg")  # unreadable header
    ids = {im["id"] for im in keep}
    train = {"images": [dict(im) for im in keep], "categories": data["categories"],
             "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}
    train["images"][0]["height"] += 1  # the JSON disagrees with the file
    val = json.loads(json.dumps(train))
    val["images"][0]["height"] -= 1
    val["categories"] = val["categories"][:-1]  # one category fewer than the training split
    val["annotations"] = [a for a in val["annotations"] if a["category_id"] != data["categories"][-1]["id"]]
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "train.json").write_text(json.dumps(train))
    (ann / "val.json").write_text(json.dumps(val))
    cfg = _config(tmp_path)
    cfg["dataset"] = {"format": "coco", "root": str(tmp_path), "train_split": "train", "eval_split": "val",
                      "ann_file": str(ann / "{split}.json"), "image_dir": str(images)}
    faults = [str(f) for f in run_checks(cfg, out_dir=tmp_path, weights=False).faults]
    first, bad = images / keep[0]["file_name"], images / keep[2]["file_name"]
    h, w = keep[0]["height"], keep[0]["width"]
    assert f"{first}: image is {w}x{h} (WxH) but {ann / 'train.json'} gives image {keep[0]['id']} width {w}, height {h + 1}" in faults
    assert sum(f.startswith(f"{bad}: cannot read image") for f in faults) == 2  # train and val list it
    assert any(f.startswith(f"{ann / 'val.json'}: split 'val' has other categories than split 'train' (79 vs 80")
               for f in faults), faults
    assert len(faults) == 4, faults
