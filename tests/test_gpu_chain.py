"""The prepared GPU run (benchmarks/gpu_chain.py): its output files, its Snakemake command and, opt-in, the
whole script on the CPU with cut schedules (BESTIE_GPU_CHAIN_TEST=1; about 6 minutes on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_chain

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "coco128-voc"

#: the cut schedules of the CPU check (each stage runs, for a few iterations)
CUT = ("classifier_pam.epochs=2 classifier_pam.lr_steps=[1] classifier_pam.resize=128 classifier_pam.crop_size=128 "
       "classifier_pam.num_workers=0 classifier_dense.epochs=2 classifier_dense.lr_steps=[1] "
       "classifier_dense.resize=128 classifier_dense.crop_size=128 classifier_dense.num_workers=0 wsss.crf_scale=0.5 "
       "wsss.workers=1 bestie.max_iters=40 bestie.warmup_iters=5 bestie.lr=0.003 bestie.batch_size=4 bestie.crop_size=96 "
       "bestie.resize=128 bestie.num_workers=2 bestie.checkpoint_every=20 bestie.log_every=10 bestie.refine_iter=20 "
       "bestie.probe_images=2 inference.resize=256 inference.center_threshold=0.002 inference.min_area=10 "
       "export.score_threshold=0.0 export.min_area=1 export.filter_by_image_labels=false maskrcnn.max_iters=4 "
       "maskrcnn.batch_size=2 maskrcnn.min_size=128 maskrcnn.max_size=160 maskrcnn.warmup_iters=2 "
       "maskrcnn.checkpoint_every=2 maskrcnn.num_workers=2")


def test_collect_gathers_benchmarks_metrics_and_the_training_log(tmp_path: Path) -> None:
    run = tmp_path / "results" / "r"
    (run / "benchmarks").mkdir(parents=True)
    (run / "bestie").mkdir()
    (run / "benchmarks" / "train_bestie.tsv").write_text("s\th:m:s\tmax_rss\n12.5\t0:00:12\t900\n")
    (run / "benchmarks" / "evaluate_val.tsv").write_text("s\th:m:s\tmax_rss\n")  # running: header only
    (run / "bestie" / "metrics_train.json").write_text('{"mAP50": 12.5}')
    (run / "bestie" / "train_log.jsonl.partial").write_text('{"event": "start"}\n{"event": "train"}\n')
    out = tmp_path / "out"
    out.mkdir()
    got = gpu_chain.collect(run, out)
    assert got == {"rules": ["train_bestie"], "metrics": False, "train_log_lines": 2}
    assert (out / "rule_benchmarks.tsv").read_text() == "rule\ts\th:m:s\tmax_rss\ntrain_bestie\t12.5\t0:00:12\t900\n"
    assert json.loads((out / "stage_metrics.json").read_text()) == {"bestie/metrics_train.json": {"mAP50": 12.5}}
    (run / "metrics.json").write_text("{}")
    assert gpu_chain.collect(run, out)["metrics"] and (out / "metrics.json").read_text() == "{}"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "rule_benchmarks.tsv", "stage_metrics.json",
                                                      "train_bestie_log.jsonl"]


def test_chain_command_takes_the_preset_overrides_and_the_data() -> None:
    args = gpu_chain.argparse.Namespace(config=["run=x"], cpu=True, data="/d", set="bestie.max_iters=3", cores="2")
    cmd = gpu_chain._chain_command(args)
    assert cmd[1:3] == ["-m", "snakemake"] and "--resources" not in cmd
    assert cmd[cmd.index("--configfile") + 1] == gpu_chain.PRESET
    assert cmd[cmd.index("--config") + 1:] == ["run=x", "gpus=0", "set=bestie.max_iters=3 dataset.root=/d"]
    gpu = gpu_chain._chain_command(gpu_chain.argparse.Namespace(config=[], cpu=False, data="/d", set="", cores="all"))
    assert gpu[gpu.index("--resources") + 1] == "gpu=1" and gpu[-1] == "set=dataset.root=/d"


@pytest.mark.skipif(os.environ.get("BESTIE_GPU_CHAIN_TEST") != "1", reason="opt-in: BESTIE_GPU_CHAIN_TEST=1 (minutes)")
@pytest.mark.skipif(not DATA.is_dir(), reason=f"real data folder {DATA} absent")
def test_gpu_chain_end_to_end_on_cpu_with_cut_schedules(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from workflow_util import make_voc_subset

    ids = (DATA / "ImageSets/Segmentation/train.txt").read_text().split()
    val = (DATA / "ImageSets/Segmentation/val.txt").read_text().split()
    sub = make_voc_subset(tmp_path / "data", DATA, ids[:8], val[:3])
    out = tmp_path / "out"
    run = f"gpu-chain-test-{os.getpid()}"
    env = dict(os.environ, GPU_CHAIN_SET=CUT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_chain", str(out), "--cpu", "--cores", "2", "--data",
                           str(sub), "--config", f"run={run}", "--limit-s", "1500"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["gpu_bench.json", "gpu_chain.log", "metrics.json", "rule_benchmarks.tsv", "snakemake.log",
                     "stage_metrics.json", "train_bestie_log.jsonl"]
    rules = {line.split("\t")[0] for line in (out / "rule_benchmarks.tsv").read_text().splitlines()[1:]}
    assert {"train_bestie", "train_maskrcnn", "make_wsss_maps"} <= {r.split("_val")[0] for r in rules} | rules
    log = [json.loads(line) for line in (out / "train_bestie_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log if r.get("event") == "train"] == [10, 20, 30, 40]
    assert json.loads((out / "gpu_bench.json").read_text())["train"]["fp32"]["refined_pixels"] > 0
