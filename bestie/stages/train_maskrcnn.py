"""Stage 6a: train a Mask R-CNN on the COCO pseudo labels of stage 5 (docs/METHOD.md, "5-6").

The loop follows torchvision's detection reference (``references/detection/train.py``): SGD with
momentum, a linear warm-up over at most the first epoch, step decay of the learning rate, the sum of the
detector's loss dict (``loss_classifier``, ``loss_box_reg``, ``loss_mask``, ``loss_objectness``,
``loss_rpn_box_reg``) as the objective, horizontal-flip augmentation, one image size range set by the
model (``min_size`` / ``max_size``).

Data: :class:`PseudoLabelDataset` reads the pseudo-label JSON and takes each image from the dataset by
its ``image_key``. **Images without any pseudo instance are skipped**: for pseudo labels, "no instance"
mostly means the instance model missed the objects, and training on such images as pure background would
teach the detector to suppress them (detectron2 filters empty images by default for the same reason).

Robustness: the NaN/inf guard (:func:`bestie.engine.check_finite`) stops a diverging run with a
:class:`~bestie.errors.TrainingError`; every ``checkpoint_every`` iterations a resumable checkpoint
``<out_checkpoint>.partial`` (model, optimizer, scheduler, GradScaler, RNG states, data position) is
written atomically, and a restarted run with the same settings and pseudo-label file continues from it
and ends with the weights of an uninterrupted run (a partial file of other settings is refused with a
:class:`~bestie.errors.ConfigError`, as in the BESTIE stage); the final checkpoint is written atomically
to ``out_checkpoint`` and the partial one removed. Multi-GPU runs use
``torchrun`` (DistributedDataParallel, one process per GPU, batch size per process); CUDA runs use
autocast (bf16 where supported, else fp16 with a GradScaler) when ``amp``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bestie.errors import ArtifactError, DataError
from bestie.sections import MaskRCNNConfig  # noqa: F401 (the stage's config section)

__all__ = ["MaskRCNNConfig", "PseudoLabelDataset", "load_pseudo_json", "masks_to_boxes", "collate", "run"]

log = logging.getLogger(__name__)

CHECKPOINT_KIND = "maskrcnn"


# --------------------------------------------------------------------------------------------- data
def load_pseudo_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a pseudo-label COCO JSON written by :mod:`bestie.stages.export_pseudo_labels`.

    Returns:
        The parsed dict (``images`` with ``image_key``, ``annotations``, ``categories``, ``info``).

    Raises:
        ArtifactError: missing file, invalid JSON, or missing ``images`` / ``annotations`` /
            ``categories`` lists or ``image_key`` fields (names the file).
    """
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"pseudo-label JSON {p} does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{p}: not a readable JSON file ({exc})") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"{p}: expected a COCO dataset object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ArtifactError(f"{p}: lacks the COCO list {key!r}")
    for rec in data["images"]:
        if not isinstance(rec, dict) or not {"id", "image_key", "height", "width"} <= set(rec):
            raise ArtifactError(f"{p}: image record without id/image_key/height/width: {str(rec)[:200]}")
    return data


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight boxes of binary masks, vectorised.

    Args:
        masks: ``(N, H, W)`` bool, each with at least one pixel.

    Returns:
        ``(N, 4)`` float32 ``x1, y1, x2, y2`` in pixels, ``x2 = last column + 1``, ``y2 = last row + 1``
        (the COCO box ``[x, y, w, h]`` as corners; a single pixel at column 3, row 5 gives
        ``[3, 5, 4, 6]``), the box convention torchvision's detection models train on.
    """
    n, h, w = masks.shape
    if n == 0:
        return np.zeros((0, 4), dtype=np.float32)
    cols = masks.any(axis=1)  # (N, W)
    rows = masks.any(axis=2)  # (N, H)
    x1 = cols.argmax(axis=1)
    x2 = w - cols[:, ::-1].argmax(axis=1)
    y1 = rows.argmax(axis=1)
    y2 = h - rows[:, ::-1].argmax(axis=1)
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)


class PseudoLabelDataset(torch.utils.data.Dataset):
    """Training samples of the pseudo-label JSON (images with at least one instance only).

    ``dataset[key]`` with ``key`` an index or the ``(index, epoch)`` of
    :class:`bestie.engine.ResumableSampler` returns ``(image, target)``:

    - ``image``: ``(3, H, W)`` float32 RGB in ``[0, 1]`` (the model normalises);
    - ``target``: ``boxes`` ``(N, 4)`` float32 ``x1, y1, x2, y2`` pixels (from the masks, after the flip),
      ``labels`` ``(N,)`` int64 **1-based** (class ``c`` -> ``c + 1``), ``masks`` ``(N, H, W)`` uint8,
      ``image_id`` int (the JSON's image id).

    The flip (probability ``hflip``) is drawn from :func:`bestie.engine.sample_rng` of ``(seed, epoch,
    index)``, so a resumed run augments exactly as an uninterrupted one.

    Args:
        pseudo: the parsed JSON (:func:`load_pseudo_json`).
        dataset: the image dataset (``image(id)``, ``ids``, ``num_classes``, ``class_names``).
        hflip: flip probability.
        seed: augmentation seed.
        source: file name for error messages.

    Raises:
        DataError: an ``image_key`` not in the dataset, a category id not among the dataset's
            categories, or no image with an instance at all (names the file).
    """

    def __init__(self, pseudo: Mapping[str, Any], dataset: Any, hflip: float = 0.5, seed: int = 0,
                 source: str = "pseudo labels") -> None:
        from bestie.stages.export_pseudo_labels import category_ids

        self.dataset = dataset
        self.hflip = float(hflip)
        self.seed = int(seed)
        self.source = source
        cat_to_label = {cid: i + 1 for i, cid in enumerate(category_ids(dataset))}
        known_ids = set(dataset.ids)
        images = {int(r["id"]): r for r in pseudo["images"]}
        per_image: dict[int, list[tuple[dict, int]]] = defaultdict(list)
        for ann in pseudo["annotations"]:
            if ann.get("iscrowd", 0):
                continue
            cid = int(ann["category_id"])
            if cid not in cat_to_label:
                raise DataError(
                    f"{source}: annotation {ann.get('id')} has category id {cid}, not one of the dataset's "
                    f"{sorted(cat_to_label)}"
                )
            if int(ann["image_id"]) not in images:
                raise DataError(f"{source}: annotation {ann.get('id')} refers to unknown image id {ann['image_id']}")
            per_image[int(ann["image_id"])].append((ann["segmentation"], cat_to_label[cid]))
        self.records: list[dict[str, Any]] = []
        for iid in sorted(per_image):
            rec = images[iid]
            key = str(rec["image_key"])
            if key not in known_ids:
                raise DataError(f"{source}: image_key {key!r} (image id {iid}) is not an image of the dataset")
            self.records.append({
                "image_id": iid, "image_key": key, "height": int(rec["height"]), "width": int(rec["width"]),
                "segmentations": [s for s, _ in per_image[iid]],
                "labels": np.asarray([lab for _, lab in per_image[iid]], dtype=np.int64),
            })
        self.num_skipped = len(images) - len(self.records)
        if not self.records:
            raise DataError(f"{source}: no image has a pseudo instance; nothing to train Mask R-CNN on")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from bestie.engine import sample_rng
        from bestie.io.coco_json import decode_rle

        index = int(key[0]) if isinstance(key, (tuple, list)) else int(key)
        rec = self.records[index]
        image = self.dataset.image(rec["image_key"])
        h, w = rec["height"], rec["width"]
        if image.shape[:2] != (h, w):
            raise DataError(
                f"{self.source}: image {rec['image_key']!r} is {image.shape[1]}x{image.shape[0]} (WxH) but its "
                f"pseudo labels are {w}x{h}"
            )
        masks = np.stack([decode_rle(s) for s in rec["segmentations"]])
        if masks.shape[1:] != (h, w):
            raise DataError(f"{self.source}: a mask of image {rec['image_key']!r} is not {h}x{w}")
        labels = rec["labels"]
        keep = masks.reshape(len(masks), -1).any(axis=1)  # empty masks have no box
        masks, labels = masks[keep], labels[keep]
        if self.hflip > 0 and sample_rng(key, self.seed).random() < self.hflip:
            image = image[:, ::-1]
            masks = masks[:, :, ::-1]
        image_t = torch.tensor(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)  # copy: images may be read-only
        target = {
            "boxes": torch.from_numpy(masks_to_boxes(masks)),
            "labels": torch.from_numpy(labels),
            "masks": torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8)),
            "image_id": int(rec["image_id"]),
        }
        return image_t, target


def collate(batch: Sequence[Any]) -> tuple[list, list]:
    """Keep images of different sizes as lists: ``([image, ...], [target, ...])``."""
    images, targets = zip(*batch)
    return list(images), list(targets)


# ------------------------------------------------------------------------------------------ training
_RESUME_FREE = ("checkpoint_every", "log_every", "num_workers")  # may change between a crash and the rerun


def _resume_key(cfg: Any, pseudo_json: Path) -> dict[str, Any]:
    """What must be unchanged for a partial checkpoint to be resumed: every setting that affects the
    result (``maskrcnn.<key>``) and the pseudo-label file (size and modification time)."""
    from bestie.config import to_dict

    stat = pseudo_json.stat()
    key = {f"maskrcnn.{k}": v for k, v in to_dict(cfg).items() if k not in _RESUME_FREE}
    key.update(pseudo_json_size=int(stat.st_size), pseudo_json_mtime_ns=int(stat.st_mtime_ns))
    return key


def run(
    cfg: MaskRCNNConfig,
    dataset_cfg: Mapping[str, Any],
    pseudo_json: str | os.PathLike,
    out_checkpoint: str | os.PathLike,
    out_log: str | os.PathLike,
    device: str | None = None,
) -> dict[str, Any]:
    """Train Mask R-CNN on the pseudo labels (METHOD.md stage 6).

    Args:
        cfg: training settings.
        dataset_cfg: the ``dataset`` config section; the split is the pseudo-label JSON's
            ``info.split`` (else ``dataset_cfg["train_split"]``, else ``"train"``).
        pseudo_json: COCO JSON of :mod:`bestie.stages.export_pseudo_labels`.
        out_checkpoint: final checkpoint (``bestie.engine.save_checkpoint`` format; ``extra`` holds
            ``kind="maskrcnn"``, ``model_spec`` (:func:`bestie.models.maskrcnn.build_maskrcnn` keywords),
            ``class_names``, ``category_ids``, ``inference`` (``score_threshold``, ``mask_threshold``,
            ``max_dets``: what ``bestie predict`` applies), ``config``, ``split``, ``iterations``).
        out_log: JSON-lines log: per record ``iteration``, ``epoch``, ``lr``, ``loss`` and each loss term
            (means over the iterations since the previous record and over ranks; ``lr`` is the last
            iteration's), ``sec_per_iter``; a resumed run appends to it.
        device: ``"cpu"`` / ``"cuda"`` (default: CUDA when available; under torchrun ``cuda:LOCAL_RANK``).

    Returns:
        ``{"iterations": int, "num_train_images": int, "num_skipped_images": int, "final_loss": float}``.

    Raises:
        ArtifactError: a missing/corrupt pseudo-label JSON or an unreadable partial checkpoint.
        ConfigError: a partial checkpoint written with other settings or another pseudo-label file.
        DataError: pseudo labels that do not fit the dataset (see :class:`PseudoLabelDataset`).
        WeightsError: configured weights missing or not matching.
        TrainingError: a NaN/inf loss.
    """
    from bestie import trainer
    from bestie.engine import (JsonLog, infinite_loader, init_distributed, partial_checkpoint_path, save_checkpoint,
                               seed_everything)
    from bestie.progress import progress

    pseudo_json = Path(pseudo_json)
    out_checkpoint = Path(out_checkpoint)
    out_log = Path(out_log)
    dist = init_distributed(device)
    seed_everything(cfg.seed, dist.rank)
    train_set, dataset, split = _training_data(cfg, dataset_cfg, pseudo_json, dist)
    model, spec = _build_model(cfg, dataset.num_classes, dist)
    params = [p for p in model.parameters() if p.requires_grad]
    sampler, loader = _loader(cfg, train_set, dist)
    iters_per_epoch = math.ceil(sampler.per_rank / cfg.batch_size)
    max_iters = cfg.max_iters or cfg.epochs * iters_per_epoch
    optimization = _optimization(cfg, params, iters_per_epoch, max_iters, dist)

    partial = partial_checkpoint_path(out_checkpoint)
    resume_key = _resume_key(cfg, pseudo_json)
    start, _ = trainer.resume(partial, model, optimization.optimizer, optimization.scheduler, optimization.scaler,
                              resume_key, what="settings or pseudo labels")
    if start and dist.is_main:
        log.info("resuming Mask R-CNN training from %s at iteration %d", partial, start)
    if start == 0 and dist.is_main and out_log.exists():
        out_log.unlink()  # a fresh run starts a fresh log; a resumed one appends
    if dist.is_distributed:
        torch.distributed.barrier()

    extra_common = _checkpoint_extra(cfg, spec, dataset, split, pseudo_json)
    jlog = JsonLog(out_log, rank=dist.rank, start_iteration=start)  # <out_log>.partial until finish()
    model.train()
    t0 = time.time()
    bar = progress(total=max_iters, initial=start, disable=not dist.is_main, desc="maskrcnn")
    records = _LogRecords(jlog, dist, start, iters_per_epoch)
    try:
        batches = infinite_loader(loader, sampler, start_iteration=start, iters_per_epoch=iters_per_epoch)

        def save_partial(done: int) -> None:
            save_checkpoint(partial, model, optimization.optimizer, optimization.scheduler, optimization.scaler,
                            done, {**extra_common, "resume_key": resume_key}, rank=dist.rank)

        it = trainer.train_loop(start, max_iters, lambda it: _train_step(model, next(batches), cfg, dist.device),
                                optimization, objective="loss", log_every=cfg.log_every, on_log=records.write,
                                after_step=records.add, periodic=[(cfg.checkpoint_every, save_partial)], bar=bar)
    finally:
        bar.close()
        jlog.close()
    trainer.finish(dist, jlog, out_checkpoint, model, it, {**extra_common, "iterations": it})
    if dist.is_main:
        log.info("Mask R-CNN: %d iterations in %.0f s, final loss %.4f -> %s", it - start, time.time() - t0,
                 records.last_loss, out_checkpoint)
    return {
        "iterations": it,
        "num_train_images": len(train_set),
        "num_skipped_images": train_set.num_skipped,
        "final_loss": records.last_loss,
    }


def _training_data(cfg: MaskRCNNConfig, dataset_cfg: Mapping[str, Any], pseudo_json: Path,
                   dist: Any) -> tuple[PseudoLabelDataset, Any, str]:
    """The pseudo-labelled training set, the dataset it reads its images from, and the split: the JSON's
    ``info.split``, else ``dataset_cfg["train_split"]``, else ``"train"``."""
    from bestie.data import build_dataset

    pseudo = load_pseudo_json(pseudo_json)
    info = pseudo.get("info") or {}
    split = info.get("split") or dataset_cfg.get("train_split") or "train"
    dataset = build_dataset(dataset_cfg, split=split)
    train_set = PseudoLabelDataset(pseudo, dataset, cfg.hflip, cfg.seed, source=str(pseudo_json))
    if dist.is_main:
        log.info("Mask R-CNN: %d training images with pseudo labels, %d without (skipped)",
                 len(train_set), train_set.num_skipped)
    return train_set, dataset, split


def _build_model(cfg: MaskRCNNConfig, num_classes: int, dist: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The detector on ``dist.device`` (DDP-wrapped when distributed) and its ``bestie_spec``."""
    from bestie import trainer
    from bestie.models.maskrcnn import build_maskrcnn

    model = build_maskrcnn(
        cfg.model, num_classes, cfg.weights, min_size=cfg.min_size, max_size=cfg.max_size,
        trainable_backbone_layers=cfg.trainable_backbone_layers,
    )
    spec = dict(model.bestie_spec)
    model.to(dist.device)
    return trainer.wrap_ddp(model, dist), spec


def _loader(cfg: MaskRCNNConfig, train_set: PseudoLabelDataset, dist: Any) -> tuple[Any, Any]:
    """The per-epoch :class:`~bestie.engine.ResumableSampler` and its loader (batch size per process)."""
    from bestie import trainer
    from bestie.engine import ResumableSampler

    sampler = ResumableSampler(len(train_set), seed=cfg.seed, shuffle=True, rank=dist.rank, world_size=dist.world_size)
    # Without its own generator a loader draws its workers' base seed from the global torch RNG at each
    # epoch's start with num_workers 0, but once only with persistent workers: the RPN / ROI sampling
    # (global RNG) then differed from epoch 2 on between num_workers 0 and 2 (trainer.make_loader).
    loader = trainer.make_loader(train_set, sampler, cfg.batch_size, num_workers=cfg.num_workers,
                                 device=dist.device, seed=cfg.seed, collate_fn=collate)
    return sampler, loader


def _optimization(cfg: MaskRCNNConfig, params: list[torch.Tensor], iters_per_epoch: int, max_iters: int,
                  dist: Any) -> Any:
    """SGD with momentum, warm-up (at most the first epoch) + step decay at ``lr_steps`` fractions of the
    run, a GradScaler for CUDA fp16, gradient clipping at ``clip_grad_norm``."""
    from bestie import trainer
    from bestie.engine import WarmupMultiStepLR, create_grad_scaler

    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    warmup = min(cfg.warmup_iters, max(iters_per_epoch - 1, 0))
    milestones = sorted({int(round(f * max_iters)) for f in cfg.lr_steps})
    scheduler = WarmupMultiStepLR(optimizer, milestones, cfg.lr_gamma, warmup, cfg.warmup_factor)
    return trainer.Optimization(optimizer, scheduler, create_grad_scaler(dist.device, cfg.amp),
                                clip_params=params, clip_norm=cfg.clip_grad_norm)


def _checkpoint_extra(cfg: MaskRCNNConfig, spec: Mapping[str, Any], dataset: Any, split: str,
                      pseudo_json: Path) -> dict[str, Any]:
    """The ``extra`` of every checkpoint of the run (see :func:`run`)."""
    from bestie.config import to_dict
    from bestie.stages.evaluate import EvalConfig
    from bestie.stages.export_pseudo_labels import category_ids

    return {
        "kind": CHECKPOINT_KIND,
        "model_spec": dict(spec),
        "class_names": list(dataset.class_names),
        "category_ids": category_ids(dataset),
        # what `bestie predict` applies without a config: the detector's own score filter and cap, and
        # the evaluation's mask threshold
        "inference": {"score_threshold": spec["box_score_thresh"], "mask_threshold": EvalConfig().mask_threshold,
                      "max_dets": spec["box_detections_per_img"]},
        "config": to_dict(cfg),
        "split": split,
        "pseudo_json": str(pseudo_json),
        # CPU weights depend on the intra-op thread count (OMP_NUM_THREADS = the rule's threads)
        "num_threads": torch.get_num_threads(),
    }


def _train_step(model: torch.nn.Module, batch: tuple[list, list], cfg: MaskRCNNConfig,
                device: torch.device) -> dict[str, torch.Tensor]:
    """Forward of one batch in train mode: ``{"loss": the sum, **the detector's loss dict}`` (scalar tensors)."""
    from bestie.engine import autocast_context

    images, targets = batch
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    with autocast_context(device, cfg.amp):
        loss_dict = model(images, targets)
    loss = sum(loss_dict.values())
    return {"loss": loss, **loss_dict}


class _LogRecords:
    """The log records of the run: per record ``iteration``, ``epoch``, ``lr`` (the last iteration's), the
    window means of ``loss`` and each loss term (float32 sums on the device, averaged over ranks) and
    ``sec_per_iter``."""

    def __init__(self, jlog: Any, dist: Any, start: int, iters_per_epoch: int) -> None:
        from bestie.trainer import LogWindow

        self.jlog, self.dist, self.iters_per_epoch = jlog, dist, iters_per_epoch
        self.window = LogWindow(torch.float32)
        self.last_loss = float("nan")
        self.t_last, self.it_last = time.time(), start

    def add(self, it: int, losses: Mapping[str, torch.Tensor], lr: float) -> None:
        """Add one iteration's losses to the window."""
        self.window.add(losses)

    def write(self, it: int, lr: float) -> str:
        """Write the record of the window ending at iteration ``it`` (1-based); the bar's loss text."""
        from bestie.trainer import mean_over_ranks

        vals = mean_over_ranks(self.window.means(), self.dist)
        self.last_loss = vals["loss"]
        now = time.time()
        self.jlog.write({"iteration": it, "epoch": (it - 1) // self.iters_per_epoch, "lr": lr, **vals,
                         "sec_per_iter": (now - self.t_last) / max(it - self.it_last, 1)})
        self.t_last, self.it_last = now, it
        return f"{self.last_loss:.3f}"
