"""BESTIE on a CUDA GPU: training-step time (fp32 vs AMP) and inference images/s.

Run on a machine with an NVIDIA GPU (one prepared run, under 10 minutes with the defaults)::

    python -m benchmarks.gpu_bench --out benchmarks/results/gpu_bench.json

Without CUDA it exits with status 2 and a message saying so (``--allow-cpu`` runs the same code on the
CPU, for checking the script with tiny settings only).

What is measured (METHOD.md section 4 settings; synthetic inputs, deterministic):

- **training step** of :class:`bestie.models.instance.BestieNet` (``--backbone hrnet_w48``, light heads,
  random weights: ``weights=None`` does not change the time) at crop ``--crop`` 416, batch ``--batch`` 16,
  C = 20: :func:`bestie.stages.train_bestie.train_step` (forward, online self-refinement of the targets,
  BESTIE loss) + backward + Adam step, exactly as the training loop, with fp32 and with AMP
  (:func:`bestie.engine.autocast_context`: bf16 where supported, else fp16 with a GradScaler). The batch
  is made once on the CPU (pseudo labels of a 5-component scene, :func:`bestie.targets.make_pseudo_instance_labels`)
  and copied to the GPU each step as the DataLoader's pinned batches would be. Figures: median seconds per
  step over ``--iters`` steps after ``--warmup`` steps (``torch.cuda.synchronize`` around each), images/s
  (= batch / step time), peak GPU memory (``torch.cuda.max_memory_allocated``);
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

__all__ = ["make_batch", "bench_train", "bench_infer", "main"]

NUM_CLASSES = 20
NO_CUDA_EXIT = 2


def make_batch(batch: int, crop: int, num_classes: int = NUM_CLASSES, max_points: int = 50) -> dict[str, Any]:
    """A collated training batch as :class:`bestie.instance_data.BestieTrainDataset` gives it (CPU tensors).

    Sample ``i`` is the 5-component scene of :mod:`benchmarks.bench_core` (scaled to ``crop x crop`` px), flipped
    horizontally for odd ``i``; images are normalised noise. Shapes: ``image (B, 3, S, S)`` float32,
    ``semantic (B, S, S)`` int64, ``center (B, C, S, S)``, ``offset (B, 2, S, S)``, ``weight (B, S, S)``
    float32, ``labels (B, C)`` float32 multi-hot, ``points (B, P, 4)`` float32, ``num_points (B,)`` int64.
    """
    import numpy as np
    import torch

    from benchmarks.bench_core import scene
    from bestie.targets import make_pseudo_instance_labels

    import cv2

    wsss, labels, pts = scene(416, 416)  # the scene is laid out for 416 px: rescale it to the crop
    if crop != 416:
        wsss = cv2.resize(wsss, (crop, crop), interpolation=cv2.INTER_NEAREST)
        pts[:, :2] *= crop / 416
    samples = []
    for flip in (False, True):
        w = wsss[:, ::-1].copy() if flip else wsss
        p = pts.copy()
        if flip:
            p[:, 0] = crop - 1 - p[:, 0]
        t = make_pseudo_instance_labels(w, labels, p, num_classes=num_classes)
        samples.append((w, p, t))
    gen = torch.Generator().manual_seed(0)
    out: dict[str, list] = {k: [] for k in ("semantic", "center", "offset", "weight", "labels", "points", "num_points")}
    for i in range(batch):
        w, p, t = samples[i % 2]
        out["semantic"].append(torch.from_numpy(w.astype(np.int64)))
        for k in ("center", "offset", "weight"):
            out[k].append(torch.from_numpy(np.ascontiguousarray(t[k], dtype=np.float32)))
        mh = torch.zeros(num_classes)
        mh[list(labels)] = 1.0
        out["labels"].append(mh)
        padded = torch.zeros(max_points, 4)
        padded[: len(p)] = torch.from_numpy(p)
        out["points"].append(padded)
        out["num_points"].append(torch.tensor(len(p)))
    res = {k: torch.stack(v) for k, v in out.items()}
    res["image"] = torch.randn((batch, 3, crop, crop), generator=gen)
    return res


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mem_gb(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def bench_train(backbone: str, batch: int, crop: int, amp: bool, iters: int, warmup: int, device) -> dict[str, Any]:
    """Seconds per BESTIE training step (module docstring); returns ``{"step_median_s", "step_min_s",
    "images_per_s", "peak_mem_gb", "amp_dtype", "refined", "loss"}``."""
    import torch

    from bestie import engine
    from bestie.models.instance import BestieNet
    from bestie.stages.train_bestie import BestieConfig, _make_loss, train_step

    torch.manual_seed(0)
    cfg = BestieConfig(backbone=backbone, weights=None, batch_size=batch, crop_size=crop, amp=amp)
    model = BestieNet(backbone, NUM_CLASSES, None, cfg.head, head_channels=cfg.head_channels,
                      fusion_channels=cfg.fusion_channels, hrnet_fusion=cfg.hrnet_fusion, bn_momentum=cfg.bn_momentum,
                      warn_random=False).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    use_amp = amp and device.type == "cuda"
    scaler = engine.create_grad_scaler(device, use_amp)
    loss_fn = _make_loss(cfg).to(device)
    cpu_batch = make_batch(batch, crop)
    if device.type == "cuda":
        cpu_batch = {k: v.pin_memory() for k, v in cpu_batch.items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, last = [], {}
    for it in range(warmup + iters):
        _sync(device)
        t0 = time.perf_counter()
        losses = train_step(model, cpu_batch, loss_fn, cfg, it, device, amp=use_amp)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["total"]).backward()
        scaler.step(optimizer)
        scaler.update()
        _sync(device)
        if it >= warmup:
            times.append(time.perf_counter() - t0)
        last = losses
    med = statistics.median(times)
    return {
        "step_median_s": round(med, 4),
        "step_min_s": round(min(times), 4),
        "images_per_s": round(batch / med, 2),
        "peak_mem_gb": _peak_mem_gb(device),
        "amp_dtype": str(engine.amp_dtype(device)) if use_amp else None,
        "refined": float(last["refined"]),
        "loss": float(last["total"]),
        "iters": iters,
        "warmup": warmup,
    }


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="hrnet_w48")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--crop", type=int, default=416)
    ap.add_argument("--iters", type=int, default=20, help="timed training steps per mode")
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
    jobs = [("train", "fp32", lambda: bench_train(args.backbone, args.batch, args.crop, False, args.iters,
                                                   args.warmup, device)),
            ("train", "amp", lambda: bench_train(args.backbone, args.batch, args.crop, True, args.iters,
                                                  args.warmup, device)),
            ("infer", "fp32", lambda: bench_infer(args.backbone, False, args.infer_images, device)),
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
    tr = doc["train"]
    if "step_median_s" in tr.get("fp32", {}) and "step_median_s" in tr.get("amp", {}):
        doc["train"]["amp_speedup"] = round(tr["fp32"]["step_median_s"] / tr["amp"]["step_median_s"], 2)
    doc["seconds"] = round(time.perf_counter() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(doc, indent=2))
    failed = [f"{k}/{m}" for k in ("train", "infer") for m, r in doc[k].items() if isinstance(r, dict) and "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
