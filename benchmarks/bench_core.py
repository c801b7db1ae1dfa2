"""Timings of the BESTIE core functions (targets, refinement, inference grouping) on one CPU thread.

Usage: ``python benchmarks/bench_core.py [--repeats-scale 1.0] [--out FILE]``; prints one JSON object:
for each function the minimum and median wall time in milliseconds over the repeats, the scene, and the
targets (public-code figures in brackets): ``pseudo_instance_components`` (the compact pseudo labels the
DataLoader makes per sample; ``make_pseudo_instance_labels``, the dense ones, is also timed) one 416x416
sample with 5 WSSS components < 2 ms (~10 ms); ``targets_batch_dense`` / ``targets_batch_compact`` the
targets of a batch of 8 made dense and stacked / compact, collated and rendered; ``refine_targets`` batch of 8 such samples, C = 20, < 100 ms (~8.5 s);
``get_instances`` one 500x375 image with 5 instances < 30 ms (~1.4 s).

Inputs are synthetic (ellipse components, predictions = pseudo targets + noise) and deterministic.
``run()`` returns the same dict for use by other benchmark drivers.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import emit_json, time_calls  # noqa: E402
from bestie.params import PseudoLabelParams  # noqa: E402
from bestie.postprocess import get_instances  # noqa: E402
from bestie.refine import refine_targets  # noqa: E402
from bestie.targets import make_pseudo_instance_labels, pseudo_instance_components  # noqa: E402

NUM_CLASSES = 20
# (top, left, height, width, class): five components of three classes
BLOBS = [(20, 20, 80, 100, 3), (150, 30, 90, 60, 3), (40, 250, 100, 120, 15), (250, 250, 120, 100, 15),
         (290, 60, 60, 60, 8)]


def scene(height: int, width: int):
    """WSSS map with the five elliptic components, their labels and one point per component."""
    wsss = np.zeros((height, width), np.uint8)
    pts = []
    for (y, x, h, w, c) in BLOBS:
        yy, xx = np.ogrid[:h, :w]
        ell = ((yy - (h - 1) / 2) / (h / 2)) ** 2 + ((xx - (w - 1) / 2) / (w / 2)) ** 2 <= 1
        wsss[y : y + h, x : x + w][ell] = c + 1
        pts.append([x + w / 2, y + h / 2, c, 0.9])
    wsss[244:247, :] = 255  # an ignore band that cuts no component
    return wsss, sorted({b[4] for b in BLOBS}), np.array(pts, np.float32)


def _time(fn, repeats: int, warmup: int = 2):
    """:func:`benchmarks.time_calls` of ``fn`` in ms (CPU time = this process only: on a shared,
    oversubscribed machine the wall time also counts the time spent waiting for a core)."""
    t = time_calls(fn, repeats, warmup)
    return {
        "min_ms": round(t["min_s"] * 1e3, 3),
        "median_ms": round(t["median_s"] * 1e3, 3),
        "cpu_min_ms": round(t["cpu_min_s"] * 1e3, 3),
        "cpu_median_ms": round(t["cpu_median_s"] * 1e3, 3),
        "repeats": repeats,
    }


def run(repeats_scale: float = 1.0) -> dict:
    """Run the three timings; returns a JSON-serialisable dict."""
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    res = {
        "threads": {"torch": torch.get_num_threads(), "opencv": cv2.getNumThreads()},
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
    }

    # 1. pseudo labels of one 416x416 sample
    wsss, labels, pts = scene(416, 416)
    res["make_pseudo_instance_labels"] = _time(
        lambda: make_pseudo_instance_labels(wsss, labels, pts, num_classes=NUM_CLASSES),
        max(5, int(200 * repeats_scale)),
    )
    res["make_pseudo_instance_labels"].update(scene="416x416, 5 components, 3 classes, C=20 (dense, on the host)")
    # what the DataLoader does per sample since issue 16: the compact labels (the dense ones are rendered on
    # the training device)
    res["pseudo_instance_components"] = _time(
        lambda: pseudo_instance_components(wsss, labels, pts, num_classes=NUM_CLASSES),
        max(5, int(200 * repeats_scale)),
    )
    res["pseudo_instance_components"].update(scene="416x416, 5 components, 3 classes, C=20", target_ms=2.0)

    # 2. refinement of a batch of 8
    batch = 8
    tg = make_pseudo_instance_labels(wsss, labels, pts, num_classes=NUM_CLASSES)
    center = torch.from_numpy(np.repeat(tg["center"][None], batch, 0))
    center += torch.rand(center.shape, generator=gen) * 0.05
    offset = torch.from_numpy(np.repeat(tg["offset"][None], batch, 0))
    offset += torch.randn(offset.shape, generator=gen)
    logits = torch.randn((batch, NUM_CLASSES + 1, 416, 416), generator=gen)
    ws = torch.from_numpy(np.repeat(wsss[None], batch, 0))
    labs = [labels] * batch
    out = refine_targets(logits, center, offset, ws, labs)
    res["refine_targets"] = _time(
        lambda: refine_targets(logits, center, offset, ws, labs), max(3, int(10 * repeats_scale))
    )
    res["refine_targets"].update(scene="batch 8 x 416x416, 5 components each, C=20", target_ms=100.0,
                                 refined_pixels=int((out["weight"] > 0).sum()))
    pts_b = [pts] * batch
    res["refine_targets_point"] = _time(
        lambda: refine_targets(logits, center, offset, ws, labs, pts_b, pseudo=PseudoLabelParams(setting="point")),
        max(3, int(10 * repeats_scale)),
    )
    res["refine_targets_point"].update(scene="as refine_targets, point setting")
    del logits, center, offset

    # 2b. the pseudo targets of a batch of 8: dense per sample + stacked (before issue 16), against compact per
    # sample + collate_compact + render_targets (the loader's and the training step's work since)
    res.update(_targets_batch(wsss, labels, pts, batch, max(3, int(10 * repeats_scale))))

    # 3. inference grouping of one 500x375 image
    wsss2, labels2, pts2 = scene(375, 500)
    tg2 = make_pseudo_instance_labels(wsss2, labels2, pts2, num_classes=NUM_CLASSES)
    logit = rng.normal(0, 1, (NUM_CLASSES + 1, 375, 500)).astype(np.float32)
    s = wsss2.astype(np.int64)
    s[s == 255] = 0
    np.put_along_axis(logit, s[None], 6.0, axis=0)
    prob = torch.softmax(torch.from_numpy(logit), 0)
    ctr = torch.from_numpy(tg2["center"] + rng.random(tg2["center"].shape, dtype=np.float32) * 0.05)
    off = torch.from_numpy(tg2["offset"] + rng.normal(0, 1, tg2["offset"].shape).astype(np.float32))
    inst = get_instances(prob, ctr, off)
    res["get_instances"] = _time(lambda: get_instances(prob, ctr, off), max(5, int(30 * repeats_scale)))
    res["get_instances"].update(scene="375x500 (HxW), 5 instances, C=20", target_ms=30.0,
                                instances=int(len(inst["labels"])))
    return res


def _targets_batch(wsss: np.ndarray, labels, pts: np.ndarray, batch: int, repeats: int) -> dict:
    """``targets_batch_dense`` / ``targets_batch_compact``: the pseudo targets of ``batch`` samples (the scene
    and its mirror image) made dense on the host and stacked, or compact, collated and rendered
    (:func:`bestie.targets.render_targets` on the CPU)."""
    from bestie.instance_data import collate_compact
    from bestie.targets import pseudo_instance_components, render_targets

    scenes = [(wsss, pts), (np.ascontiguousarray(wsss[:, ::-1]), pts * np.array([-1, 1, 1, 1], np.float32)
                            + np.array([wsss.shape[1] - 1, 0, 0, 0], np.float32))]

    def dense():
        out = [make_pseudo_instance_labels(*scenes[i % 2][:1], labels, scenes[i % 2][1], num_classes=NUM_CLASSES)
               for i in range(batch)]
        return {k: torch.stack([torch.from_numpy(o[k]) for o in out]) for k in ("center", "offset", "weight")}

    def compact():
        samples = []
        for i in range(batch):
            c = pseudo_instance_components(scenes[i % 2][0], labels, scenes[i % 2][1], num_classes=NUM_CLASSES)
            samples.append({k: torch.from_numpy(c[k]) for k in ("components", "table", "gaussians")})
        b = collate_compact(samples)
        return render_targets(b["components"], b["table"], b["gaussians"], b["first_row"], num_classes=NUM_CLASSES)

    a, b = dense(), compact()
    same = all(torch.equal(a[k], b[k]) for k in a)
    scene_text = f"batch {batch} x 416x416, 5 components each, C=20"
    return {"targets_batch_dense": {**_time(dense, repeats), "scene": scene_text},
            "targets_batch_compact": {**_time(compact, repeats), "scene": scene_text, "equal_to_dense": same}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats-scale", type=float, default=1.0, help="multiply the number of repeats")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON to this file")
    args = ap.parse_args(argv)
    res = run(args.repeats_scale)
    emit_json(res, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
