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
    create_grad_scaler,
    infinite_loader,
    init_distributed,
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
    from bestie import trainer
    from bestie.data import build_dataset

    out_checkpoint, out_log = Path(out_checkpoint), Path(out_log)
    partial = partial_checkpoint_path(out_checkpoint)
    dist = init_distributed(device)
    seed_everything(cfg.seed, dist.rank)
    ds = build_dataset(dataset_cfg)
    if len(ds.ids) == 0:
        raise ConfigError(f"dataset split {dataset_cfg.get('split', 'train')!r} has no images to train on")

    model = build_model(cfg, ds.num_classes).to(dist.device, memory_format=torch.channels_last)
    train_set = ClassifierTrainSet(ds, cfg, model.mean, model.std)
    sampler = ResumableSampler(len(train_set), seed=cfg.seed, shuffle=True, rank=dist.rank,
                               world_size=dist.world_size)
    loader = trainer.make_loader(train_set, sampler, cfg.batch_size, num_workers=cfg.num_workers, device=dist.device,
                                 seed=cfg.seed)
    ipe = math.ceil(sampler.per_rank / cfg.batch_size)
    max_iter = cfg.epochs * ipe
    optimization = _optimization(cfg, model, ipe, dist.device)
    meta = _checkpoint_meta(cfg, ds, model, dist)
    start, _ = trainer.resume(partial, model, optimization.optimizer, optimization.scheduler, optimization.scaler,
                              {k: meta[k] for k in _RESUME_KEYS},
                              stored_key=lambda extra: {k: extra.get(k) for k in _RESUME_KEYS})
    if start:
        log.info("resuming %s from iteration %d of %d", out_checkpoint, start, max_iter)

    net = trainer.wrap_ddp(model, dist)
    net.train()
    jlog = JsonLog(out_log, rank=dist.rank, start_iteration=start)  # <out_log>.partial until finish()
    jlog.write(event="start", iteration=start, max_iter=max_iter, iters_per_epoch=ipe, resumed=start > 0,
               images=len(ds.ids), config=to_dict(cfg))
    stream = infinite_loader(loader, sampler, start_iteration=start, iters_per_epoch=ipe)
    records = _EpochRecords(jlog, ipe, max_iter)

    def save_partial(done: int) -> None:
        save_checkpoint(partial, model, optimization.optimizer, optimization.scheduler, optimization.scaler, done,
                        meta, rank=dist.rank)

    bar = progress(total=max_iter, initial=start, disable=not dist.is_main, desc=f"classifier {out_checkpoint.stem}")
    trainer.train_loop(start, max_iter, lambda it: records.step(net, next(stream), cfg.amp, dist.device),
                       optimization, objective="loss", log_every=1, on_log=records.write, after_step=records.add,
                       periodic=[(cfg.checkpoint_every, save_partial)], bar=bar)
    bar.close()
    train_seconds = time.time() - records.t0
    record = None
    if dist.is_main:
        meta["train_mAP"] = _evaluate_map(unwrap_model(model), ds, cfg, model.mean, model.std, dist.device)
        meta["val_mAP"] = _held_out_map(unwrap_model(model), dataset_cfg, cfg, model.mean, model.std, dist.device)
        record = {"event": "final", "iteration": max_iter, "train_mAP": meta["train_mAP"], "val_mAP": meta["val_mAP"],
                  "seconds": train_seconds}
    trainer.finish(dist, jlog, out_checkpoint, model, max_iter, meta, record)
    if dist.is_main:
        log.info("classifier %s: train mAP %s, %s mAP %s, %.0f s", out_checkpoint,
                 percent(meta["train_mAP"], fraction=False), dataset_cfg.get("eval_split"),
                 percent(meta["val_mAP"], fraction=False), train_seconds)


# the partial checkpoint's meta entries that must match for a run to resume it
_RESUME_KEYS = ("config", "num_classes", "num_images", "world_size")


def _optimization(cfg: ClassifierConfig, model: torch.nn.Module, ipe: int, device: torch.device) -> Any:
    """SGD (Nesterov momentum 0.9) or AdamW over the model's parameter groups; lr / 10 at the start of each
    epoch of ``lr_steps`` (1-based; ``ipe`` iterations per epoch); a GradScaler for CUDA fp16."""
    from bestie.trainer import Optimization

    groups = model.param_groups(cfg.base_lr, cfg.base_weight_decay)
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.base_lr, momentum=0.9, nesterov=True,
                                    weight_decay=cfg.base_weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.base_lr, weight_decay=cfg.base_weight_decay)
    milestones = [(e - 1) * ipe for e in cfg.lr_steps if 1 <= e - 1 < cfg.epochs]
    return Optimization(optimizer, WarmupMultiStepLR(optimizer, milestones, gamma=0.1),
                        create_grad_scaler(device, cfg.amp))


def _checkpoint_meta(cfg: ClassifierConfig, ds: Any, model: torch.nn.Module, dist: Any) -> dict[str, Any]:
    """The ``extra`` of the run's checkpoints (module docstring; the final one adds the mAPs)."""
    return {
        "kind": "cam_classifier",
        "config": to_dict(cfg),
        "num_classes": int(ds.num_classes),
        "class_names": list(ds.class_names),
        "num_images": len(ds.ids),
        "world_size": dist.world_size,
        "mean": list(model.mean),
        "std": list(model.std),
        "stride": int(model.stride),
        # CPU results depend on it (reduction order): the same seed on 1 and 2 threads gives other weights
        "num_threads": torch.get_num_threads(),
    }


class _EpochRecords:
    """The classifier's log records: one per iteration (``iteration``, ``epoch``, ``loss``, ``lr``) and one per
    epoch (``epoch_end``: mean loss, ``train_mAP_running`` on the epoch's augmented batches, ``seconds``)."""

    def __init__(self, jlog: JsonLog, ipe: int, max_iter: int) -> None:
        self.jlog, self.ipe, self.max_iter = jlog, ipe, max_iter
        self.scores: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.losses: list[float] = []
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.t0 = time.time()

    def step(self, net: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], amp: bool,
             device: torch.device) -> dict[str, torch.Tensor]:
        """Forward of one batch: ``{"loss": multilabel soft margin loss}``; keeps logits and targets."""
        images, targets = batch
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        with autocast_context(device, amp):
            out = net(images)
        logits = out["logits"].float()
        self._batch = (logits, targets)
        return {"loss": F.multilabel_soft_margin_loss(logits, targets)}

    def add(self, it: int, losses: Mapping[str, torch.Tensor], lr: float) -> None:
        """Keep the iteration's loss, scores and labels for the epoch record."""
        logits, targets = self._batch
        self.losses.append(float(losses["loss"].detach()))
        self.scores.append(logits.detach().cpu().numpy())
        self.labels.append(targets.cpu().numpy())

    def write(self, done: int, lr: float) -> str:
        """The record of iteration ``done`` (1-based), and the epoch's when it ends there; the bar's text."""
        epoch = (done - 1) // self.ipe
        loss_v = self.losses[-1]
        self.jlog.write(iteration=done, epoch=epoch + 1, loss=loss_v, lr=lr)
        if done % self.ipe == 0 or done == self.max_iter:
            self.jlog.write(event="epoch_end", epoch=epoch + 1, iteration=done, loss=float(np.mean(self.losses)),
                            train_mAP_running=_mean_ap(np.concatenate(self.scores), np.concatenate(self.labels)),
                            seconds=time.time() - self.t0)
            self.scores, self.labels, self.losses = [], [], []
        return f"{loss_v:.4f}"
