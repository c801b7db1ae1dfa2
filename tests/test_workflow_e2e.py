"""Every stage on 8 real images of ../shared/data/coco128-voc through Snakemake, then rerun semantics.

The run is CI-sized (tiny crops and iteration counts): it proves that each artifact has the right
form and content, not that the figures are good (the README's results table has those).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bestie.data import build_dataset
from bestie.io.h5store import H5Reader
from workflow_util import SHARED_DATA, make_voc_subset, planned_jobs, snakemake, tiny_config, write_config

SOURCE = SHARED_DATA / "coco128-voc"
pytestmark = pytest.mark.skipif(not SOURCE.is_dir(), reason=f"real data not found at {SOURCE}")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    ids = (SOURCE / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[:8]
    root = make_voc_subset(base / "voc", SOURCE, train_ids=ids, val_ids=ids[:4])
    dataset = {"format": "voc", "root": str(root), "train_split": "train", "eval_split": "val"}
    cfg = tiny_config("e2e", dataset)
    # the predict rule on two of the images with the run's BESTIE model (always trained, unlike the
    # Mask R-CNN, which a CI-sized run may leave without pseudo labels)
    images = root / "JPEGImages"
    cfg["predict"] = {"images": [str(images / f"{ids[0]}.jpg"), str(images / f"{ids[1]}.jpg")],
                      "model": "bestie", "score_threshold": 0.0}
    config_path = write_config(base / "config.yaml", cfg)
    work = base / "work"
    work.mkdir()
    # two jobs side by side, one thread each: a 2-thread job beside the suite's other worker (make test runs
    # one per core) oversubscribes the cores, and torch's OpenMP threads then spin-wait for each other
    # (train_bestie: 138 CPU-s with 2 threads in the suite, 16 with 1; the whole run 253 -> 102 CPU-s)
    proc = snakemake(work, "--cores", "2", "--max-threads", "1", "--keep-going", "--configfile", str(config_path),
                     timeout=1200, check=False)
    return {"work": work, "out": work / "results" / "e2e", "cfg": cfg, "config_path": config_path,
            "dataset": dataset, "ids": ids, "log": proc.stdout + proc.stderr}


def _maskrcnn_had_labels(run) -> bool:
    """A CI-sized BESTIE (40 iterations on 8 images) sometimes predicts background everywhere; then the
    pseudo-label JSON is empty and train_maskrcnn must stop with a clear error, which is checked here,
    and the Mask R-CNN artifacts cannot be checked (the test is marked xfail, not passed)."""
    pseudo = json.loads((run["out"] / "pseudo_labels" / "train.json").read_text())
    if pseudo["annotations"]:
        return True
    log = (run["out"] / "logs" / "train_maskrcnn.log").read_text()
    assert "no image has a pseudo instance" in log
    assert not (run["out"] / "maskrcnn" / "model.pt").exists()
    return False


def test_every_stage_ran(finished_run):
    jobs = planned_jobs(finished_run["log"])
    for rule in ("train_classifier", "make_cams", "make_wsss", "train_bestie", "predict_instances",
                 "export_pseudo_labels", "train_maskrcnn", "evaluate", "report", "predict"):
        assert jobs.get(rule, 0) >= 1, rule
    # the training stages' progress reached Snakemake's terminal, prefixed with the rule (bestie.progress)
    for line in ("[train_classifier] classifier pam: ", "[make_cams] cams pam_cams: ", "[train_bestie] bestie: "):
        assert line in finished_run["log"], line
    if not _maskrcnn_had_labels(finished_run):
        pytest.xfail("the CI-sized BESTIE model predicted no instance: Mask R-CNN had no pseudo labels")
    assert "error" not in finished_run["log"].lower().split("job stats")[-1]


def test_cams_and_points(finished_run):
    out, ids = finished_run["out"], finished_run["ids"]
    ds = build_dataset(finished_run["dataset"], split="train")
    with H5Reader(out / "cams" / "dense_cams.h5") as cams:
        assert cams.ids() == ids
        for image_id in ids:
            rec = cams.read(image_id)
            labels = ds.labels(image_id)
            assert list(rec["classes"]) == list(labels)
            assert rec["cams"].dtype == np.float16 and rec["cams"].shape[0] == len(labels)
            assert 0.0 <= float(rec["cams"].min()) and float(rec["cams"].max()) <= 1.0 + 1e-3
            h, w = ds.image(image_id).shape[:2]
            assert rec["cams"].shape[1:] == (-(-h // 4), -(-w // 4)) or abs(rec["cams"].shape[1] - h / 4) <= 1
    with H5Reader(out / "cams" / "pam_points.h5") as points:
        for image_id in ids:
            pts = points.read_array(image_id, "points")
            h, w = ds.image(image_id).shape[:2]
            assert pts.ndim == 2 and pts.shape[1] == 4
            assert set(pts[:, 2].astype(int)) <= set(ds.labels(image_id))
            assert np.all((pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h))
    diag = json.loads((out / "cams" / "dense_diagnostics.json").read_text())
    assert 0.0 <= diag["best_mIoU"] <= 100.0 and 0.0 < diag["best_threshold"] < 1.0


def test_wsss_maps_use_only_image_label_classes(finished_run):
    out, ids = finished_run["out"], finished_run["ids"]
    ds = build_dataset(finished_run["dataset"], split="train")
    with H5Reader(out / "wsss" / "wsss.h5") as store:
        for image_id in ids:
            wsss = store.read_array(image_id, "wsss")
            assert wsss.dtype == np.uint8 and wsss.shape == ds.image(image_id).shape[:2]
            allowed = {0, 255} | {c + 1 for c in ds.labels(image_id)}
            assert set(np.unique(wsss).tolist()) <= allowed
    diag = json.loads((out / "wsss" / "diagnostics.json").read_text())
    assert 0.0 <= diag["mIoU"] <= 100.0


def test_instances_pseudo_labels_and_metrics(finished_run):
    out, ids = finished_run["out"], finished_run["ids"]
    ds = build_dataset(finished_run["dataset"], split="train")
    with H5Reader(out / "bestie" / "instances_train.h5") as store:
        assert store.ids() == ids
        for image_id in ids:
            rec = store.read(image_id)
            n = rec["labels"].shape[0]
            assert rec["masks"].shape == (n, *ds.image(image_id).shape[:2]) and rec["masks"].dtype == bool
            assert rec["scores"].shape == (n,)
            assert np.all((rec["labels"] >= 0) & (rec["labels"] < ds.num_classes))
    pseudo = json.loads((out / "pseudo_labels" / "train.json").read_text())
    assert len(pseudo["images"]) == len(ids)
    assert [c["id"] for c in pseudo["categories"]] == list(range(1, 21))
    keys = ["bestie/metrics_train.json", "bestie/baseline_train.json"]
    if not _maskrcnn_had_labels(finished_run):
        for key in keys:
            assert 0.0 <= json.loads((out / key).read_text())["mAP50"] <= 1.0
        pytest.xfail("the CI-sized BESTIE model predicted no instance: Mask R-CNN had no pseudo labels")
    for key in keys + ["evaluate/metrics_val.json"]:
        metrics = json.loads((out / key).read_text())
        for name in ("mAP25", "mAP50", "mAP70", "mAP75"):
            assert 0.0 <= metrics[name] <= 1.0, (key, name)
        assert metrics["mAP25"] >= metrics["mAP50"] >= metrics["mAP70"] >= metrics["mAP75"]
    combined = json.loads((out / "metrics.json").read_text())
    html = (out / "report.html").read_text()
    assert "<html" in html.lower() and "data:image/png;base64," in html
    assert combined


def test_predict_rule_wrote_the_configured_images(finished_run):
    """`predict.images` set: the workflow's predict rule ran the run's BESTIE model on the two listed
    images and wrote results/<run>/predict/ with plain log lines (no progress-bar states)."""
    out, ids = finished_run["out"] / "predict", finished_run["ids"]
    s = json.loads((out / "summary.json").read_text())
    assert (s["num_images"], s["num_skipped"], s["model"]) == (2, 0, "bestie")
    assert sorted(p.name for p in (out / "overlays").glob("*.png")) == sorted(f"{i}.png" for i in ids[:2])
    meta = json.loads((out / "images.json").read_text())
    assert sorted(Path(im["file_name"]).name for im in meta["images"]) == sorted(f"{i}.jpg" for i in ids[:2])
    assert isinstance(json.loads((out / "predictions.json").read_text()), list)
    log = (finished_run["out"] / "logs" / "predict.log").read_text()
    assert "\r" not in log and "predict: 2 images" in log


def test_changing_a_wsss_parameter_reruns_only_wsss_and_later(finished_run, tmp_path):
    cfg = json.loads(json.dumps(finished_run["cfg"]))
    cfg["wsss"]["bg_threshold"] = 0.42
    proc = snakemake(finished_run["work"], "-n", "--configfile", str(write_config(tmp_path / "c.yaml", cfg)))
    assert set(planned_jobs(proc.stdout)) == {
        "make_wsss", "score_baseline", "train_bestie", "predict_instances",
        "export_pseudo_labels", "train_maskrcnn", "evaluate", "report", "predict", "all",
    }


def test_changing_a_bestie_training_key_does_not_rerun_the_baseline(finished_run, tmp_path):
    """The baseline rule gets only the bestie keys it reads (issue 19, item 5)."""
    cfg = json.loads(json.dumps(finished_run["cfg"]))
    cfg["bestie"]["lr"] = 0.004
    proc = snakemake(finished_run["work"], "-n", "--configfile", str(write_config(tmp_path / "c.yaml", cfg)))
    jobs = set(planned_jobs(proc.stdout))
    assert "train_bestie" in jobs and "score_baseline" not in jobs


def test_forcerun_of_one_stage_reuses_upstream(finished_run):
    proc = snakemake(finished_run["work"], "-n", "--configfile", str(finished_run["config_path"]),
                     "--forcerun", "export_pseudo_labels")
    jobs = set(planned_jobs(proc.stdout))
    assert "export_pseudo_labels" in jobs
    assert not jobs & {"train_classifier", "make_cams", "make_wsss", "train_bestie", "predict_instances"}


def test_nothing_to_do_after_a_finished_run(finished_run):
    if not _maskrcnn_had_labels(finished_run):
        pytest.xfail("the run stopped before Mask R-CNN (no pseudo labels)")
    proc = snakemake(finished_run["work"], "-n", "--configfile", str(finished_run["config_path"]))
    assert planned_jobs(proc.stdout) == {}
