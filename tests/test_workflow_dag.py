"""The Snakemake DAG of every preset, and config validation before any job starts (issue 7)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from workflow_util import REPO, make_workdir, planned_jobs, snakemake, write_config

PRESETS = sorted((REPO / "workflow" / "presets").glob("*.yaml"))

IMAGE_SETTING_JOBS = {
    "train_classifier": 2,  # PAM (peaks) + dense (CAMs for WSSS)
    "make_cams": 2,
    "make_wsss": 1,
    "score_baseline": 1,
    "train_bestie": 1,
    "predict_instances": 1,
    "export_pseudo_labels": 1,
    "train_maskrcnn": 1,
    "evaluate": 1,
    "report": 1,
    "check": 1,  # issue 18: the pre-flight checks every stage waits for
    "all": 1,
}


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    return make_workdir(tmp_path)


def _preset_config(preset: Path, tmp_path: Path) -> Path:
    cfg = yaml.safe_load(preset.read_text())
    for key in ("root", "ann_file", "image_dir"):
        value = cfg["dataset"].get(key)
        if value and not Path(value).is_absolute():
            cfg["dataset"][key] = str((REPO / value).resolve())
    return write_config(tmp_path / preset.name, cfg)


def test_presets_exist():
    assert {p.stem for p in PRESETS} >= {"coco128-voc", "coco128", "voc2012", "coco2017"}


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_dry_run_lists_every_stage(preset: Path, workdir: Path, tmp_path: Path):
    proc = snakemake(workdir, "-n", "--configfile", str(_preset_config(preset, tmp_path)))
    expected = dict(IMAGE_SETTING_JOBS)
    members = len(yaml.safe_load(preset.read_text())["classifier_dense"].get("ensemble_seeds") or [])
    if members:  # the dense classifier is an ensemble: one member job per seed instead of dense.pt
        expected.update(train_classifier=1, train_classifier_member=members)
    if (yaml.safe_load(preset.read_text()).get("predict") or {}).get("images"):  # the trained model on images
        expected["predict"] = 1
    assert planned_jobs(proc.stdout) == expected


def test_demo_dry_run_generates_data_first(workdir: Path):
    proc = snakemake(workdir, "-n")
    assert planned_jobs(proc.stdout) == {**IMAGE_SETTING_JOBS, "demo_data": 1}


def test_point_setting_skips_the_pam_classifier(workdir: Path, tmp_path: Path):
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["bestie"]["setting"] = "point"
    proc = snakemake(workdir, "-n", "--configfile", str(write_config(tmp_path / "point.yaml", cfg)))
    jobs = planned_jobs(proc.stdout)
    assert jobs["train_classifier"] == 1 and jobs["make_cams"] == 1  # dense CAMs for WSSS only
    assert "results/demo/classifier/pam.pt" not in proc.stdout


@pytest.mark.parametrize(
    "change, key",
    [
        ({"bestie": {"lr_typo": 0.1}}, "lr_typo"),
        ({"wsss": {"crf_iters": "ten"}}, "crf_iters"),
        ({"bestie": {"setting": "box"}}, "setting"),
        ({"dataset": {"format": "kitti"}}, "format"),
        ({"gpus": -1}, "gpus"),
    ],
)
def test_schema_violation_fails_before_any_job_naming_the_key(workdir: Path, tmp_path: Path, change, key):
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    for section, value in change.items():
        if isinstance(value, dict):
            cfg[section].update(value)
        else:
            cfg[section] = value
    proc = snakemake(workdir, "-n", "--configfile", str(write_config(tmp_path / "bad.yaml", cfg)), check=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert key in text
    assert "Job stats" not in text
    assert not (workdir / "results").exists()


def test_dense_ensemble_trains_one_member_per_seed_and_averages_them(workdir: Path, tmp_path: Path):
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["classifier_dense"]["ensemble_seeds"] = [7, 11]
    proc = snakemake(workdir, "-n", "-p", "--configfile", str(write_config(tmp_path / "ens.yaml", cfg)))
    jobs = planned_jobs(proc.stdout)
    assert jobs["train_classifier"] == 1 and jobs["train_classifier_member"] == 2 and jobs["make_cams"] == 2
    assert "results/demo/classifier/dense.pt" not in proc.stdout
    for seed in (7, 11):  # each member trains with its own seed
        assert f"results/demo/classifier/dense_seed{seed}.pt" in proc.stdout
        assert f'"seed":{seed}' in proc.stdout
    cams = next(line for line in proc.stdout.splitlines() if "make-cams" in line and "dense_cams.h5" in line)
    assert "--checkpoint results/demo/classifier/dense_seed7.pt results/demo/classifier/dense_seed11.pt" in cams


def test_oracle_overlay_runs_bestie_on_gt_maps_without_classifiers(workdir: Path, tmp_path: Path):
    """The coco128-voc oracle overlay (GT SegmentationClass as WSSS maps, GT centres as points) merges
    into the preset: no classifier or CAM job, the imported maps feed BESTIE, its own run directory."""
    overlay = yaml.safe_load((REPO / "workflow" / "presets" / "overlays" / "coco128-voc-oracle.yaml").read_text())
    overlay["wsss"]["import_png_dir"] = str((REPO / overlay["wsss"]["import_png_dir"]).resolve())
    proc = snakemake(workdir, "-n", "--configfile", str(_preset_config(REPO / "workflow/presets/coco128-voc.yaml",
                                                                          tmp_path)),
                     str(write_config(tmp_path / "oracle.yaml", overlay)))
    assert planned_jobs(proc.stdout) == {"check": 1, "import_wsss": 1, "score_baseline": 1, "train_bestie": 1,
                                         "predict_instances": 1, "export_pseudo_labels": 1, "train_maskrcnn": 1,
                                         "evaluate": 1, "report": 1, "all": 1}
    assert "results/coco128-voc-oracle/wsss/imported.h5" in proc.stdout
    assert "pam_points" not in proc.stdout  # the point setting: BESTIE takes no peak points
