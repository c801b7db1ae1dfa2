"""Throughput (images/s) and peak memory of the CAM, WSSS and evaluation stages on 1x and 4x the images.

Data: a VOC-layout folder in a temporary directory whose ``ImageSets/Segmentation/train.txt`` lists the
ids of ``../shared/data/coco128-voc`` (97 images, 333..640 px) once (1x) or under 4 alias ids each
(4x: ``r0-<id> .. r3-<id>``). Its ``JPEGImages``, ``Annotations``, ``SegmentationClass`` and
``SegmentationObject`` entries are symbolic links to the real files, named by the alias id; nothing is
copied into the repository. With ``max_side`` (quick mode) the images and label maps are first written
as downscaled copies (long side ``max_side`` px, labels by nearest neighbour) into the temporary folder,
and the aliases link to those.

Stages, each run alone in a fresh Python process (``python -m benchmarks.bench_stages --worker``; in
quick mode the three stages of a factor share one process, the peak-RSS mark being reset between them),
with one torch / OpenCV thread and on the CPU:

1. ``cams``: :func:`bestie.stages.make_cams.run` (flip TTA, scale 1.0, stride-4 float16 CAMs, peaks,
   threshold-sweep diagnostics against the GT, no overlays) with a plain (non-PAM) CAM classifier
   checkpoint trained for 2 iterations by :func:`bestie.stages.train_classifier.run` on 4 images at
   ``crop`` px from a random start (a throughput figure: CAM quality does not matter);
2. ``wsss``: :func:`bestie.stages.make_wsss.run` with method ``"crf"`` (dense CRF, 10 iterations, one
   worker) on those CAMs;
3. ``evaluate``: :func:`bestie.stages.score_baseline.run`, the streaming evaluation stage that reads the WSSS
   maps and peak points back from their HDF5 stores, builds the pseudo-label baseline instances and
   scores them with the VOC protocol (the instance-evaluation path every metrics stage shares).

Per stage and factor: ``seconds`` (wall time of the ``run`` call: model load + every image),
``images_per_s``, ``cpu_seconds`` / ``images_per_cpu_s`` (CPU time of the stage process: on a shared,
oversubscribed machine the wall time also counts the waits for a core, the CPU time does not), ``peak_rss_mb`` (high-water resident set of the stage process at its end,
``VmHWM`` of ``/proc/self/status``; see :func:`benchmarks.peak_rss_mb` for why not ``ru_maxrss``), ``setup_rss_mb``
(the peak right before the ``run`` call: interpreter + torch + timm + the stage's imports) and
``growth_mb = peak - setup``. The artifacts are streamed through HDF5 one image at a time, so the 4x
peak must equal the 1x peak up to allocator noise (``rss_ratio_4x_1x``); ``marginal_images_per_s``
(and ``marginal_images_per_cpu_s``) is the steady rate ``(n4 - n1) / (t4 - t1)`` with the fixed
start-up cost removed.

Usage: ``python -m benchmarks.bench_stages [--quick]`` prints the JSON result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks import REPO_ROOT, peak_rss_mb, reset_peak_rss

__all__ = ["DATA_ROOT", "STAGES", "prepare_voc", "make_classifier_checkpoint", "run_worker", "run"]

#: Real VOC-layout data (read-only).
DATA_ROOT = REPO_ROOT.parent / "shared" / "data" / "coco128-voc"
#: Stages in pipeline order (each needs the outputs of the previous ones).
STAGES = ("cams", "wsss", "evaluate")
_LABEL_DIRS = ("SegmentationClass", "SegmentationObject")


def _read_ids(root: Path, split: str) -> list[str]:
    path = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"split list {path} does not exist")
    return [line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _downscaled_copy(src: Path, dst: Path, ids: Sequence[str], max_side: int) -> None:
    """Write ``ids``' images and label maps of ``src`` into ``dst``, long side at most ``max_side`` px.

    Images: :func:`bestie.data.images.load_rgb` (EXIF orientation applied, as the datasets read them),
    area interpolation, JPEG quality 95. Label maps: palette kept, nearest neighbour. XML annotations are
    linked (only their object names are read).
    """
    import cv2
    from PIL import Image

    from bestie.data.images import load_rgb

    for sub in ("JPEGImages", "Annotations", *_LABEL_DIRS):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    for img_id in ids:
        image = load_rgb(src / "JPEGImages" / f"{img_id}.jpg")
        h, w = image.shape[:2]
        s = min(1.0, max_side / max(h, w))
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        small = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA) if s < 1 else image
        cv2.imwrite(str(dst / "JPEGImages" / f"{img_id}.jpg"), cv2.cvtColor(small, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
        xml = src / "Annotations" / f"{img_id}.xml"
        if xml.is_file():
            os.symlink(xml, dst / "Annotations" / f"{img_id}.xml")
        for sub in _LABEL_DIRS:
            png = src / sub / f"{img_id}.png"
            if png.is_file():
                with Image.open(png) as im:
                    im.resize((nw, nh), Image.NEAREST).save(dst / sub / f"{img_id}.png")


def prepare_voc(dst: Path, src: Path, ids: Sequence[str], copies: int, split: str = "train") -> list[str]:
    """Make a VOC-layout folder at ``dst`` whose ``split`` lists every id of ``ids`` under ``copies`` aliases.

    Each entry of ``JPEGImages`` / ``Annotations`` / ``SegmentationClass`` / ``SegmentationObject`` is a
    symbolic link named by the alias id to the file of the source id in ``src``. With ``copies == 1`` the
    ids are kept as they are; otherwise alias ``k`` of id ``i`` is ``f"r{k}-{i}"``.

    Returns:
        The alias ids in list order (``copies * len(ids)``).

    Raises:
        FileNotFoundError: an image of ``ids`` is missing in ``src``.
    """
    dst = Path(dst)
    for sub in ("JPEGImages", "Annotations", *_LABEL_DIRS, "ImageSets/Segmentation"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    out: list[str] = []
    for k in range(copies):
        for img_id in ids:
            alias = img_id if copies == 1 else f"r{k}-{img_id}"
            jpg = src / "JPEGImages" / f"{img_id}.jpg"
            if not jpg.is_file():
                raise FileNotFoundError(f"image {jpg} does not exist")
            os.symlink(jpg.resolve(), dst / "JPEGImages" / f"{alias}.jpg")
            for sub, ext in (("Annotations", ".xml"), *((s, ".png") for s in _LABEL_DIRS)):
                f = src / sub / f"{img_id}{ext}"
                if f.exists():
                    os.symlink(f.resolve(), dst / sub / f"{alias}{ext}")
            out.append(alias)
    (dst / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(out) + "\n", encoding="utf-8")
    return out


def make_classifier_checkpoint(voc_root: Path, out: Path, crop: int, split: str = "ckpt") -> Path:
    """A plain CAM classifier checkpoint from :func:`bestie.stages.train_classifier.run` (2 iterations).

    Trains ``tf_efficientnet_lite0`` from a random start (``weights=None``) for one epoch of batch 2 on
    the ``split`` list of ``voc_root`` (4 images), at ``crop`` px, on the CPU.

    Returns:
        ``out`` (the checkpoint path).
    """
    import logging

    import torch

    from bestie.stages.train_classifier import ClassifierConfig, run as train

    torch.set_num_threads(1)
    cfg = ClassifierConfig(weights=None, use_pam=False, epochs=1, lr_steps=(), batch_size=2, resize=crop,
                           crop_size=crop, photometric=False, checkpoint_every=0, num_workers=0, amp=False)
    level = logging.getLogger("bestie").level
    logging.getLogger("bestie").setLevel(logging.ERROR)  # the random-start warning is expected here
    try:
        train(cfg, {"format": "voc", "root": str(voc_root), "split": split}, out, out.with_suffix(".jsonl"),
              device="cpu")
    finally:
        logging.getLogger("bestie").setLevel(level)
    return out


# ------------------------------------------------------------------------------------------ worker
def _stage_call(stage: str, ds_cfg: dict[str, Any], work: Path, checkpoint: Path):
    """A no-argument callable running ``stage`` on ``ds_cfg`` with its in/outputs in ``work``."""
    if stage == "cams":
        from bestie.stages.make_cams import CamConfig, run as cams_run

        cfg = CamConfig(overlays=0)
        return lambda: cams_run(cfg, ds_cfg, checkpoint, work / "cams.h5", work / "points.h5", work / "cams.json",
                                None, device="cpu")
    if stage == "wsss":
        from bestie.stages.make_wsss import WsssConfig, run as wsss_run

        wcfg = WsssConfig(method="crf", workers=1)
        return lambda: wsss_run(wcfg, ds_cfg, work / "cams.h5", work / "wsss.h5", work / "wsss.json", None,
                                device="cpu")
    if stage == "evaluate":
        from bestie.stages.score_baseline import run as baseline_run
        from bestie.stages.train_bestie import BestieConfig

        bcfg = BestieConfig()
        return lambda: baseline_run(bcfg, ds_cfg, ds_cfg.get("split", "train"), work / "wsss.h5",
                                    work / "points.h5", work / "metrics.json")
    raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")


def run_worker(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Run stages one after the other in this process and measure each (called in a fresh process).

    Before each stage the resident-set high-water mark is reset (:func:`benchmarks.reset_peak_rss`), so
    each stage's peak is its own even when several share the process.

    Args:
        spec: ``{"stages": ["cams" | "wsss" | "evaluate", ...] (pipeline order), "dataset": dataset config,
            "dir": work folder (stage in/outputs), "checkpoint": classifier checkpoint (cams)}``.

    Returns:
        Per stage ``{"stage", "images", "seconds", "images_per_s", "cpu_seconds", "images_per_cpu_s",
        "setup_rss_mb", "peak_rss_mb", "growth_mb", "peak_reset"}``.
    """
    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    ds_cfg, work = spec["dataset"], Path(spec["dir"])
    # the stages import these lazily: import them before the setup figure so that growth_mb is the
    # working set of the images, not library code
    import h5py  # noqa: F401
    import timm  # noqa: F401

    import bestie.cam  # noqa: F401
    import bestie.evaluation  # noqa: F401
    import bestie.io.h5store  # noqa: F401
    import bestie.peaks  # noqa: F401
    import bestie.wsss.crf  # noqa: F401
    from bestie.data import build_dataset

    images = len(build_dataset(ds_cfg).ids)
    out = []
    for stage in spec["stages"]:
        call = _stage_call(stage, ds_cfg, work, Path(spec.get("checkpoint") or "none"))
        reset = reset_peak_rss()
        setup = peak_rss_mb()
        c0, t0 = time.process_time(), time.perf_counter()
        call()
        seconds = time.perf_counter() - t0
        cpu = time.process_time() - c0
        peak = peak_rss_mb()
        out.append({
            "stage": stage,
            "images": images,
            "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 3),
            "cpu_seconds": round(cpu, 3),
            "images_per_cpu_s": round(images / cpu, 3) if cpu > 0 else None,
            "setup_rss_mb": setup,
            "peak_rss_mb": peak,
            "growth_mb": round(peak - setup, 1),
            "peak_reset": reset,
        })
    return out


def _spawn(spec: dict[str, Any], work: Path, timeout: float) -> list[dict[str, Any]]:
    """Run :func:`run_worker` in a fresh interpreter; returns its result (output tail in the error)."""
    tag = "_".join(spec["stages"])
    spec_path = work / f"spec_{tag}.json"
    out_path = work / f"result_{tag}.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    log_path = work / f"log_{tag}.txt"
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_stages", "--worker", str(spec_path),
                               str(out_path)], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=timeout)
    if proc.returncode != 0 or not out_path.is_file():
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
        raise RuntimeError(f"stage(s) {tag} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out_path.read_text(encoding="utf-8"))


def run(quick: bool = False, factors: Sequence[int] = (1, 4), num_ids: int | None = None,
        max_side: int | None = None, crop: int | None = None, data_root: Path = DATA_ROOT,
        timeout: float = 3600.0, one_process: bool | None = None) -> dict[str, Any]:
    """Measure every stage of :data:`STAGES` at each replication factor.

    Args:
        quick: 2 ids downscaled to a 128 px long side, classifier crop 64 (seconds in all).
        factors: replication factors of the id list (1 and 4).
        num_ids: use only the first ``num_ids`` ids of the real train list (default: all; 2 in quick mode).
        max_side: downscale the images to this long side first (default: none; 128 in quick mode).
        crop: training crop of the throwaway classifier (default 128; 64 in quick mode).
        data_root: the real VOC-layout data.
        timeout: seconds allowed per stage process.
        one_process: run the three stages of a factor in one process (peak reset between them) instead
            of one process each; default: True in quick mode (saves interpreter and torch start-ups).

    Returns:
        ``{"data": {...}, "per_factor": {"1x": {stage: worker result}, "4x": ...}, "<stage>": {"images_per_s_1x",
        "images_per_s_4x", "images_per_cpu_s_1x", "images_per_cpu_s_4x", "marginal_images_per_s",
        "marginal_images_per_cpu_s", "peak_rss_mb_1x", "peak_rss_mb_4x", "rss_ratio_4x_1x"}}``,
        or ``{"skipped": reason}`` when ``data_root`` is absent.
    """
    data_root = Path(data_root)
    if not (data_root / "ImageSets" / "Segmentation" / "train.txt").is_file():
        return {"skipped": f"real data {data_root} is absent"}
    if one_process is None:
        one_process = quick
    if quick:
        num_ids = num_ids or 2
        max_side = max_side or 128
        crop = crop or 64
    crop = crop or 128
    ids = _read_ids(data_root, "train")
    if num_ids:
        ids = ids[:num_ids]
    res: dict[str, Any] = {"data": {"source": str(data_root), "ids": len(ids), "max_side": max_side,
                                    "factors": list(factors), "classifier_crop": crop, "threads": 1,
                                    "device": "cpu", "process_per_stage": not one_process},
                           "per_factor": {}}
    with tempfile.TemporaryDirectory(prefix="bestie_bench_stages.") as tmp:
        tmp = Path(tmp)
        src = data_root
        if max_side:
            src = tmp / "small"
            _downscaled_copy(data_root, src, ids, max_side)
        # throwaway classifier on the first 4 ids
        ck_root = tmp / "ckpt_voc"
        prepare_voc(ck_root, src, ids[:4], 1, split="ckpt")
        t0 = time.perf_counter()
        ckpt = make_classifier_checkpoint(ck_root, tmp / "classifier.pt", crop)
        res["data"]["checkpoint_s"] = round(time.perf_counter() - t0, 2)
        for f in factors:
            root = tmp / f"voc_{f}x"
            alias = prepare_voc(root, src, ids, f)
            work = tmp / f"work_{f}x"
            work.mkdir()
            ds_cfg = {"format": "voc", "root": str(root), "split": "train"}
            per: dict[str, Any] = {}
            groups = [list(STAGES)] if one_process else [[s] for s in STAGES]
            for group in groups:
                spec = {"stages": group, "dataset": ds_cfg, "dir": str(work), "checkpoint": str(ckpt)}
                for r in _spawn(spec, work, timeout):
                    if r["images"] != len(alias):
                        raise RuntimeError(f"stage {r['stage']} saw {r['images']} images, expected {len(alias)}")
                    per[r["stage"]] = r
            res["per_factor"][f"{f}x"] = per
    lo, hi = f"{min(factors)}x", f"{max(factors)}x"
    for stage in STAGES:
        a, b = res["per_factor"][lo][stage], res["per_factor"][hi][stage]
        summary = {f"images_per_s_{lo}": a["images_per_s"], f"images_per_s_{hi}": b["images_per_s"],
                   f"images_per_cpu_s_{lo}": a["images_per_cpu_s"], f"images_per_cpu_s_{hi}": b["images_per_cpu_s"],
                   f"peak_rss_mb_{lo}": a["peak_rss_mb"], f"peak_rss_mb_{hi}": b["peak_rss_mb"],
                   f"rss_ratio_{hi}_{lo}": round(b["peak_rss_mb"] / a["peak_rss_mb"], 3)}
        if b["images"] > a["images"] and b["seconds"] > a["seconds"]:
            summary["marginal_images_per_s"] = round((b["images"] - a["images"]) / (b["seconds"] - a["seconds"]), 3)
        if b["images"] > a["images"] and b["cpu_seconds"] > a["cpu_seconds"]:
            summary["marginal_images_per_cpu_s"] = round(
                (b["images"] - a["images"]) / (b["cpu_seconds"] - a["cpu_seconds"]), 3)
        res[stage] = summary
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 ids at 128 px (seconds)")
    ap.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker[0]).read_text(encoding="utf-8"))
        result = run_worker(spec)
        Path(args.worker[1]).write_text(json.dumps(result), encoding="utf-8")
        return 0
    print(json.dumps(run(quick=args.quick), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
