"""Stage 3: WSSS maps (semantic pseudo labels) from dense CAMs, image-level supervision only.

docs/METHOD.md section 3. Two methods:

- ``method="crf"`` (baseline, :func:`bestie.wsss.crf.cams_to_wsss`): background score = constant
  threshold, argmax over {background, CAMs of the labelled classes}, dense CRF, then the uncertain rule:
  pixels where a confident seed (``max CAM > fg_seed`` of class ``argmax``, or ``max CAM < bg_seed``)
  disagrees with the CRF label become 255 (``seed_mode="raw"``; ``"crf"`` = IRN's CRF'd seeds).
- ``method="affinity"`` (AffinityNet / IRN style, :mod:`bestie.wsss.affinity`): confident seed maps (IRN's
  ``cam_to_ir_label``: CRF'd maps at ``fg_seed`` and ``bg_seed``) train an affinity head on a frozen
  ImageNet backbone; each image's CAMs are propagated by a random walk over the predicted affinities,
  rescaled, compared to the background threshold (optionally refined by the CRF), and the same
  uncertain rule is applied.

Nothing here uses masks, boxes or saliency. The GT masks (``SegmentationClass``) are read only for the
diagnostics, and, when ``bg_threshold="auto"``, through the CAM stage's diagnostics (its best threshold
on the training images, as IRN tunes its thresholds), which is a documented use of GT for one scalar.

Outputs:

- ``out_wsss_h5`` (:class:`bestie.io.h5store.H5Writer`): per id ``wsss`` uint8 ``(H, W)``: 0 background,
  ``c + 1`` class ``c`` (only classes of the image label), 255 uncertain; file attrs: stage config,
  resolved threshold, method, class names.
- ``out_diagnostics`` (JSON), on the images that have a ``SegmentationClass`` map, all in percent:
  ``mIoU`` = mIoU of the **dense** map (the WSSS map before the uncertain rule, so every pixel labelled);
  ``wsss`` = the stored map scored two ways: ``mIoU_confident`` (pixels left 255 are left out, i.e. the
  quality of what is labelled) and ``mIoU_uncertain_as_bg`` (255 counted as background), plus
  ``precision_fg`` / ``recall_fg`` of the confident pixels and ``share_uncertain`` (share of all pixels
  left 255); ``cam_argmax`` = the un-refined CAM argmax at the same threshold; ``cam_sweep`` = CAM argmax
  mIoU for thresholds 0.05..0.95 and its best; timings.
- ``out_png_dir`` (optional): ``<id>.png`` palette PNGs (VOC palette; ids with ``/`` get ``%2F``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from bestie.config import to_dict
from bestie.errors import ArtifactError, ConfigError, DataError
from bestie.report.units import percent
from bestie.wsss.crf import CrfParams, cams_to_wsss, mark_uncertain, seed_map, threshold_argmax
from bestie.sections import WsssConfig  # noqa: F401 (the stage's config section)

__all__ = ["WsssConfig", "run", "resolve_threshold", "load_cams", "CAM_SWEEP"]

log = logging.getLogger(__name__)

IGNORE = 255
#: Background thresholds of the CAM-argmax reference sweep in the diagnostics.
CAM_SWEEP: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))


# --------------------------------------------------------------------------------------------- inputs
def resolve_threshold(value: float | str, cam_diagnostics: Path | None) -> float:
    """The numeric background threshold: ``value`` itself, or for ``"auto"`` the CAM diagnostics' best.

    Raises:
        ConfigError: ``"auto"`` without a diagnostics file.
        ArtifactError: the file is unreadable or has no numeric ``best_threshold`` (names the file).
    """
    if not isinstance(value, str):
        return float(value)
    if cam_diagnostics is None:
        raise ConfigError("wsss.bg_threshold is 'auto' but no CAM diagnostics JSON was given (--cam-diagnostics)")
    path = Path(cam_diagnostics)
    try:
        diag = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: cannot read the CAM diagnostics: {exc}") from exc
    best = diag.get("best_threshold") if isinstance(diag, dict) else None
    if not isinstance(best, (int, float)) or isinstance(best, bool) or not 0.0 <= best <= 1.0:
        raise ArtifactError(f"{path}: no numeric best_threshold in [0, 1] (images without GT?), got {best!r}; "
                            "set wsss.bg_threshold to a number")
    return float(best)


def load_cams(reader, image_id: str, image_size: tuple[int, int], labels: Sequence[int], source: Path
              ) -> tuple[np.ndarray, np.ndarray]:
    """CAMs of one image from the CAM store, upsampled (bilinear, half-pixel centres) to the image size.

    Args:
        reader: an open :class:`bestie.io.h5store.H5Reader` on the CAM file.
        image_id: the id.
        image_size: ``(H, W)`` of the image.
        labels: the image-level labels (0-based) of the dataset.
        source: the CAM file (for messages).

    Returns:
        ``(cams (K, H, W) float32 in [0, 1], classes (K,) int64)``.

    Raises:
        ArtifactError: missing arrays, wrong shapes / dtypes, a stored ``image_size`` that differs from
            the image, or a CAM class absent from the image label (the CAM file belongs to another dataset
            or label set).
    """
    from bestie.cam import upsample_cams

    try:
        arrays = reader.read(image_id)
    except Exception as exc:  # noqa: BLE001 - h5py raises several types
        raise ArtifactError(f"{source}: cannot read the CAMs of {image_id!r}: {exc}") from exc
    if "cams" not in arrays or "classes" not in arrays:
        raise ArtifactError(f"{source}: image {image_id!r} lacks 'cams' / 'classes' (has {sorted(arrays)})")
    cams = np.asarray(arrays["cams"], dtype=np.float32)
    classes = np.asarray(arrays["classes"])
    if cams.ndim != 3 or classes.ndim != 1 or cams.shape[0] != classes.shape[0]:
        raise ArtifactError(f"{source}: image {image_id!r}: cams {cams.shape} / classes {classes.shape} are not "
                            "(K, h, w) / (K,)")
    if not np.issubdtype(classes.dtype, np.integer):
        raise ArtifactError(f"{source}: image {image_id!r}: classes have dtype {classes.dtype}, expected integers")
    try:
        attrs = reader.attrs(image_id)
    except Exception:  # noqa: BLE001
        attrs = {}
    stored = attrs.get("image_size")
    if stored is not None and tuple(int(v) for v in np.asarray(stored).ravel()) != tuple(image_size):
        raise ArtifactError(f"{source}: image {image_id!r} has image_size {tuple(np.asarray(stored).tolist())} but "
                            f"the image is {tuple(image_size)}")
    classes = classes.astype(np.int64)
    extra = sorted(set(classes.tolist()) - set(int(c) for c in labels))
    if extra:
        raise ArtifactError(f"{source}: image {image_id!r} has CAMs of classes {extra} that are not in its "
                            f"image label {sorted(labels)} (CAMs of another dataset?)")
    if not np.isfinite(cams).all():
        raise ArtifactError(f"{source}: image {image_id!r}: CAMs contain NaN or inf")
    cams = upsample_cams(cams, int(image_size[0]), int(image_size[1]))
    return np.clip(cams, 0.0, 1.0), classes


# --------------------------------------------------------------------------------------------- per image work
def _crf_job(args: tuple) -> tuple[np.ndarray, np.ndarray, float]:
    image, cams, classes, thr, crf, params, fg, bg, mode = args
    t = time.perf_counter()
    out, dense = cams_to_wsss(image, cams, classes, bg_threshold=thr, crf=crf, crf_params=params, fg_seed=fg,
                              bg_seed=bg, seed_mode=mode, return_dense=True)
    return out, dense, time.perf_counter() - t


def _seed_job(args: tuple) -> np.ndarray:
    image, cams, classes, fg, bg, params = args
    return seed_map(image, cams, classes, fg_seed=fg, bg_seed=bg, mode="crf", crf_params=params)


def _pool_map(fn, jobs: Iterator[tuple], workers: int) -> Iterator[Any]:
    """``map(fn, jobs)`` in order, in ``workers`` processes (or inline for 1), at most 2*workers pending."""
    if workers <= 1:
        for job in jobs:
            yield fn(job)
        return
    from collections import deque

    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.submit(fn, job))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class _Scores:
    """Streaming diagnostics of the stage (SemanticEvaluator per map kind)."""

    def __init__(self, num_labels: int, threshold: float) -> None:
        from bestie.evaluation.semantic import SemanticEvaluator

        self.threshold = threshold
        self.dense = SemanticEvaluator(num_labels)
        self.confident = SemanticEvaluator(num_labels)
        self.as_bg = SemanticEvaluator(num_labels)
        self.cam = SemanticEvaluator(num_labels)
        self.sweep = [SemanticEvaluator(num_labels) for _ in CAM_SWEEP]
        self.n_scored = 0
        self.n_uncertain = 0
        self.n_pixels = 0

    def update(self, wsss: np.ndarray, dense: np.ndarray, cams: np.ndarray, classes: np.ndarray,
               gt: np.ndarray | None) -> None:
        self.n_uncertain += int((wsss == IGNORE).sum())
        self.n_pixels += int(wsss.size)
        if gt is None:
            return
        if gt.shape != wsss.shape:
            raise DataError(f"SegmentationClass map {gt.shape} and image {wsss.shape} differ in size")
        self.n_scored += 1
        unc = wsss == IGNORE
        self.dense.update(dense, gt)
        self.confident.update(np.where(unc, 0, wsss), np.where(unc, IGNORE, gt).astype(gt.dtype))
        self.as_bg.update(np.where(unc, 0, wsss), gt)
        self.cam.update(threshold_argmax(cams, classes, self.threshold), gt)
        for t, ev in zip(CAM_SWEEP, self.sweep):
            ev.update(threshold_argmax(cams, classes, t), gt)

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_scored": self.n_scored,
                               "share_uncertain": self.n_uncertain / self.n_pixels if self.n_pixels else None}
        if not self.n_scored:
            out.update(mIoU=None, dense=None, wsss=None, cam_argmax=None, cam_sweep=None)
            return out
        dense = self.dense.evaluate()
        conf = self.confident.evaluate()
        as_bg = self.as_bg.evaluate()
        sweep = [ev.evaluate()["mIoU"] for ev in self.sweep]
        best = int(np.nanargmax([np.nan if m is None else m for m in sweep]))
        out.update(
            mIoU=dense["mIoU"],
            dense=dense,
            wsss={"mIoU_confident": conf["mIoU"], "IoU_confident": conf["IoU"],
                  "precision_fg": conf["precision_fg"], "recall_fg": conf["recall_fg"],
                  "mIoU_uncertain_as_bg": as_bg["mIoU"], "share_uncertain": out["share_uncertain"]},
            cam_argmax={"threshold": self.threshold, **self.cam.evaluate()},
            cam_sweep={"thresholds": list(CAM_SWEEP), "mIoU": sweep, "best_threshold": CAM_SWEEP[best],
                       "best_mIoU": sweep[best]},
        )
        return out


# --------------------------------------------------------------------------------------------- stage
def run(
    cfg: WsssConfig,
    dataset_cfg: Mapping[str, Any],
    cams_h5: Path,
    out_wsss_h5: Path,
    out_diagnostics: Path,
    out_png_dir: Path | None = None,
    device: str | None = None,
    affinity_checkpoint: Path | None = None,
    cam_diagnostics: Path | None = None,
) -> dict[str, Any]:
    """Make the WSSS map of every image of the dataset's split (module docstring for the outputs).

    Args:
        cfg: stage configuration.
        dataset_cfg: the ``dataset`` config section (:func:`bestie.data.build_dataset`).
        cams_h5: dense (non-PAM) CAM store of the CAM stage.
        out_wsss_h5, out_diagnostics, out_png_dir: outputs; ``out_png_dir`` None writes no PNGs.
        device: torch device of the affinity network (default CUDA when available); unused by ``crf``.
        affinity_checkpoint: affinity method only: if the file exists, the affinity head is loaded from it
            instead of trained (its recorded settings must match); otherwise the trained head is saved
            there. None trains without saving.
        cam_diagnostics: the CAM stage's diagnostics JSON (for ``bg_threshold="auto"``).

    Returns:
        The diagnostics dict (as written).

    Raises:
        ArtifactError: missing / malformed CAM file or ids missing from it (listed), a bad checkpoint.
        ConfigError: ``"auto"`` threshold without diagnostics.
        DataError: from the dataset.
    """
    from bestie.data import build_dataset
    from bestie.io.atomic import write_json_atomic
    from bestie.io.h5store import H5Reader, H5Writer

    t0 = time.time()
    cams_h5 = Path(cams_h5)
    threshold = resolve_threshold(cfg.bg_threshold, cam_diagnostics)
    ds = build_dataset(dataset_cfg)
    if not cams_h5.is_file():
        raise ArtifactError(f"CAM file {cams_h5} does not exist (run the CAM stage with the dense classifier first)")
    try:
        reader = H5Reader(cams_h5)
    except ArtifactError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ArtifactError(f"{cams_h5}: cannot open the CAM file: {exc}") from exc
    with reader:
        have = set(reader.ids())
        missing = [i for i in ds.ids if i not in have]
        if missing:
            raise ArtifactError(f"{cams_h5}: {len(missing)} of {len(ds.ids)} image(s) have no CAMs: "
                                + ", ".join(repr(m) for m in missing[:10]) + (" ..." if len(missing) > 10 else ""))
        params = cfg.crf_params()
        fg, bg = cfg.fg_seed, cfg.bg_seed
        scores = _Scores(ds.num_classes + 1, threshold)
        timing: dict[str, Any] = {}
        if out_png_dir is not None:
            Path(out_png_dir).mkdir(parents=True, exist_ok=True)

        def inputs() -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
            for img_id in ds.ids:
                image = ds.image(img_id)
                cams, classes = load_cams(reader, img_id, image.shape[:2], ds.labels(img_id), cams_h5)
                yield img_id, image, cams, classes

        attrs = {"stage": "wsss", "config": to_dict(cfg), "bg_threshold": threshold, "method": cfg.method,
                 "cams": str(cams_h5), "class_names": list(ds.class_names)}
        with H5Writer(out_wsss_h5, attrs=attrs) as writer:
            if cfg.method == "crf":
                items: list = []  # (id, cams, classes) in job order
                times: list[float] = []

                def jobs() -> Iterator[tuple]:
                    for img_id, image, cams, classes in inputs():
                        items.append((img_id, cams, classes))
                        yield (image, cams, classes, threshold, cfg.crf, params, fg, bg, cfg.seed_mode)

                for k, (out, dense, sec) in enumerate(_pool_map(_crf_job, jobs(), cfg.workers)):
                    img_id, cams, classes = items[k]
                    items[k] = None  # free memory
                    times.append(sec)
                    _emit(writer, out_png_dir, scores, ds, img_id, out, dense, cams, classes)
                timing["seconds_per_image"] = float(np.mean(times)) if times else None
            else:
                _run_affinity(cfg, ds, reader, cams_h5, writer, out_png_dir, scores, threshold, params, device,
                              affinity_checkpoint, timing, inputs)
    diag = {"method": cfg.method, "bg_threshold": threshold, "config": to_dict(cfg), "cams": str(cams_h5),
            "num_images": len(ds.ids), **scores.result(), "timing": timing, "seconds": time.time() - t0}
    write_json_atomic(out_diagnostics, diag)
    log.info("wsss %s (%s, threshold %.2f): mIoU %s (CAM argmax %s), %s%% uncertain, %.0f s", out_wsss_h5,
             cfg.method, threshold, percent(diag.get("mIoU"), fraction=False),
             percent((diag.get("cam_argmax") or {}).get("mIoU"), fraction=False),
             percent(diag.get("share_uncertain") or 0.0), diag["seconds"])
    return diag


def _emit(writer, png_dir: Path | None, scores: _Scores, ds, img_id: str, out: np.ndarray, dense: np.ndarray,
          cams: np.ndarray, classes: np.ndarray) -> None:
    writer.write(img_id, wsss=out)
    if png_dir is not None:
        from bestie.io.palette import png_name, write_palette_png

        write_palette_png(Path(png_dir) / png_name(img_id), out)
    scores.update(out, dense, cams, classes, ds.semantic_gt(img_id))


def _run_affinity(cfg: WsssConfig, ds, reader, cams_h5: Path, writer, png_dir, scores: _Scores, threshold: float,
                  params: CrfParams, device: str | None, checkpoint: Path | None, timing: dict, inputs) -> None:
    """Affinity method: seeds -> train (or load) the affinity head -> random walk per image."""
    import torch

    from bestie.models.backbones import create_backbone
    from bestie.wsss.affinity import AffinityNet, affinity_scores, load_affinity_checkpoint, save_affinity_checkpoint
    from bestie.wsss.crf import dense_crf

    from bestie.engine import resolve_device

    dev = resolve_device(device, "make_wsss")
    torch.manual_seed(cfg.seed)
    backbone = create_backbone(cfg.affinity_backbone, cfg.affinity_weights)
    net = AffinityNet(backbone, stride=cfg.affinity_stride).to(dev)
    tp = cfg.train_params()
    meta = {"backbone": cfg.affinity_backbone, "weights": cfg.affinity_weights, "stride": cfg.affinity_stride,
            "train": to_dict(tp), "fg_seed": cfg.fg_seed, "bg_seed": cfg.bg_seed, "cams": str(cams_h5),
            "crf": to_dict(params)}
    fg = 0.30 if cfg.fg_seed is None else cfg.fg_seed
    bg = 0.05 if cfg.bg_seed is None else cfg.bg_seed
    if checkpoint is not None and Path(checkpoint).is_file():
        got = load_affinity_checkpoint(checkpoint, net)
        keys = ("backbone", "weights", "stride", "train", "fg_seed", "bg_seed")
        if any(json.dumps(got.get(k), sort_keys=True) != json.dumps(meta[k], sort_keys=True) for k in keys):
            raise ArtifactError(f"{checkpoint}: affinity checkpoint was trained with other settings "
                                f"({ {k: got.get(k) for k in keys} }); delete it to retrain")
        timing["affinity_loaded"] = str(checkpoint)
    else:
        _train_affinity(net, cfg, ds, Path(writer.path).parent, inputs, fg, bg, params, tp, dev, timing)
        if checkpoint is not None:
            save_affinity_checkpoint(checkpoint, net, meta)
    # 2. random walk per image
    rw_thr = threshold if cfg.affinity_bg_threshold is None else float(cfg.affinity_bg_threshold)
    times: list[float] = []
    for img_id, image, cams, classes in inputs():
        t = time.perf_counter()
        if classes.size:
            s = affinity_scores(net, image, cams, bg_mode=cfg.affinity_bg_mode, bg_threshold=rw_thr,
                                bg_power=cfg.affinity_bg_power, radius=cfg.affinity_radius, beta=cfg.affinity_beta,
                                logt=cfg.affinity_logt, device=dev)
            keys = np.concatenate([[0], classes + 1]).astype(np.uint8)
            if cfg.affinity_crf:
                probs = np.maximum(s, 1e-5)
                s = dense_crf(image, probs / probs.sum(axis=0, keepdims=True), params=params)
            dense = keys[s.argmax(axis=0)]
            if cfg.fg_seed is None:
                out = dense.copy()
            else:
                seeds = seed_map(image, cams, classes, fg_seed=cfg.fg_seed, bg_seed=cfg.bg_seed, mode=cfg.seed_mode,
                                 crf_params=params)
                out = mark_uncertain(dense, seeds)
        else:
            dense = np.zeros(image.shape[:2], np.uint8)
            out = dense.copy()
        times.append(time.perf_counter() - t)
        _emit(writer, png_dir, scores, ds, img_id, out, dense, cams, classes)
    timing["affinity_seconds_per_image"] = float(np.mean(times)) if times else None


def _train_affinity(net: Any, cfg: WsssConfig, ds: Any, out_dir: Path, inputs: Any, fg: float, bg: float,
                    params: CrfParams, tp: Any, dev: Any, timing: dict) -> None:
    """Train the affinity head ``net`` on confident seed maps (IRN ``cam_to_ir_label``: ``fg`` / ``bg`` CAM
    thresholds, CRF ``params``) of every image of ``inputs()``, kept in a temporary HDF5 in ``out_dir`` (removed
    afterwards); the seed and training times and the final loss go to ``timing``."""
    import h5py

    from bestie.wsss.affinity import train_affinity_net

    # 1. confident seed maps (IRN cam_to_ir_label) into a temporary HDF5 next to the output
    t = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, seeds_path = tempfile.mkstemp(prefix=".wsss_seeds.", suffix=".h5", dir=out_dir)
    os.close(fd)
    try:
        ids: list[str] = []
        with h5py.File(seeds_path, "w") as f:
            def seed_jobs() -> Iterator[tuple]:
                for img_id, image, cams, classes in inputs():
                    ids.append(img_id)
                    yield (image, cams, classes, fg, bg, params)

            for k, seeds in enumerate(_pool_map(_seed_job, seed_jobs(), cfg.workers)):
                f.create_dataset(str(k), data=seeds, compression="gzip", compression_opts=1)
        timing["seed_seconds_per_image"] = (time.perf_counter() - t) / max(1, len(ids))
        t = time.perf_counter()
        with h5py.File(seeds_path, "r") as f:
            def sample(k: int) -> tuple[np.ndarray, np.ndarray]:
                return ds.image(ids[k]), f[str(k)][()]

            history = train_affinity_net(net, sample, tp, num_samples=len(ids), device=dev)
        timing["affinity_train_seconds"] = time.perf_counter() - t
        timing["affinity_final_loss"] = float(np.mean([h["loss"] for h in history[-5:]]))
    finally:
        try:
            os.remove(seeds_path)
        except OSError:
            pass
