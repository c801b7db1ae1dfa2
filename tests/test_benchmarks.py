"""Smoke test of the benchmark driver (``python -m benchmarks.run --quick``) and the GPU script's refusal.

No timing is asserted (the machine is shared); the test checks that every benchmark runs, that the JSON
has the documented keys, that times, rates and memory figures are positive, and the few facts that
follow from the set-up: image counts of the 1x / 4x stage runs, a flat peak memory between them
(streaming HDF5), a DAG whose job count is the workflow's, and AP75 <= AP50.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "coco128-voc"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return env


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "sub" / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--out", str(out), "--quick"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"benchmarks.run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text()), proc.stdout


def test_document_and_machine(quick_run):
    doc, stdout = quick_run
    assert doc["schema"] == 1 and doc["quick"] is True
    assert set(doc["benchmarks"]) == {"core", "eval", "stages", "dag", "step"}
    m = doc["machine"]
    assert m["cpu_count"] >= 1 and m["torch_threads"] == 1
    assert m["versions"]["torch"] and m["versions"]["numpy"]
    assert doc["seconds"] > 0
    for name, res in doc["benchmarks"].items():
        assert "error" not in res, f"{name}: {res.get('error')}"
        if "skipped" in res:  # stages without ../shared/data, dag without snakemake: nothing was timed
            assert name in ("stages", "dag"), f"{name}: {res['skipped']}"
            continue
        assert res["bench_seconds"] > 0
    # the Markdown summary on stdout lists every summary row
    assert "| benchmark | value | target |" in stdout
    assert len(doc["summary"]) >= 5
    for row in doc["summary"]:
        assert row["unit"] == "ratio" or row["value"] > 0, row  # a ratio of differences may be <= 0 in --quick
        if row["unit"] not in ("images/s", "images/CPU-s") and not row["name"].endswith("peak RSS"):
            assert row["name"] in stdout  # first table; the stages have their own
    if "per_factor" in doc["benchmarks"]["stages"]:
        assert "| stage | images | images/s (wall) | images per CPU-s | peak RSS (MiB) |" in stdout
        assert "| CAM stage, 4x | 8 |" in stdout


def test_core_and_eval(quick_run):
    b = quick_run[0]["benchmarks"]
    assert b["core"]["make_pseudo_instance_labels"]["median_ms"] > 0
    assert b["core"]["targets_batch_compact"]["equal_to_dense"] is True  # the rendered batch = the dense one
    for key, target in (("pseudo_instance_components", 2.0), ("refine_targets", 100.0), ("get_instances", 30.0)):
        r = b["core"][key]
        assert 0 < r["min_ms"] <= r["median_ms"]
        assert r["target_ms"] == target
    ev = b["eval"]
    assert ev["images"] == 100 and ev["instances_per_image"] == 5 and ev["predictions_per_image"] == 6
    assert 0 < ev["min_s"] <= ev["total_s"]
    # predictions are the GT jittered by a few pixels plus one false positive per image: most match at 0.5
    assert 0.5 < ev["mAP50"] <= 1.0
    assert 0.0 <= ev["mAP75"] <= ev["mAP50"]  # a TP at IoU 0.75 is a TP at 0.5
    assert ev["target_s_scaled"] == pytest.approx(30.0 * 100 / 1449, abs=1e-3)


def test_step(quick_run):
    st = quick_run[0]["benchmarks"]["step"]
    assert st["config"]["batch"] == 2 and st["config"]["crop"] == 128 and st["config"]["threads"] == 1
    assert set(st["phases"]) == {"target_render", "forward", "refinement", "loss", "backward", "optimizer"}
    for r in [st["data"], st["step"], st["floor"], *st["phases"].values()]:
        assert r["n"] == 1 and r["median_s"] >= 0 and r["cpu_median_s"] >= 0
    assert st["floor"]["median_s"] > 0 and st["step"]["median_s"] > 0
    assert st["overhead_ratio"] == pytest.approx((st["step"]["cpu_median_s"] - st["floor"]["cpu_median_s"])
                                                 / st["floor"]["cpu_median_s"], abs=1e-3)
    # the planted heads make refinement group every component: refined targets on a real share of the pixels
    assert 0.02 * 2 * 128 * 128 < st["refined_pixels"] < 2 * 128 * 128


def test_stages(quick_run):
    st = quick_run[0]["benchmarks"]["stages"]
    if "skipped" in st:
        pytest.skip(st["skipped"])
    ids = st["data"]["ids"]
    assert ids == 2
    for factor, mult in (("1x", 1), ("4x", 4)):
        for stage in ("cams", "wsss", "evaluate"):
            r = st["per_factor"][factor][stage]
            assert r["images"] == ids * mult
            assert r["seconds"] > 0 and r["images_per_s"] > 0
            assert r["cpu_seconds"] > 0 and r["images_per_cpu_s"] > 0
            assert 0 < r["setup_rss_mb"] <= r["peak_rss_mb"]
    for stage in ("cams", "wsss", "evaluate"):
        # one image in memory at a time: 4x the images must not grow the peak noticeably
        assert 0.8 < st[stage]["rss_ratio_4x_1x"] < 1.25, st[stage]


def test_dag(quick_run):
    dag = quick_run[0]["benchmarks"]["dag"]
    if "skipped" in dag:
        pytest.skip(dag["skipped"])
    assert dag["ids"] == 10_000
    assert dag["median_s"] > 0
    # the workflow has train_classifier x2, make_cams x2, wsss, baseline, train_bestie, predict, export,
    # train_maskrcnn, evaluate, report, all: whole-split rules, no per-image jobs
    assert 5 <= dag["jobs"] < 100


def test_peak_rss_reset():
    from benchmarks import peak_rss_mb, reset_peak_rss

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no /proc/self/clear_refs (not Linux)")
    assert reset_peak_rss()  # the high-water mark of earlier tests would hide the allocation below
    base = peak_rss_mb()
    block = np.ones(200 * 2**20, dtype=np.uint8)  # 200 MiB, touched
    high = peak_rss_mb()
    assert high >= base + 190
    del block
    assert reset_peak_rss()
    assert peak_rss_mb() < high - 150


def test_gpu_bench_refuses_without_cuda():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_bench"], cwd=ROOT, env=_env(CUDA_VISIBLE_DEVICES=""),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no CUDA device" in proc.stderr


def test_gpu_bench_on_cpu_writes_every_variant(tmp_path):
    """gpu_bench with --allow-cpu and tiny sizes: each training variant's phases, floor and step, the
    planted heads' refined pixels, the inference entries, the summary keys (figures not asserted)."""
    out = tmp_path / "g" / "gpu_bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_bench", "--allow-cpu", "--backbone",
                           "tf_efficientnet_lite0", "--batch", "2", "--crop", "64", "--iters", "1", "--warmup", "1",
                           "--infer-images", "1", "--out", str(out)], cwd=ROOT, env=_env(CUDA_VISIBLE_DEVICES=""),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    from benchmarks.gpu_bench import TRAIN_VARIANTS

    for name, _ in TRAIN_VARIANTS:
        r = doc["train"][name]
        assert set(r["phases"]) == {"target_render", "forward", "refinement", "loss", "backward", "optimizer"}
        assert r["step_median_s"] > 0 and r["floor"]["median_s"] > 0 and r["refined_pixels"] > 0
        assert r["step_over_floor"] == pytest.approx(r["step_median_s"] / r["floor"]["cpu_median_s"], rel=1e-2)
    assert doc["train"]["fastest"] in dict(TRAIN_VARIANTS) and doc["train"]["amp_speedup"] > 0
    assert doc["infer"]["fp32"]["images_per_s"] > 0 and doc["infer"]["amp"]["images_per_s"] > 0
