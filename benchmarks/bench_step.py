"""Per-phase breakdown of one BESTIE training iteration and the network-only floor (issue 16).

Usage: ``python -m benchmarks.bench_step [--quick] [--out FILE] [--device cpu|cuda]``; prints one JSON object.
On the CPU everything runs on one thread (``torch.set_num_threads(1)``, one OpenCV thread).

What is measured, on one fixed batch of :class:`bestie.instance_data.BestieTrainDataset` samples (a synthetic
VOC-like dataset of the 5-component scene of :mod:`benchmarks.bench_core`, random images, random
augmentation, ``--batch`` 8 x ``--crop`` 416, C = 20, the default ``tf_efficientnet_lite0`` network with
light heads and random weights: the time does not depend on the weights):

- ``data``: the DataLoader's work for one batch in this process (``batch`` x ``dataset[key]`` + collate);
  reported, not counted in the step (workers prepare it in parallel when ``num_workers > 0``);
- the step's phases, each timed alone with a device sync around it (CUDA events on a GPU, wall and
  process CPU time on the CPU): ``target_render`` (the pseudo targets on the device), ``forward``,
  ``refinement`` (:func:`bestie.refine.refine_targets`), ``loss`` (:class:`bestie.losses.BestieLoss` and the
  step's diagnostics), ``backward``, ``optimizer`` (Adam + scheduler);
- ``step``: the whole training step as the training loop runs it (:func:`bestie.stages.train_bestie.train_step`
  + :meth:`bestie.trainer.Optimization.step`), timed as one;
- ``floor``: the network alone, forward + backward (fixed dense output gradients, no loss) on the same batch.

The headline is ``overhead_ratio = (step - floor) / floor`` (CPU time on the CPU, GPU time on CUDA), the
share of an iteration spent outside the network; both terms come from the same run.

"Trained-like" heads: a random network finds no centre, so refinement would do no work. The network is
wrapped so that its centre and offset outputs are ``0.001 x`` its own plus the batch's pseudo targets with
noise (centre + U(0, 0.05), offset + N(0, 1)), as :mod:`benchmarks.bench_core` plants them: refinement
groups every component, and the gradients still flow through the whole network.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import emit_json  # noqa: E402
from benchmarks.bench_core import NUM_CLASSES, scene  # noqa: E402

__all__ = ["SceneDataset", "PlantedHeads", "run", "main"]

PHASES = ("target_render", "forward", "refinement", "loss", "backward", "optimizer")


class SceneDataset:
    """A VOC-like dataset of ``n`` images holding the 5-component scene (``bestie.data`` interface).

    ``image(id)`` is ``(S, S, 3)`` uint8 noise (seeded by the index), ``labels(id)`` the scene's classes;
    :meth:`write_stores` writes the WSSS maps and peak points as the stages 2 / 3 HDF5 stores.
    """

    def __init__(self, n: int, size: int = 416) -> None:
        self.ids = [f"img{i:03d}" for i in range(n)]
        self.num_classes = NUM_CLASSES
        self.class_names = [f"class{c}" for c in range(NUM_CLASSES)]
        self.size = size
        self.wsss, self._labels, self.points = scene(416, 416)  # laid out for 416 px: rescaled to ``size``
        if size != 416:
            import cv2

            self.wsss = cv2.resize(self.wsss, (size, size), interpolation=cv2.INTER_NEAREST)
            self.points[:, :2] *= size / 416

    def image(self, img_id: str) -> np.ndarray:
        rng = np.random.default_rng(self.ids.index(img_id))
        return rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)

    def labels(self, img_id: str) -> list[int]:
        return list(self._labels)

    def instances_gt(self, img_id: str) -> None:
        return None

    def write_stores(self, folder: Path) -> tuple[Path, Path]:
        """``(wsss.h5, points.h5)`` in ``folder`` (one entry per id)."""
        from bestie.io.h5store import H5Writer

        wsss_p, pts_p = folder / "wsss.h5", folder / "points.h5"
        with H5Writer(wsss_p) as w:
            for i in self.ids:
                w.write(i, wsss=self.wsss)
        with H5Writer(pts_p) as w:
            for i in self.ids:
                w.write(i, points=self.points)
        return wsss_p, pts_p


class PlantedHeads(torch.nn.Module):
    """``model`` whose centre / offset outputs are ``0.001 x`` its own plus fixed planted maps (module
    docstring); ``center`` ``(B, C, S, S)``, ``offset`` ``(B, 2, S, S)`` float32 on the model's device."""

    def __init__(self, model: torch.nn.Module, center: torch.Tensor, offset: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("planted_center", center)
        self.register_buffer("planted_offset", offset)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = dict(self.model(images))
        out["center"] = out["center"] * 1e-3 + self.planted_center.to(out["center"].dtype)
        out["offset"] = out["offset"] * 1e-3 + self.planted_offset.to(out["offset"].dtype)
        return out


class _Timer:
    """Wall / CPU seconds (CPU) or CUDA-event seconds (GPU) of calls, per name."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}

    def __call__(self, name: str, fn: Callable[[], Any], record: bool = True) -> Any:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        c0, t0 = time.process_time(), time.perf_counter()
        res = fn()
        if cuda:
            end.record()
            torch.cuda.synchronize(self.device)
        t1, c1 = time.perf_counter(), time.process_time()
        if record:
            self.wall.setdefault(name, []).append(start.elapsed_time(end) / 1e3 if cuda else t1 - t0)
            self.cpu.setdefault(name, []).append(c1 - c0)
        return res

    def medians(self) -> dict[str, dict[str, float]]:
        return {k: {"median_s": round(statistics.median(v), 5), "min_s": round(min(v), 5),
                    "cpu_median_s": round(statistics.median(self.cpu[k]), 5), "n": len(v)}
                for k, v in self.wall.items()}


def _setup(batch: int, crop: int, backbone: str, device: torch.device, tmp: Path, amp: bool = False,
           channels_last: bool = False) -> dict[str, Any]:
    """Dataset, loader collate, planted network, loss, optimisation of the benchmark."""
    from bestie import engine, trainer
    from bestie.instance_data import BestieTrainDataset
    from bestie.models.instance import BestieNet
    from bestie.stages.train_bestie import BestieConfig, _make_loss

    torch.manual_seed(0)
    cfg = BestieConfig(backbone=backbone, weights=None, batch_size=batch, crop_size=crop, refine_iter=0,
                       amp=amp)
    ds = SceneDataset(4 * batch, size=crop)
    wsss_p, pts_p = ds.write_stores(tmp)
    train_ds = BestieTrainDataset(ds, wsss_p, pts_p, pseudo=cfg.pseudo_label_params(), crop_size=crop,
                                  resize=None, seed=cfg.seed)
    from bestie import instance_data

    collate = getattr(instance_data, "collate_compact", torch.utils.data.default_collate)
    net = BestieNet(backbone, NUM_CLASSES, None, cfg.head, head_channels=cfg.head_channels,
                    fusion_channels=cfg.fusion_channels, hrnet_fusion=cfg.hrnet_fusion, bn_momentum=cfg.bn_momentum,
                    warn_random=False).to(device).train()
    fixed = collate([train_ds[(i, 0)] for i in range(batch)])
    if device.type == "cuda":  # as the training loader gives it (pin_memory)
        fixed = {k: v.pin_memory() for k, v in fixed.items()}
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    center, offset = _dense_targets(fixed, cfg, device)
    gen = torch.Generator().manual_seed(0)
    center = center + torch.rand(center.shape, generator=gen).to(device) * 0.05
    offset = offset + torch.randn(offset.shape, generator=gen).to(device)
    model = PlantedHeads(net, center, offset).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    use_amp = amp and device.type == "cuda"
    optimization = trainer.Optimization(opt, engine.WarmupPolyLR(opt, cfg.warmup_iters, cfg.max_iters,
                                                                 cfg.poly_power), engine.create_grad_scaler(device, use_amp))
    return {"cfg": cfg, "train_ds": train_ds, "collate": collate, "model": model, "batch": fixed,
            "loss_fn": _make_loss(cfg).to(device), "optimization": optimization, "amp": use_amp}


def _dense_targets(batch: dict[str, Any], cfg: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's pseudo centre ``(B, C, S, S)`` and offset ``(B, 2, S, S)`` targets on ``device``."""
    from bestie.stages import train_bestie as tb

    if hasattr(tb, "pseudo_targets"):
        t = tb.pseudo_targets(batch, cfg, device)
        return t["center"], t["offset"]
    return batch["center"].to(device), batch["offset"].to(device)


def _phases(s: dict[str, Any], timer: _Timer, it: int, device: torch.device) -> None:
    """One training step, phase by phase (the pieces of ``train_step`` + ``Optimization.step``)."""
    import inspect

    from bestie.stages import train_bestie as tb

    if "timer" not in inspect.signature(tb.train_step).parameters:
        _phases_before(s, timer, it, device)
        return
    losses = tb.train_step(s["model"], s["batch"], s["loss_fn"], s["cfg"], it, device, amp=s["amp"], timer=timer)
    _backward_optimizer(s, timer, losses)


def _backward_optimizer(s: dict[str, Any], timer: _Timer, losses: dict[str, torch.Tensor]) -> None:
    """The two halves of :meth:`bestie.trainer.Optimization.step`, timed apart."""
    opt = s["optimization"]

    def backward():
        opt.optimizer.zero_grad(set_to_none=True)
        opt.scaler.scale(losses["total"]).backward()

    timer("backward", backward)

    def optimizer():
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        opt.scheduler.step()

    timer("optimizer", optimizer)


def _phases_before(s: dict[str, Any], timer: _Timer, it: int, device: torch.device) -> None:
    """The phases of the training step as ``train_step`` ran them before issue 16 (dense targets copied)."""
    from bestie.refine import refine_targets

    cfg, batch, model, loss_fn = s["cfg"], s["batch"], s["model"], s["loss_fn"]

    def render():
        images = batch["image"].to(device, non_blocking=True)
        semantic = batch["semantic"].to(device, non_blocking=True)
        pseudo = {k: batch[k].to(device, non_blocking=True) for k in ("center", "offset", "weight")}
        return images, semantic, pseudo

    images, semantic, pseudo = timer("target_render", render)
    out = timer("forward", lambda: {k: v.float() for k, v in model(images).items()})

    def refine():
        labels = [torch.nonzero(row > 0.5).flatten().tolist() for row in batch["labels"]]
        points = [batch["points"][i, : int(n)].to(device) for i, n in enumerate(batch["num_points"])]
        with torch.no_grad():
            return refine_targets(out["seg"].detach(), out["center"].detach(), out["offset"].detach(), semantic,
                                  labels, points, pseudo=cfg.pseudo_label_params(), refine=cfg.refine_params())

    refined = timer("refinement", refine)

    def loss():
        losses = dict(loss_fn(out, pseudo, refined, semantic))
        losses["refined"] = torch.tensor(1.0, device=device)
        losses["refined_pixel_share"] = (refined["weight"] > 0).float().mean()
        return losses

    losses = timer("loss", loss)
    _backward_optimizer(s, timer, losses)


def _floor(s: dict[str, Any], device: torch.device) -> None:
    """Forward + backward of the network alone on the batch: the outputs are back-propagated with fixed dense
    gradients made once (no loss at all; a ``mean()`` would feed the heads broadcast gradients)."""
    model, opt = s["model"], s["optimization"].optimizer
    images = s["batch"]["image"].to(device)
    opt.zero_grad(set_to_none=True)
    from bestie import engine

    with engine.autocast_context(device, s["amp"]):
        out = model(images)
    if "floor_grads" not in s:
        gen = torch.Generator().manual_seed(1)
        s["floor_grads"] = {k: (torch.randn(v.shape, generator=gen) * 1e-6).to(device, v.dtype)
                            for k, v in out.items()}
    keys = sorted(out)
    torch.autograd.backward([out[k] for k in keys], [s["floor_grads"][k] for k in keys])


def _step(s: dict[str, Any], it: int, device: torch.device) -> None:
    from bestie.stages.train_bestie import train_step

    losses = train_step(s["model"], s["batch"], s["loss_fn"], s["cfg"], it, device, amp=s["amp"])
    s["optimization"].step(losses["total"])


def run(batch: int = 8, crop: int = 416, iters: int = 5, warmup: int = 1, backbone: str = "tf_efficientnet_lite0",
        device: str = "cpu", amp: bool = False, channels_last: bool = False) -> dict[str, Any]:
    """The breakdown (module docstring); returns the JSON-serialisable result.

    Args:
        batch, crop: batch size and square crop side (pixels).
        iters, warmup: timed and untimed repetitions of each measurement (interleaved: phases, step, floor).
        backbone: the encoder (random weights).
        device: ``"cpu"`` (one thread) or ``"cuda"``.
        amp: bf16 autocast (CUDA only, as training's ``bestie.amp``); channels_last: the network in that
            memory format.

    Returns:
        ``{"config", "data", "phases": {name: {"median_s", "min_s", "cpu_median_s", "n"}}, "step", "floor",
        "phase_sum_s", "overhead_s", "overhead_ratio", "overhead_ratio_wall", "refined_pixels"}``.
    """
    import cv2

    dev = torch.device(device)
    if dev.type == "cpu":
        torch.set_num_threads(1)
        cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        s = _setup(batch, crop, backbone, dev, Path(tmp), amp, channels_last)
        timer = _Timer(dev)
        keys = [(i % len(s["train_ds"]), 1 + i // len(s["train_ds"])) for i in range(batch * (iters + warmup))]
        for r in range(warmup + iters):
            rec = r >= warmup
            chunk = keys[r * batch : (r + 1) * batch]
            timer("data", lambda: s["collate"]([s["train_ds"][k] for k in chunk]), rec)
            _phases(s, timer if rec else _Timer(dev), r, dev)
            timer("step", lambda: _step(s, r, dev), rec)
            timer("floor", lambda: _floor(s, dev), rec)
        refined = _refined_pixels(s, dev)
        syncs = _count_syncs(s, dev) if dev.type == "cuda" else None
    med = timer.medians()
    key = "cpu_median_s" if dev.type == "cpu" else "median_s"
    step, floor = med["step"][key], med["floor"][key]
    return {
        "config": {"batch": batch, "crop": crop, "backbone": backbone, "num_classes": NUM_CLASSES, "iters": iters,
                   "warmup": warmup, "device": str(dev), "threads": torch.get_num_threads(), "time": key,
                   "amp": s["amp"], "channels_last": channels_last,
                   "tf32": bool(torch.backends.cuda.matmul.allow_tf32) if dev.type == "cuda" else None},
        "data": med["data"],
        "phases": {k: med[k] for k in PHASES if k in med},
        "step": med["step"],
        "floor": med["floor"],
        "phase_sum_s": round(sum(med[k][key] for k in PHASES if k in med), 5),
        "overhead_s": round(step - floor, 5),
        "overhead_ratio": round((step - floor) / floor, 4),
        "overhead_ratio_wall": round((med["step"]["median_s"] - med["floor"]["median_s"]) / med["floor"]["median_s"], 4),
        "refined_pixels": refined,
        "syncs_per_step": syncs,
    }


def _count_syncs(s: dict[str, Any], dev: torch.device) -> dict[str, Any]:
    """Host-device synchronisations of one training step (``train_step`` + ``Optimization.step``), as
    ``torch.cuda.set_sync_debug_mode("warn")`` reports them: ``{"count", "first": [messages]}``."""
    import warnings

    torch.cuda.synchronize(dev)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _step(s, 10_000, dev)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(dev)
    msgs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
    return {"count": len(msgs), "first": msgs[:5]}


def _refined_pixels(s: dict[str, Any], dev: torch.device) -> int:
    """Pixels with a refined target in the benchmark batch (shows that refinement did work)."""
    from bestie.stages.train_bestie import train_step

    with torch.no_grad():
        losses = train_step(s["model"], s["batch"], s["loss_fn"], s["cfg"], 0, dev, amp=s["amp"])
    b, _, h, w = s["batch"]["image"].shape
    return int(round(float(losses["refined_pixel_share"]) * b * h * w))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=416)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--quick", action="store_true", help="batch 2 x 128 px, 1 timed iteration: a smoke run")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.crop, args.iters, args.warmup = 2, 128, 1, 1
    res = run(args.batch, args.crop, args.iters, args.warmup, args.backbone, args.device, args.amp, args.channels_last)
    emit_json(res, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
