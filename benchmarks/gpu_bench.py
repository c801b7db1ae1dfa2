"""BESTIE on a CUDA GPU: training-step time (fp32 vs AMP) and inference images/s.

Run on a machine with an NVIDIA GPU (one prepared run, under 10 minutes with the defaults)::

    python -m benchmarks.gpu_bench --out benchmarks/results/gpu_bench.json

Without CUDA it exits with status 2 and a message saying so (``--allow-cpu`` runs the same code on the
CPU, for checking the script with tiny settings only).

What is measured (METHOD.md section 4 settings; synthetic inputs, deterministic):

- **training step** of :class:`bestie.models.instance.BestieNet` (``--backbone hrnet_w48``, light heads,
  random weights: the time does not depend on them) at crop ``--crop`` 416, batch ``--batch`` 16, C = 20,
  by :func:`benchmarks.bench_step.run` on the GPU: a batch of :class:`bestie.instance_data.BestieTrainDataset`
  samples in the loader's compact form (pinned), heads with centres planted in their outputs so that
  self-refinement groups every component ("trained-like"), and per phase CUDA-event times (data on the
  host; target render, forward, refinement, loss, backward, optimizer on the GPU), the whole step as the
  training loop runs it, the network-only floor (forward + backward with fixed output gradients),
  ``step_over_floor`` and the host syncs of one step (``torch.cuda.set_sync_debug_mode``). Variants
  (:data:`TRAIN_VARIANTS`): fp32 with TF32 off and on, bf16 AMP, bf16 AMP with ``channels_last``; the JSON
  names the fastest and AMP's speed-up over fp32. Peak GPU memory per variant;
- **inference** of one 375x500 image with flip TTA at its own size rounded up to /32, as
  :func:`bestie.stages.predict_instances.predict_image` does it: ``predict_maps`` (network + softmax +
  flip averaging) then the grouping by :func:`bestie.postprocess.get_instances` (masks to the CPU), fp32
  and under autocast: images/s over ``--infer-images`` images after 3 warm-up images, with the network
  and grouping shares (mean ms, synchronised between the two). With random weights the number of
  centers found (``instances_found``) is not a trained model's, so the grouping share is indicative
  only; the grouping of a 5-instance image is timed on the CPU by :mod:`benchmarks.bench_core`.

The JSON written to ``--out`` holds the device name, torch / CUDA / cuDNN versions, the TF32 settings, the
arguments and one entry per measurement (an ``"error"`` entry, e.g. out of memory, does not stop the
others). ``--max-seconds`` (default 540) skips the remaining measurements once exceeded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["train_phases", "bench_infer", "main", "TRAIN_VARIANTS"]

NUM_CLASSES = 20
NO_CUDA_EXIT = 2


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mem_gb(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def bench_infer(backbone: str, amp: bool, images: int, device, height: int = 375, width: int = 500) -> dict[str, Any]:
    """Images/s of :func:`bestie.stages.predict_instances.predict_image` (flip TTA) on ``height x width``."""
    import numpy as np
    import torch

    from bestie import engine
    from bestie.models.instance import BestieNet
    from bestie.inference import _instances_from_maps, predict_maps
    from bestie.sections import InferenceConfig

    torch.manual_seed(0)
    model = BestieNet(backbone, NUM_CLASSES, None, "light", warn_random=False).to(device).eval()
    cfg = InferenceConfig()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mean, std = model.mean, model.std
    use_amp = amp and device.type == "cuda"

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    net_t, group_t = [], []
    with engine.autocast_context(device, use_amp):
        for i in range(3 + images):  # 3 warm-up images
            _sync(device)
            t0 = time.perf_counter()
            maps = predict_maps(model, image, mean, std, cfg, device)
            _sync(device)
            t1 = time.perf_counter()
            inst = _instances_from_maps(maps, cfg)  # what predict_image does after predict_maps
            t2 = time.perf_counter()
            if i >= 3:
                net_t.append(t1 - t0)
                group_t.append(t2 - t1)
    net, group = statistics.mean(net_t), statistics.mean(group_t)
    full = net + group
    return {
        "images_per_s": round(1.0 / full, 2),
        "ms_per_image": round(1e3 * full, 2),
        "network_ms_per_image": round(1e3 * net, 2),
        "grouping_ms_per_image": round(1e3 * (full - net), 2),
        "peak_mem_gb": _peak_mem_gb(device),
        "image_size": [height, width],
        "flip": cfg.flip,
        "images": images,
        "instances_found": int(len(inst["labels"])),
    }


def _env(device) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                            "device": str(device),
                            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
                            "cudnn_benchmark": torch.backends.cudnn.benchmark}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
    return info


#: the training-step variants measured: (name, keywords of :func:`train_phases`)
TRAIN_VARIANTS = [("fp32", {"amp": False, "tf32": False}), ("fp32_tf32", {"amp": False, "tf32": True}),
                  ("amp", {"amp": True, "tf32": False}),
                  ("amp_channels_last", {"amp": True, "tf32": False, "channels_last": True})]


def train_phases(args: argparse.Namespace, device, amp: bool, tf32: bool, channels_last: bool = False) -> dict:
    """:func:`benchmarks.bench_step.run` on ``device`` (per-phase CUDA-event times, the network-only floor,
    ``overhead_ratio``, host syncs per step) with TF32 matmuls / convolutions on or off; the step's
    ``step_median_s`` / ``images_per_s`` / ``step_over_floor`` added."""
    import torch

    from benchmarks import bench_step

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        res = bench_step.run(args.batch, args.crop, args.iters, args.warmup, args.backbone, device.type, amp,
                             channels_last)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    key = res["config"]["time"]
    res["step_median_s"] = res["step"][key]
    res["images_per_s"] = round(args.batch / res["step"][key], 2)
    res["step_over_floor"] = round(res["step"][key] / res["floor"][key], 3)
    res["peak_mem_gb"] = _peak_mem_gb(device)
    res["tf32"] = tf32
    return res


def _summarise(doc: dict) -> None:
    """AMP's speed-up over fp32 and the fastest variant, from the step times measured so far."""
    tr = doc["train"]
    times = {k: v["step_median_s"] for k, v in tr.items() if isinstance(v, dict) and "step_median_s" in v}
    if "fp32" in times and "amp" in times:
        tr["amp_speedup"] = round(times["fp32"] / times["amp"], 2)
    if times:
        tr["fastest"] = min(times, key=times.get)


# not bestie.io.atomic: importing bestie.io loads pycocotools / h5py, which a bare GPU machine may lack
# and which this script must report, not crash on
def _write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="hrnet_w48")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--crop", type=int, default=416)
    ap.add_argument("--iters", type=int, default=20, help="timed training steps per variant")
    ap.add_argument("--warmup", type=int, default=5, help="untimed training steps first")
    ap.add_argument("--infer-images", type=int, default=30, help="timed inference images per mode")
    ap.add_argument("--max-seconds", type=float, default=540.0, help="skip what is left after this long")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_bench.json"))
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU (checking the script only)")
    args = ap.parse_args(argv)

    import torch

    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cudnn.benchmark = True
    elif args.allow_cpu:
        device = torch.device("cpu")
    else:
        print("gpu_bench: no CUDA device available (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda}). Run it on a machine with an NVIDIA GPU, "
              "or pass --allow-cpu to check the script with tiny settings.", file=sys.stderr)
        return NO_CUDA_EXIT
    t_start = time.perf_counter()
    doc: dict[str, Any] = {"env": _env(device), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                         for k, v in vars(args).items()}, "train": {}, "infer": {}}
    jobs = [("train", name, (lambda kw=kw: train_phases(args, device, **kw))) for name, kw in TRAIN_VARIANTS]
    jobs += [("infer", "fp32", lambda: bench_infer(args.backbone, False, args.infer_images, device)),
             ("infer", "amp", lambda: bench_infer(args.backbone, True, args.infer_images, device))]
    for kind, mode, fn in jobs:
        if time.perf_counter() - t_start > args.max_seconds:
            doc[kind][mode] = {"skipped": f"--max-seconds {args.max_seconds} exceeded"}
            continue
        print(f"gpu_bench: {kind} {mode} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            doc[kind][mode] = fn()
        except Exception as exc:  # noqa: BLE001 - e.g. CUDA out of memory: recorded, the others still run
            doc[kind][mode] = {"error": f"{type(exc).__name__}: {exc}"}
        doc[kind][mode]["seconds"] = round(time.perf_counter() - t0, 1)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _summarise(doc)
        _write(args.out, doc)  # as it goes: a run cut short still leaves what it measured
    doc["seconds"] = round(time.perf_counter() - t_start, 1)
    _write(args.out, doc)
    print(json.dumps(doc, indent=2))
    failed = [f"{k}/{m}" for k in ("train", "infer") for m, r in doc[k].items() if isinstance(r, dict) and "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
