"""CPU forward time and size of the backbones with installable ImageNet weights, side by side.

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.bench_backbones --out benchmarks/results/backbones.json \
        [--repeats 30] [--size 320] [--backbones tf_efficientnet_lite0 tf_efficientnet_lite2]

For each backbone (default: every one of :data:`bestie.models.weights.IMAGENET_PACKAGES`, i.e.
EfficientNet-Lite0 and -Lite2) it builds the pipeline's feature extractor with its ImageNet weights
(:func:`bestie.models.backbones.create_backbone`, all five feature levels, native stride 32) and times
one forward pass of one ``size x size`` RGB image (``torch.no_grad``, eval mode, one torch thread). The
backbones are timed in turns within each repeat (Lite0, Lite2, Lite0, Lite2, ...) after one untimed
warm-up call each, so that a change of machine load during the run hits both alike; the ratio of the
medians is the headline figure. CPU time (``time.process_time``) is the load-independent figure on a
shared machine; wall time also counts waits for a core.

Output JSON (also printed)::

    {"schema": 1, "benchmark": "backbones", "machine": benchmarks.machine_info(), "input": [1, 3, S, S],
     "repeats": N, "torch_threads": 1,
     "backbones": {name: {"params": int (feature extractor), "params_imagenet_model": int (timm's full
                          classifier, 1000-class head included), "channels": [...], "reductions": [...],
                          "wall_median_ms", "wall_min_ms", "cpu_median_ms", "cpu_min_ms", "runs_ms": [...]}},
     "ratio_to_first": {name: {"wall_median": float, "cpu_median": float}}}

``ratio_to_first`` divides each backbone's median by the first one's (Lite0 by default).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import emit_json, machine_info  # noqa: E402
from bestie.models.backbones import create_backbone  # noqa: E402
from bestie.models.weights import IMAGENET_PACKAGES  # noqa: E402


#: input side (pixels) and timed passes per backbone of a default run
SIZE = 320
REPEATS = 30


def _ms(values: list[float]) -> dict[str, Any]:
    return {"median_ms": round(statistics.median(values) * 1e3, 3), "min_ms": round(min(values) * 1e3, 3)}


def run(backbones: Sequence[str] = tuple(IMAGENET_PACKAGES), size: int = SIZE, repeats: int = REPEATS,
        seed: int = 0) -> dict[str, Any]:
    """Time one forward pass of each backbone on a ``(1, 3, size, size)`` input, interleaved.

    Args:
        backbones: names of :data:`~bestie.models.weights.IMAGENET_PACKAGES` (ImageNet weights loaded from
            their packages); the first is the reference of ``ratio_to_first``.
        size: input height = width, pixels.
        repeats: timed forward passes per backbone (after one warm-up each).
        seed: seed of the random input image (values in ``[-1, 1]``, as the 0.5/0.5 normalisation gives).

    Returns:
        The JSON document of the module docstring (times in milliseconds, parameter counts as ints).

    Raises:
        ValueError: ``size < 32``, ``repeats < 1`` or no backbone.
        WeightsError / ConfigError: a backbone without installed ImageNet weights or an unknown name.
    """
    if size < 32 or repeats < 1 or not backbones:
        raise ValueError(f"need size >= 32, repeats >= 1 and a backbone; got {size}, {repeats}, {backbones}")
    import timm

    torch.set_num_threads(1)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    models = {name: create_backbone(name, "imagenet").eval() for name in backbones}
    wall: dict[str, list[float]] = {name: [] for name in backbones}
    cpu: dict[str, list[float]] = {name: [] for name in backbones}
    with torch.no_grad():
        for model in models.values():
            model(x)
        for _ in range(repeats):
            for name, model in models.items():
                c0, t0 = time.process_time(), time.perf_counter()
                model(x)
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    out: dict[str, Any] = {}
    for name, model in models.items():
        w, c = _ms(wall[name]), _ms(cpu[name])
        out[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "params_imagenet_model": sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters()),
            "channels": model.feature_info.channels(), "reductions": model.feature_info.reduction(),
            "wall_median_ms": w["median_ms"], "wall_min_ms": w["min_ms"],
            "cpu_median_ms": c["median_ms"], "cpu_min_ms": c["min_ms"],
            "runs_ms": [round(v * 1e3, 3) for v in wall[name]],
        }
    first = out[backbones[0]]
    ratios = {name: {"wall_median": round(r["wall_median_ms"] / first["wall_median_ms"], 3),
                     "cpu_median": round(r["cpu_median_ms"] / first["cpu_median_ms"], 3)} for name, r in out.items()}
    return {"schema": 1, "benchmark": "backbones", "machine": machine_info(), "input": [1, 3, size, size],
            "repeats": repeats, "torch_threads": torch.get_num_threads(), "backbones": out, "ratio_to_first": ratios}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run :func:`run`, print its JSON and write it to ``--out`` (folders created)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="JSON file to write (default: print only)")
    ap.add_argument("--backbones", nargs="+", default=list(IMAGENET_PACKAGES))
    ap.add_argument("--size", type=int, default=SIZE)
    ap.add_argument("--repeats", type=int, default=REPEATS)
    args = ap.parse_args(argv)
    doc = run(args.backbones, size=args.size, repeats=args.repeats)
    emit_json(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
