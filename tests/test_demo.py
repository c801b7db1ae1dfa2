"""`make demo`'s workflow (config.yaml, the embedded synthetic demo) and its mAP50 floors.

Marked ``demo``: `make test` leaves these out; `make test-slurm` (called by CI) submits the demo through
the SLURM profile and then runs them on that run's results (``BESTIE_DEMO_RESULTS`` = its
``results/demo`` folder). Without the variable, ``pytest -m demo`` runs the demo itself first (about as
long as `make demo`).

The floors sit far above what the same stages score with untrained heads (measured on the demo,
2026-11-29, written beside each floor) and well below the trained demo's figures, so a broken stage
(targets, refinement, grouping, export, Mask R-CNN) cannot clear them by chance.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from workflow_util import REPO, snakemake

pytestmark = pytest.mark.demo

# BESTIE predictions on the 48 demo train images, VOC mAP50 (fraction). Untrained heads (train-bestie
# with max_iters 1 and lr 1e-12: ImageNet encoder, random heads) scored 0.0006 (551 instances); the demo
# (120 iterations, seed 3407) scored 0.722.
BESTIE_FLOOR = 0.25
# Mask R-CNN trained on the demo's pseudo labels, VOC mAP50 (fraction) on the 16 demo val images.
# Untrained heads (train-maskrcnn with max_iters 1 and lr 1e-12) scored 0.00005; the demo (seed 3407) scored 0.676.
MASKRCNN_FLOOR = 0.15
# Spread of the demo over seeds 3407, 1 and 2 since the WSSS seeds respect the background threshold
# (2026-12-07, 2-core Intel AVX512 VM, docs/RESULTS.md): BESTIE 0.505-0.722, Mask R-CNN 0.480-0.676; the
# floors sit at 0.50x and 0.31x of the worst run. Before that fix, 48 % of the demo's WSSS pixels were
# 255 and BESTIE ranged 0.104-0.402 across machines and seeds (0.104 on this VM at seed 3407, against a
# floor of 0.10). (At Mask R-CNN lr 0.005 it ranged 0.028-0.32, and a CI run fell below its floor.)


@pytest.fixture(scope="module")
def demo_results(tmp_path_factory) -> Path:
    given = os.environ.get("BESTIE_DEMO_RESULTS")
    if given:
        return Path(given)
    work = tmp_path_factory.mktemp("demo")
    shutil.copy(REPO / "config.yaml", work / "config.yaml")
    snakemake(work, "--cores", "2", "--configfile", str(work / "config.yaml"), timeout=3600)
    return work / "results" / "demo"


def test_demo_wrote_every_stage_and_the_metrics_table(demo_results):
    metrics = json.loads((demo_results / "metrics.json").read_text())
    assert set(metrics["stages"]) >= {"cams_dense", "wsss", "baseline", "bestie", "maskrcnn"}
    for key in ("cams_dense", "wsss", "baseline", "bestie", "maskrcnn"):
        assert not metrics["stages"][key]["missing"], key
    assert (demo_results / "report.html").stat().st_size > 1000


def test_demo_bestie_clears_the_floor(demo_results):
    m = json.loads((demo_results / "bestie" / "metrics_train.json").read_text())
    assert m["num_images"] == 48
    assert m["num_instances"] > 0 and m["mAP50"] >= BESTIE_FLOOR, m["mAP50"]


def test_demo_maskrcnn_clears_the_floor(demo_results):
    m = json.loads((demo_results / "evaluate" / "metrics_val.json").read_text())
    assert m["mAP50"] >= MASKRCNN_FLOOR, m["mAP50"]
