"""Stage 1: train the image-level CAM classifier, with PAM (peaks) or without (dense CAMs).

docs/METHOD.md section 1. The loss is the multilabel soft margin loss on the logits (global average of
the class maps); images whose label set is empty take part as all-negative examples.

Training pipeline per sample (reference BESTIE ``PAM/utils/LoadData.py``): resize so the shorter side is
``resize`` px, random scale (``scales``), random crop ``crop_size`` (padded when smaller), horizontal flip,
photometric distortion, normalisation with the backbone's mean / std. Every sample draws its augmentation
from its own generator seeded by ``(seed, epoch, index)`` and the data order depends only on
``(seed, epoch)`` (:class:`bestie.engine.ResumableSampler`), so a killed and resumed run reproduces the
uninterrupted one.

Files:

- ``out_checkpoint`` (written atomically at the very end): ``{"model": state dict, "extra": {"kind":
  "cam_classifier", "config": ClassifierConfig as dict, "num_classes", "class_names", "mean", "std",
  "stride", "num_threads", "train_mAP", "val_mAP"}, ...}``, loadable with ``torch.load(weights_only=True)``.
  The same config, seed and thread count (``num_threads``: torch's intra-op threads, from
  ``OMP_NUM_THREADS``, which Snakemake sets to the rule's ``threads``) give a byte-identical file on CPU,
  whatever ``num_workers``; another thread count gives other weights.
- :func:`partial_checkpoint_path` ``(out_checkpoint)`` = ``<out_checkpoint>.partial`` (e.g. ``pam.pt.partial``,
  the convention of :func:`bestie.engine.partial_checkpoint_path` shared by every training stage):
  full training state every ``checkpoint_every`` iterations; a rerun resumes from it; removed once the
  final checkpoint exists.
- ``out_log``: JSON lines: one per iteration (``iteration``, ``epoch``, ``loss``, ``lr``, ``time``), one
  per epoch (``epoch_end``, mean loss, ``train_mAP_running`` on the augmented batches), and a final one
  (``final``: ``train_mAP`` of the trained model on the whole split and ``val_mAP`` on the dataset's
  ``eval_split`` (None without one), eval mode, no augmentation).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from bestie.progress import progress

from bestie.config import to_dict
from bestie.errors import ConfigError
from bestie.engine import (
    JsonLog,
    ResumableSampler,
    WarmupMultiStepLR,
    autocast_context,
    check_finite,
    create_grad_scaler,
    infinite_loader,
    init_distributed,
    load_checkpoint,
    partial_checkpoint_path as engine_partial_path,
    sample_rng,
    save_checkpoint,
    seed_everything,
    unwrap_model,
)
from bestie.report.units import percent
from bestie.sections import ClassifierConfig  # noqa: F401 (the stage's config section)

__all__ = ["ClassifierConfig", "run", "partial_checkpoint_path", "average_precision", "build_model",
           "ClassifierTrainSet"]

log = logging.getLogger(__name__)


def partial_checkpoint_path(out_checkpoint: str | os.PathLike) -> Path:
    """Resume file of a run writing ``out_checkpoint``: ``classifier/pam.pt`` -> ``classifier/pam.pt.partial``
    (:func:`bestie.engine.partial_checkpoint_path`)."""
    return engine_partial_path(out_checkpoint)


def average_precision(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-class average precision (non-interpolated, as ``sklearn.metrics.average_precision_score``).

    ``AP_c = (1 / P_c) * sum over positives of precision at their rank`` in descending-score order (ties
    broken by input order).

    Args:
        scores: ``(N, C)`` float scores.
        labels: ``(N, C)`` {0, 1}.

    Returns:
        ``(C,)`` float64 AP in ``[0, 1]``; NaN for a class without positives.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels) > 0
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"average_precision: scores {scores.shape} and labels {labels.shape} must be equal (N, C)")
    order = np.argsort(-scores, axis=0, kind="stable")
    hits = np.take_along_axis(labels, order, axis=0).astype(np.float64)
    ranks = np.arange(1, scores.shape[0] + 1, dtype=np.float64)[:, None]
    precision = np.cumsum(hits, axis=0) / ranks
    npos = hits.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (precision * hits).sum(axis=0) / npos
    ap[npos == 0] = np.nan
    return ap


def _mean_ap(scores: np.ndarray, labels: np.ndarray) -> float | None:
    if scores.size == 0:
        return None
    ap = average_precision(scores, labels)
    return float(np.nanmean(ap) * 100.0) if np.isfinite(ap).any() else None


class ClassifierTrainSet(torch.utils.data.Dataset):
    """Augmented training samples: ``dataset[(index, epoch)] -> (image (3, S, S) float32, target (C,) float32)``.

    Args:
        ds: a dataset of :mod:`bestie.data` (``ids``, ``image(id)``, ``labels(id)``, ``num_classes``).
        cfg: the stage config (resize, scales, crop_size, photometric, seed).
        mean, std: normalisation of the backbone weights.
    """

    def __init__(self, ds: Any, cfg: ClassifierConfig, mean: Sequence[float], std: Sequence[float]) -> None:
        from bestie.data import transforms as T

        self.ds = ds
        self.ids = list(ds.ids)
        self.num_classes = int(ds.num_classes)
        self.cfg = cfg
        self.mean, self.std = tuple(mean), tuple(std)
        pad = tuple(int(round(m * 255)) for m in self.mean)
        steps: list[Any] = [T.ResizeShort(cfg.resize)]
        if tuple(cfg.scales) != (1.0,):
            steps.append(T.RandomScale(cfg.scales))
        steps += [T.RandomCrop(cfg.crop_size, image_pad=pad), T.RandomHFlip()]
        if cfg.photometric:
            steps.append(T.PhotometricDistortion())
        self.transform = T.Compose(steps)
        self._normalize = T.normalize

    def __len__(self) -> int:
        return len(self.ids)

    def target(self, index: int) -> np.ndarray:
        """Multi-hot ``(C,)`` float32 label vector of sample ``index``."""
        t = np.zeros(self.num_classes, np.float32)
        labels = list(self.ds.labels(self.ids[index]))
        if labels:
            t[labels] = 1.0
        return t

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(key[0]) if isinstance(key, (tuple, list)) else int(key)
        rng = sample_rng(key, self.cfg.seed)
        sample = self.transform({"image": self.ds.image(self.ids[index])}, rng)
        image = self._normalize(sample["image"], self.mean, self.std)
        return torch.from_numpy(image), torch.from_numpy(self.target(index))


def build_model(cfg: ClassifierConfig | Mapping[str, Any], num_classes: int, load_weights: bool = True,
                head_dilation: int = 1):
    """The :class:`~bestie.models.classifier.CAMClassifier` described by ``cfg``.

    Args:
        cfg: a :class:`ClassifierConfig` or its dict form (as stored in a checkpoint's ``extra``).
        num_classes: ``C``.
        load_weights: load ``cfg.weights``; False builds a randomly initialised model silently (its
            weights come from a checkpoint next).
        head_dilation: dilation of the extra convs (for inference at a finer output stride).
    """
    from bestie.models.classifier import CAMClassifier

    c = cfg if isinstance(cfg, Mapping) else to_dict(cfg)
    return CAMClassifier(
        c["backbone"], num_classes,
        weights=c["weights"] if load_weights else None,
        use_pam=c["use_pam"], alpha=c["alpha"], num_extra_convs=c["num_extra_convs"],
        extra_channels=c["extra_channels"], output_stride=c.get("output_stride"),
        freeze_bn=c.get("freeze_bn", False), frozen_levels=c.get("frozen_levels", 0), head_dilation=head_dilation,
        backbone_head=c.get("backbone_head", False),
        warn_random=load_weights,
    )


@torch.no_grad()
def _evaluate_map(model: torch.nn.Module, ds: Any, cfg: ClassifierConfig, mean, std, device) -> float | None:
    """mAP (percent) of the model on all images of ``ds``: shorter side ``cfg.resize``, no augmentation."""
    from bestie.data import transforms as T

    model.eval()
    scores, labels = [], []
    for img_id in ds.ids:
        sample = T.resize_short({"image": ds.image(img_id)}, cfg.resize)
        x = torch.from_numpy(T.normalize(sample["image"], mean, std)).unsqueeze(0).to(device)
        x = x.contiguous(memory_format=torch.channels_last)
        scores.append(model(x)["logits"].float().cpu().numpy()[0])
        t = np.zeros(ds.num_classes, np.float32)
        lab = list(ds.labels(img_id))
        if lab:
            t[lab] = 1.0
        labels.append(t)
    return _mean_ap(np.stack(scores), np.stack(labels)) if scores else None


def _held_out_map(model: torch.nn.Module, dataset_cfg: Mapping[str, Any], cfg: ClassifierConfig, mean, std,
                  device) -> float | None:
    """Classification mAP (percent) on the held-out split ``dataset_cfg["eval_split"]``; None when no
    ``eval_split`` is configured, it is the training split, or it has no images."""
    from bestie.data import build_dataset

    split = dataset_cfg.get("eval_split")
    train_split = dataset_cfg.get("split") or dataset_cfg.get("train_split") or "train"
    if not split or split == train_split:
        return None
    ds = build_dataset(dataset_cfg, split=split)
    return _evaluate_map(model, ds, cfg, mean, std, device) if ds.ids else None


def run(cfg: ClassifierConfig, dataset_cfg: Mapping[str, Any], out_checkpoint: Path, out_log: Path,
        device: str | None = None) -> None:
    """Train the classifier on the dataset's split (``dataset_cfg["split"]``) and write its checkpoint.

    Resumes from :func:`partial_checkpoint_path` when it exists (same config required). Works under
    ``torchrun`` (DDP, rank 0 writes) and as a plain process.

    Args:
        cfg: stage configuration.
        dataset_cfg: the ``dataset`` config section (:func:`bestie.data.build_dataset`).
        out_checkpoint: final checkpoint path.
        out_log: JSON-lines training log.
        device: ``"cpu"`` / ``"cuda"`` (default: CUDA when available).

    Raises:
        ConfigError: a partial checkpoint made with another config or dataset.
        DataError / WeightsError / ArtifactError: from the dataset, weights and checkpoint files.
        TrainingError: a non-finite loss (names the iteration and the value).
    """
    from bestie.data import build_dataset

    out_checkpoint, out_log = Path(out_checkpoint), Path(out_log)
    partial = partial_checkpoint_path(out_checkpoint)
    dist = init_distributed(device)
    seed_everything(cfg.seed, dist.rank)
    ds = build_dataset(dataset_cfg)
    if len(ds.ids) == 0:
        raise ConfigError(f"dataset split {dataset_cfg.get('split', 'train')!r} has no images to train on")

    model = build_model(cfg, ds.num_classes).to(dist.device, memory_format=torch.channels_last)
    mean, std = model.mean, model.std
    groups = model.param_groups(cfg.base_lr, cfg.base_weight_decay)
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.base_lr, momentum=0.9, nesterov=True,
                                    weight_decay=cfg.base_weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.base_lr, weight_decay=cfg.base_weight_decay)

    train_set = ClassifierTrainSet(ds, cfg, mean, std)
    sampler = ResumableSampler(len(train_set), seed=cfg.seed, shuffle=True, rank=dist.rank,
                               world_size=dist.world_size)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
        drop_last=False, pin_memory=dist.device.type == "cuda", persistent_workers=cfg.num_workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG untouched (exact resume)
    )
    ipe = math.ceil(sampler.per_rank / cfg.batch_size)
    max_iter = cfg.epochs * ipe
    milestones = [(e - 1) * ipe for e in cfg.lr_steps if 1 <= e - 1 < cfg.epochs]
    scheduler = WarmupMultiStepLR(optimizer, milestones, gamma=0.1)
    scaler = create_grad_scaler(dist.device, cfg.amp)

    meta = {
        "kind": "cam_classifier",
        "config": to_dict(cfg),
        "num_classes": int(ds.num_classes),
        "class_names": list(ds.class_names),
        "num_images": len(ds.ids),
        "world_size": dist.world_size,
        "mean": list(mean),
        "std": list(std),
        "stride": int(model.stride),
        # CPU results depend on it (reduction order): the same seed on 1 and 2 threads gives other weights
        "num_threads": torch.get_num_threads(),
    }
    start = 0
    if partial.is_file():
        state = load_checkpoint(partial, model, optimizer, scheduler, scaler)
        old = state["extra"]
        for key in ("config", "num_classes", "num_images", "world_size"):
            if old.get(key) != meta[key]:
                raise ConfigError(
                    f"partial checkpoint {partial} was made with another {key} ({old.get(key)!r} vs "
                    f"{meta[key]!r}); delete it to start over"
                )
        start = state["iteration"]
        log.info("resuming %s from iteration %d of %d", out_checkpoint, start, max_iter)

    net: torch.nn.Module = model
    if dist.is_distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    net.train()
    jlog = JsonLog(out_log, rank=dist.rank, start_iteration=start)  # <out_log>.partial until finish()
    jlog.write(event="start", iteration=start, max_iter=max_iter, iters_per_epoch=ipe, resumed=start > 0,
               images=len(ds.ids), config=to_dict(cfg))
    stream = infinite_loader(loader, sampler, start_iteration=start, iters_per_epoch=ipe)
    epoch_scores: list[np.ndarray] = []
    epoch_labels: list[np.ndarray] = []
    epoch_losses: list[float] = []
    t0 = time.time()
    bar = progress(total=max_iter, initial=start, disable=not dist.is_main, desc=f"classifier {out_checkpoint.stem}")
    for it in range(start, max_iter):
        images, targets = next(stream)
        images = images.to(dist.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        targets = targets.to(dist.device, non_blocking=True)
        with autocast_context(dist.device, cfg.amp):
            out = net(images)
        logits = out["logits"].float()
        loss = F.multilabel_soft_margin_loss(logits, targets)
        check_finite({"loss": loss}, it)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        loss_v = float(loss.detach())
        epoch_losses.append(loss_v)
        epoch_scores.append(logits.detach().cpu().numpy())
        epoch_labels.append(targets.cpu().numpy())
        epoch = it // ipe
        jlog.write(iteration=it + 1, epoch=epoch + 1, loss=loss_v, lr=lr)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_v:.4f}", refresh=False)
        if (it + 1) % ipe == 0 or it + 1 == max_iter:
            jlog.write(event="epoch_end", epoch=epoch + 1, iteration=it + 1, loss=float(np.mean(epoch_losses)),
                       train_mAP_running=_mean_ap(np.concatenate(epoch_scores), np.concatenate(epoch_labels)),
                       seconds=time.time() - t0)
            epoch_scores, epoch_labels, epoch_losses = [], [], []
        if cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0 and it + 1 < max_iter:
            save_checkpoint(partial, model, optimizer, scheduler, scaler, it + 1, meta, rank=dist.rank)
    bar.close()
    train_seconds = time.time() - t0

    final_map = None
    if dist.is_main:
        final_map = _evaluate_map(unwrap_model(model), ds, cfg, mean, std, dist.device)
        val_map = _held_out_map(unwrap_model(model), dataset_cfg, cfg, mean, std, dist.device)
        meta["train_mAP"] = final_map
        meta["val_mAP"] = val_map
        save_checkpoint(out_checkpoint, model, None, None, None, max_iter, meta, rank=0)
        partial.unlink(missing_ok=True)
        jlog.write(event="final", iteration=max_iter, train_mAP=final_map, val_mAP=val_map, seconds=train_seconds)
        log.info("classifier %s: train mAP %s, %s mAP %s, %.0f s", out_checkpoint, percent(final_map, fraction=False),
                 dataset_cfg.get("eval_split"), percent(val_map, fraction=False), train_seconds)
    jlog.finish()
    if dist.is_distributed:
        torch.distributed.barrier()
