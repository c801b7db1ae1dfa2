"""Time of the VOC instance evaluation (:class:`bestie.evaluation.VOCInstanceEvaluator`) of a VOC val set.

Scene: ``num_images`` (1449 = VOC 2012 val) images of 375x500 (HxW) pixels, each with 5 GT instances
(ellipses of 20..160 px axes, random classes of C = 20) and 6 predictions: each GT jittered (centre
shift up to 6 px, axes scaled by 0.85..1.15, a score in [0.3, 1)) and one false positive (a random
ellipse and class, score in [0, 0.5)). The masks are synthetic and deterministic (seed 0); a pool of
``pool`` distinct images is cycled, so that building the masks neither dominates the run nor holds
1449 images in memory. Timed: every ``update(pred, gt)`` plus the final ``evaluate()``; mask building is
outside the timing. Target: < 30 s for 1449 images (METHOD.md "Evaluation protocol"; the reference
chainercv code is a few minutes).

Usage: ``python -m benchmarks.bench_eval [--images 1449] [--repeats 3]`` prints the JSON result.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from benchmarks import time_calls

__all__ = ["make_scene", "run", "TARGET_S"]

NUM_CLASSES = 20
HEIGHT, WIDTH = 375, 500
#: Target for 1449 images, seconds.
TARGET_S = 30.0


def _ellipses(cy: np.ndarray, cx: np.ndarray, ry: np.ndarray, rx: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(N, height, width)`` bool masks of axis-aligned ellipses (centres/radii in pixels, one per row)."""
    yy = np.arange(height, dtype=np.float32)[None, :, None]
    xx = np.arange(width, dtype=np.float32)[None, None, :]
    dy = (yy - cy[:, None, None]) / ry[:, None, None]
    dx = (xx - cx[:, None, None]) / rx[:, None, None]
    return dy * dy + dx * dx <= 1.0


def make_scene(rng: np.random.Generator, num_gt: int = 5, height: int = HEIGHT, width: int = WIDTH
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One synthetic image: ``(pred, gt)`` instance dicts (ARCHITECTURE.md "Instances of one image").

    Returns:
        ``pred = {"masks": (num_gt + 1, H, W) bool, "labels": int64, "scores": float32}`` and
        ``gt = {"masks": (num_gt, H, W) bool, "labels": int64}``.
    """
    cy = rng.uniform(0.15, 0.85, num_gt).astype(np.float32) * height
    cx = rng.uniform(0.15, 0.85, num_gt).astype(np.float32) * width
    ry = rng.uniform(10, 80, num_gt).astype(np.float32)
    rx = rng.uniform(10, 80, num_gt).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, num_gt)
    gt = {"masks": _ellipses(cy, cx, ry, rx, height, width), "labels": labels.astype(np.int64)}
    # jittered copies of the GT + one false positive
    shift = rng.uniform(-6, 6, (2, num_gt)).astype(np.float32)
    scale = rng.uniform(0.85, 1.15, (2, num_gt)).astype(np.float32)
    fp = [rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width, rng.uniform(10, 80), rng.uniform(10, 80)]
    p_cy = np.append(cy + shift[0], fp[0]).astype(np.float32)
    p_cx = np.append(cx + shift[1], fp[1]).astype(np.float32)
    p_ry = np.append(ry * scale[0], fp[2]).astype(np.float32)
    p_rx = np.append(rx * scale[1], fp[3]).astype(np.float32)
    pred = {
        "masks": _ellipses(p_cy, p_cx, p_ry, p_rx, height, width),
        "labels": np.append(labels, rng.integers(0, NUM_CLASSES)).astype(np.int64),
        "scores": np.append(rng.uniform(0.3, 1.0, num_gt), rng.uniform(0.0, 0.5)).astype(np.float32),
    }
    return pred, gt


def run(num_images: int = 1449, repeats: int = 3, pool: int = 64, warmup: int = 1) -> dict[str, Any]:
    """Time the streaming VOC evaluation of ``num_images`` images (median of ``repeats`` after ``warmup``).

    Args:
        num_images: images per evaluation (1449 = VOC 2012 val).
        repeats: timed evaluations; ``warmup``: untimed ones before them.
        pool: distinct synthetic images, cycled.

    Returns:
        ``{"total_s": median seconds per evaluation, "min_s", "ms_per_image", "timing": time_calls dict,
        "images", "instances_per_image", "predictions_per_image", "image_size", "mAP50", "mAP75",
        "target_s", "target_s_scaled" (the target scaled to ``num_images``), "build_s"}``.
    """
    from bestie.evaluation import VOCInstanceEvaluator

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    scenes = [make_scene(rng) for _ in range(min(pool, num_images))]
    build_s = time.perf_counter() - t0
    result: dict[str, Any] = {}

    def once() -> None:
        ev = VOCInstanceEvaluator(NUM_CLASSES)
        for i in range(num_images):
            pred, gt = scenes[i % len(scenes)]
            ev.update(pred, gt)
        result.update(ev.evaluate())

    timing = time_calls(once, repeats, warmup)
    return {
        "total_s": timing["median_s"],
        "min_s": timing["min_s"],
        "ms_per_image": round(1e3 * timing["median_s"] / num_images, 3),
        "timing": timing,
        "images": num_images,
        "image_size": [HEIGHT, WIDTH],
        "instances_per_image": int(scenes[0][1]["labels"].size),
        "predictions_per_image": int(scenes[0][0]["labels"].size),
        "mAP50": result.get("mAP50"),
        "mAP75": result.get("mAP75"),
        "target_s": TARGET_S,
        "target_s_scaled": round(TARGET_S * num_images / 1449, 3),
        "build_s": round(build_s, 3),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1449)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    print(json.dumps(run(args.images, args.repeats), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
