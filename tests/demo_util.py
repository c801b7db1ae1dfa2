"""Helpers for the Mask R-CNN and predict tests: a small demo dataset with pseudo labels cut from its GT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bestie.data import build_dataset, generate_demo_dataset
from bestie.data.demo import DEMO_CLASSES
from bestie.stages import export_pseudo_labels as ex


def demo_with_gt_pseudo_labels(tmp: Path, num_train: int, num_val: int) -> tuple[dict[str, Any], Path]:
    """A 96x96 demo dataset in ``tmp/demo`` and ``tmp/pseudo.json``, the pseudo-label export of the GT
    instances of its train images (scores 0.9 down to 0.6 in each image; every instance kept).

    Returns:
        ``(dataset config section, path of the pseudo-label COCO JSON)``.
    """
    root = generate_demo_dataset(tmp / "demo", num_train=num_train, num_val=num_val, image_size=(96, 96))
    cfg = {"format": "voc", "root": str(root), "classes": list(DEMO_CLASSES), "train_split": "train",
           "eval_split": "val"}
    ds = build_dataset(cfg, "train")
    preds = {}
    for i in ds.ids:
        gt = ds.instances_gt(i)
        preds[i] = {**gt, "scores": np.linspace(0.9, 0.6, len(gt["labels"])).astype(np.float32)}
    pseudo = tmp / "pseudo.json"
    ex.run(ex.ExportConfig(score_threshold=0.0, min_area=1), cfg, "train", preds, pseudo)
    return cfg, pseudo
