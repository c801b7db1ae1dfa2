"""Stage 4: BESTIE training (semantic knowledge transfer + online self-refinement), METHOD.md section 4.

Each iteration: the pseudo instance labels of the batch (made per sample after augmentation by
:class:`bestie.instance_data.BestieTrainDataset`, shipped compact) are rendered into dense targets on the
device; forward the batch; from iteration ``refine_iter`` on (when ``refine`` is on) the refined targets
of :func:`bestie.refine.refine_targets`, computed from the network's own detached outputs (batched on the
device on CUDA), are the other target; :class:`bestie.losses.BestieLoss` combines them; Adam steps; the
warm-up + poly schedule steps. No step syncs the host with the device: the losses are summed on the
device and the NaN/inf guard is read every ``log_every`` iterations (:class:`bestie.trainer.FiniteGuard`;
the error names the first bad iteration).

Launch: a plain ``python`` process (CPU or one GPU) or ``torchrun`` (DDP: Gloo on CPU, NCCL on GPUs, with
SyncBatchNorm on GPUs; the global ``batch_size`` is split over the processes). No environment variable
is required for a plain launch (the public code crashed without ``LOCAL_RANK``).

Files:

- ``out_checkpoint``: the **last** model (weights at ``max_iters``), written atomically at the end.
- ``<stem>.best<suffix>`` next to it (e.g. ``model.best.pt``): the weights with the best validation
  mAP50, written whenever validation improves (only when validation runs). The public code saved the
  final "best" under the name of the last model; here the names are fixed and the checkpoint records
  its ``kind`` (``"last"`` / ``"best"``) and iteration.
- ``<out_checkpoint>.partial``: full training state (model, optimizer, scheduler, GradScaler, RNG,
  iteration) every ``checkpoint_every`` iterations. A killed run started again with the same config
  resumes from it and ends with the weights an uninterrupted run would have (data order and
  augmentation depend only on ``(seed, epoch, index)``); it is removed when the final checkpoint exists.
  A partial file from a different config is refused (ConfigError) rather than silently mixed.
- ``out_log``: JSON lines: ``start``, ``train`` (losses every ``log_every`` iterations, averaged over the
  processes), ``val`` and ``end`` records.

All checkpoints are :func:`bestie.engine.save_checkpoint` files whose ``extra`` holds ``model_config``,
``mean``, ``std``, ``class_names``, ``category_ids``, ``inference``, ``num_threads`` and ``kind``;
:func:`bestie.stages.predict_instances.load_bestie_model` rebuilds the network from any of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from bestie.config import to_dict
from bestie.errors import ConfigError, DataError
from bestie import engine
from bestie.params import GroupingParams
from bestie.sections import BestieConfig  # noqa: F401 (the stage's config section)

__all__ = ["BestieConfig", "best_checkpoint_path", "partial_checkpoint_path", "train_step", "run"]

log = logging.getLogger(__name__)

# Per-iteration values of train_step that are diagnostics, not losses (no NaN guard).
_DIAGNOSTIC_KEYS = {"refined", "refined_pixel_share"}

# Config keys that may change between a killed run and its resumption without changing the result.
_RESUME_FREE_KEYS = {"num_workers", "checkpoint_every", "log_every", "val_every", "val_max_images", "val_split",
                     "probe_images", "probe_final_images"}


def best_checkpoint_path(out_checkpoint: str | os.PathLike) -> Path:
    """``model.pt`` -> ``model.best.pt``: where the best-validation weights go."""
    p = Path(out_checkpoint)
    return p.with_name(f"{p.stem}.best{p.suffix}")


def partial_checkpoint_path(out_checkpoint: str | os.PathLike) -> Path:
    """``model.pt`` -> ``model.pt.partial``: the resumable training state
    (:func:`bestie.engine.partial_checkpoint_path`)."""
    return engine.partial_checkpoint_path(out_checkpoint)


def _model_kwargs(cfg: BestieConfig) -> dict[str, Any]:
    return dict(head_channels=cfg.head_channels, fusion_channels=cfg.fusion_channels, hrnet_fusion=cfg.hrnet_fusion,
                bn_momentum=cfg.bn_momentum, output_stride=cfg.output_stride, center_mode=cfg.center_mode)


def _resume_key(cfg: BestieConfig) -> dict[str, Any]:
    return {k: v for k, v in to_dict(cfg).items() if k not in _RESUME_FREE_KEYS}


def _untimed(name: str, fn: Callable[[], Any]) -> Any:
    return fn()


def train_step(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    loss_fn: torch.nn.Module,
    cfg: BestieConfig,
    iteration: int,
    device: torch.device,
    *,
    amp: bool = False,
    timer: Callable[[str, Callable[[], Any]], Any] = _untimed,
) -> dict[str, torch.Tensor]:
    """Forward, targets and loss of one iteration (no backward, no optimizer step), without a host sync on
    CUDA (refinement: :func:`bestie.refine.refine_targets` on the device).

    Args:
        model: the network (possibly DDP-wrapped), in train mode.
        batch: a batch of :class:`~bestie.instance_data.BestieTrainDataset` samples
            (:func:`~bestie.instance_data.collate_compact`; a batch with dense ``center`` / ``offset`` /
            ``weight`` targets, e.g. of :class:`~bestie.instance_data.DenseTargets`, is used as it is).
        loss_fn: :class:`bestie.losses.BestieLoss`.
        cfg: refinement settings (``refine``, ``refine_iter``; :meth:`~BestieConfig.pseudo_label_params` and
            :meth:`~BestieConfig.refine_params` for :func:`bestie.refine.refine_targets`).
        iteration: 0-based iteration (refinement runs when ``refine`` and ``iteration >= refine_iter``).
        device: the model's device.
        amp: run the forward under :func:`bestie.engine.autocast_context`.
        timer: ``timer(phase, fn)`` runs ``fn()`` and returns its result, for each phase in turn
            (``"target_render"``, ``"forward"``, ``"refinement"``, ``"loss"``): the benchmark's hook
            (:mod:`benchmarks.bench_step`); by default the phases simply run.

    Returns:
        The loss dict of ``loss_fn`` (scalar tensors incl. ``"total"``) plus ``"refined"`` (1.0 when the
        refined targets were used, else 0.0) and ``"refined_pixel_share"`` (share in ``[0, 1]`` of the batch's
        pixels with a positive refined weight; 0.0 without refinement).
    """
    images, semantic, pseudo = timer("target_render", lambda: _inputs(batch, cfg, device))

    def forward() -> dict[str, torch.Tensor]:
        with engine.autocast_context(device, amp):
            out = model(images)
        return {k: v.float() for k, v in out.items()}

    out = timer("forward", forward)
    refined = None
    if cfg.refine and iteration >= cfg.refine_iter:
        refined = timer("refinement", lambda: _refine(out, semantic, batch, cfg))
    return timer("loss", lambda: _losses(loss_fn, out, pseudo, refined, semantic, device))


def _inputs(batch: Mapping[str, torch.Tensor], cfg: BestieConfig,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Images, semantic map (uint8) and dense pseudo targets of ``batch`` on ``device``."""
    images = batch["image"].to(device, non_blocking=True)
    semantic = batch["semantic"].to(device, non_blocking=True)
    return images, semantic, pseudo_targets(batch, cfg, device)


def pseudo_targets(batch: Mapping[str, torch.Tensor], cfg: BestieConfig, device: torch.device) -> dict:
    """The batch's pseudo targets ``{"center": (B, C, S, S), "offset": (B, 2, S, S), "weight": (B, S, S)}``
    float32 on ``device``: rendered there from the compact labels (:func:`bestie.targets.render_targets`,
    sigma ``cfg.sigma``), or copied when the batch already holds them dense."""
    if "center" in batch:
        return {k: batch[k].to(device, non_blocking=True) for k in ("center", "offset", "weight")}
    from bestie.targets import render_targets

    return render_targets(*(batch[k].to(device, non_blocking=True) for k in ("components", "table", "gaussians",
                                                                             "first_row")),
                          num_classes=int(batch["labels"].shape[1]), sigma=cfg.sigma)


def _refine(out: Mapping[str, torch.Tensor], semantic: torch.Tensor, batch: Mapping[str, torch.Tensor],
            cfg: BestieConfig) -> dict:
    """:func:`bestie.refine.refine_targets` of the detached outputs (labels and points from the host batch)."""
    from bestie.refine import refine_targets

    labels = [torch.nonzero(row > 0.5).flatten().tolist() for row in batch["labels"]]
    points = None  # read in the point setting only (host tensors: no copy)
    if cfg.setting == "point":
        points = [batch["points"][i, : int(n)] for i, n in enumerate(batch["num_points"])]
    components = None  # the loader's WSSS components: the device path needs no host copy of the maps
    if "components" in batch:
        dev = semantic.device
        components = tuple(batch[k].to(dev, non_blocking=True) for k in ("components", "table", "first_row"))
    with torch.no_grad():
        return refine_targets(out["seg"].detach(), out["center"].detach(), out["offset"].detach(), semantic, labels,
                              points, pseudo=cfg.pseudo_label_params(), refine=cfg.refine_params(),
                              components=components)


def _losses(loss_fn: torch.nn.Module, out: Mapping[str, torch.Tensor], pseudo: Mapping[str, torch.Tensor],
            refined: dict | None, semantic: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """The loss dict and the refinement diagnostics of :func:`train_step`."""
    losses = dict(loss_fn(out, pseudo, refined, semantic))
    # a constant made on the device (torch.tensor(x, device=...) would copy a host value)
    losses["refined"] = torch.full((), 1.0 if refined is not None else 0.0, device=device)
    # Share of the batch's pixels that carry a refined target: 0 while the centre head stays below
    # center_threshold_refine (image setting), in which case the refined terms are 0 and only halve the
    # pseudo terms, as in the public code. Logged so that an inert refinement is visible.
    losses["refined_pixel_share"] = ((refined["weight"] > 0).float().mean() if refined is not None
                                     else torch.zeros((), device=device))
    return losses


def _make_loss(cfg: BestieConfig) -> torch.nn.Module:
    from bestie.losses import BestieLoss

    return BestieLoss(seg_weight=cfg.seg_weight, center_weight=cfg.center_weight, offset_weight=cfg.offset_weight,
                      top_k_percent=cfg.top_k_percent, center_agnostic=cfg.center_mode == "agnostic",
                      center_support_weight=cfg.center_support_weight)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """The unwrapped network in eval mode for the ``with`` block, its previous mode restored after."""
    net = engine.unwrap_model(model)
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


@torch.no_grad()
def _run_probe(model: torch.nn.Module, probe: Mapping[str, torch.Tensor] | None, loss_fn: Any,
               device: torch.device, grouping: GroupingParams) -> dict[str, Any]:
    """The learning probe's figures (:mod:`bestie.probe`) in eval mode, grouped by ``grouping`` (that of the
    ``instances`` section); {} when off."""
    if probe is None:
        return {}
    from bestie.probe import probe_metrics

    with _eval_mode(model) as net:
        out = net(probe["image"].to(device))
    return probe_metrics(out, probe, loss_fn.center_term, grouping=grouping)


def _run_final_probe(model: torch.nn.Module, train_ds: Any, cfg: BestieConfig, loss_fn: Any, device: torch.device,
                     grouping: GroupingParams) -> dict[str, Any] | None:
    """The end record's ``probe_final``: the probe over one crop of each of ``cfg.probe_final_images`` training
    images (:func:`bestie.probe.probe_over_dataset`), in eval mode, batches of ``max(probe_images, 1)``;
    None when off."""
    if not cfg.probe_final_images:
        return None
    from bestie.instance_data import DenseTargets
    from bestie.probe import probe_keys, probe_over_dataset

    with _eval_mode(model) as net:
        return probe_over_dataset(lambda image: net(image.to(device)), DenseTargets(train_ds),
                                  probe_keys(len(train_ds), cfg.probe_final_images), loss_fn.center_term,
                                  grouping=grouping, batch_size=max(cfg.probe_images, 1))


def _build_val(cfg: BestieConfig, dataset_cfg: Mapping[str, Any], jlog: engine.JsonLog) -> Any:
    """The validation dataset, or None (no val split, or it cannot be built: logged, training goes on)."""
    if cfg.val_split is None:
        return None
    from bestie.data import build_dataset

    try:
        ds = build_dataset(dataset_cfg, cfg.val_split)
    except (DataError, ConfigError) as exc:
        log.warning("validation disabled: split %r cannot be loaded: %s", cfg.val_split, exc)
        jlog.write(event="warning", message=f"validation disabled: split {cfg.val_split!r}: {exc}")
        return None
    return ds


def _inference_config(cfg: BestieConfig, grouping: GroupingParams) -> Any:
    """The inference settings of in-training validation: ``grouping`` (that of the ``instances`` section),
    flip per ``val_flip``."""
    from dataclasses import asdict

    from bestie.stages.predict_instances import InferenceConfig

    return InferenceConfig(**asdict(grouping), flip=cfg.val_flip)


def _validate(model: torch.nn.Module, val_ds: Any, cfg: BestieConfig, device: torch.device,
              grouping: GroupingParams) -> dict[str, Any]:
    from bestie.stages.predict_instances import evaluate_model

    net = engine.unwrap_model(model)
    ids = val_ds.ids if cfg.val_max_images is None else val_ds.ids[: cfg.val_max_images]
    res = evaluate_model(net, val_ds, _inference_config(cfg, grouping), device, mean=net.mean, std=net.std, ids=ids)
    res.pop("voc", None)
    return res


def run(
    cfg: BestieConfig,
    dataset_cfg: Mapping[str, Any],
    wsss_h5: str | os.PathLike,
    points_h5: str | os.PathLike | None,
    out_checkpoint: str | os.PathLike,
    out_log: str | os.PathLike,
    device: str | None = None,
    grouping: GroupingParams | None = None,
) -> dict[str, Any]:
    """Train the BESTIE network (module docstring) and write the final checkpoint atomically.

    Args:
        cfg: training settings.
        dataset_cfg: the ``dataset`` config section; the training split is ``train_split`` (or ``split``,
            default ``train``).
        wsss_h5: WSSS maps (stage 3).
        points_h5: peak points (stage 2; image setting), None in the point setting.
        out_checkpoint: the final (last-iteration) checkpoint; ``model.best.pt`` and ``model.pt.partial``
            are derived from it (module docstring).
        out_log: JSON-lines log.
        device: ``"cpu"`` / ``"cuda"`` / None (CUDA when available). Under torchrun the CUDA index is
            LOCAL_RANK.
        grouping: instance grouping of in-training validation and of the learning probe, recorded in the
            checkpoints' ``inference`` settings: that of the ``instances`` section
            (:meth:`~bestie.sections.InferenceConfig.grouping_params`); None: its defaults.

    Returns:
        Summary dict (iterations, best validation, paths).

    Raises:
        ConfigError / DataError / ArtifactError / WeightsError: bad settings or inputs (named).
        TrainingError: a loss became NaN/inf (the partial checkpoint stays for inspection).
    """
    dist = engine.init_distributed(device)
    out_checkpoint = Path(out_checkpoint)
    if cfg.batch_size % dist.world_size:
        raise ConfigError(f"bestie.batch_size {cfg.batch_size} is not divisible by the {dist.world_size} processes")
    jlog = engine.JsonLog(out_log, rank=dist.rank)
    try:
        return _train(cfg, dataset_cfg, wsss_h5, points_h5, out_checkpoint, dist, jlog, grouping or GroupingParams())
    finally:
        jlog.close()


def _train(cfg: BestieConfig, dataset_cfg: Mapping[str, Any], wsss_h5: Any, points_h5: Any, out_checkpoint: Path,
           dist: engine.DistInfo, jlog: engine.JsonLog, grouping: GroupingParams) -> dict[str, Any]:
    """Build, resume, train, finish (:mod:`bestie.trainer`); the summary of :func:`run`."""
    from bestie import trainer
    from bestie.data import build_dataset
    from bestie.instance_data import BestieTrainDataset, DenseTargets, collate_compact
    from bestie.progress import progress

    dev = dist.device
    partial = partial_checkpoint_path(out_checkpoint)
    dataset = build_dataset(dataset_cfg, dataset_cfg.get("train_split") or None)
    model, ddp_model = _build_model(cfg, dataset.num_classes, dist)
    train_ds = BestieTrainDataset(
        dataset, wsss_h5, points_h5, pseudo=cfg.pseudo_label_params(), crop_size=cfg.crop_size, resize=cfg.resize,
        scales=cfg.scales, mean=list(model.mean), std=list(model.std), seed=cfg.seed, photometric=cfg.photometric,
        flip=cfg.flip,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_amp = bool(cfg.amp) and dev.type == "cuda"
    optimization = trainer.Optimization(optimizer, engine.WarmupPolyLR(optimizer, cfg.warmup_iters, cfg.max_iters,
                                                                       cfg.poly_power),
                                        engine.create_grad_scaler(dev, use_amp))
    loss_fn = _make_loss(cfg).to(dev)
    extra_base = _checkpoint_extra(cfg, model, dataset, grouping)
    start_iter, old_extra = trainer.resume(partial, model, optimizer, optimization.scheduler, optimization.scaler,
                                           _resume_key(cfg))
    best: dict[str, Any] = dict(old_extra.get("best") or {"mAP50": None, "iteration": None})
    if start_iter:
        log.info("resuming from %s at iteration %d", partial, start_iter)
    jlog.begin(start_iter)  # <out_log>.partial until finish(): survives a killed job, a resumed run continues it

    sampler = engine.ResumableSampler(len(train_ds), cfg.seed, rank=dist.rank, world_size=dist.world_size,
                                      global_batch=cfg.batch_size, start_iteration=start_iter, permutation="numpy")
    loader = trainer.make_loader(train_ds, sampler, sampler.local_batch, num_workers=cfg.num_workers, device=dev,
                                 seed=cfg.seed, collate_fn=collate_compact)
    val_ds = _build_val(cfg, dataset_cfg, jlog) if dist.is_main else None
    probe = None
    if dist.is_main and cfg.probe_images:
        from bestie.probe import collate_probe, probe_keys

        probe = collate_probe(DenseTargets(train_ds), probe_keys(len(train_ds), cfg.probe_images))
    jlog.write(event="start", iteration=start_iter, resumed=start_iter > 0, world_size=dist.world_size,
               device=str(dev), num_images=len(train_ds), skipped_empty_labels=train_ds.num_skipped_empty,
               config=to_dict(cfg), model_config=extra_base["model_config"])

    def save_partial(iteration: int) -> None:
        engine.save_checkpoint(partial, model, optimizer, optimization.scheduler, optimization.scaler,
                               iteration=iteration, extra={**extra_base, "kind": "partial", "best": best},
                               rank=dist.rank)

    def validate(iteration: int) -> None:
        _validate_and_keep_best(ddp_model, model, val_ds, cfg, dist, jlog, iteration, best,
                                best_checkpoint_path(out_checkpoint), extra_base, grouping)

    ddp_model.train()
    data_iter = iter(loader)
    records = _TrainRecords(jlog, dist, cfg, sampler.local_batch, optimization.scheduler,
                            lambda: _run_probe(ddp_model, probe, loss_fn, dev, grouping))

    def step(it: int) -> dict[str, torch.Tensor]:
        batch = next(data_iter)
        records.count_batch(batch)
        return train_step(ddp_model, batch, loss_fn, cfg, it, dev, amp=use_amp)

    bar = progress(total=cfg.max_iters, initial=start_iter, desc="bestie", disable=not dist.is_main)
    trainer.train_loop(start_iter, cfg.max_iters, step, optimization, objective="total", log_every=cfg.log_every,
                       on_log=records.write, after_step=records.add, not_guarded=_DIAGNOSTIC_KEYS,
                       periodic=[(cfg.checkpoint_every, save_partial), (cfg.val_every, validate)], bar=bar,
                       guard_at_log=True)
    bar.close()
    validate(cfg.max_iters)
    summary = records.summary(start_iter, out_checkpoint, best, train_ds.num_skipped_empty)
    if dist.is_main:
        summary["probe_final"] = _run_final_probe(ddp_model, train_ds, cfg, loss_fn, dev, grouping)
    trainer.finish(dist, jlog, out_checkpoint, model, cfg.max_iters, {**extra_base, "kind": "last", "best": best},
                   {"event": "end", **summary})
    return summary


def _build_model(cfg: BestieConfig, num_classes: int,
                 dist: engine.DistInfo) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The network on ``dist.device`` (SyncBatchNorm under DDP on GPUs when ``sync_bn``) and its DDP wrapper
    (the network itself for one process). Seeds the RNGs: the same initial weights on every rank, per-rank
    streams (dropout) after."""
    from bestie import trainer
    from bestie.models.instance import BestieNet, convert_sync_batchnorm

    dev = dist.device
    engine.seed_everything(cfg.seed, rank=0)  # same init on every rank (DDP also broadcasts rank 0's)
    model = BestieNet(cfg.backbone, num_classes, cfg.weights, cfg.head, **_model_kwargs(cfg))
    engine.seed_everything(cfg.seed, rank=dist.rank)  # per-rank streams (dropout) from here on
    model.to(dev)
    if dist.is_distributed and dev.type == "cuda" and cfg.sync_bn:
        model = convert_sync_batchnorm(model)
    elif dist.is_distributed and cfg.sync_bn:
        log.warning("SyncBatchNorm needs GPUs: DDP on %s keeps per-process BatchNorm statistics", dev.type)
    return model, trainer.wrap_ddp(model, dist)


def _checkpoint_extra(cfg: BestieConfig, model: torch.nn.Module, dataset: Any,
                      grouping: GroupingParams) -> dict[str, Any]:
    """The ``extra`` every checkpoint of the run carries (module docstring), ``kind`` aside."""
    from bestie.stages.export_pseudo_labels import category_ids

    # class names, dataset category ids and the inference settings of validation travel with every
    # checkpoint, so `bestie predict` needs no config
    return {"model_config": dict(model.config), "mean": list(model.mean), "std": list(model.std),
            "class_names": list(dataset.class_names), "category_ids": category_ids(dataset),
            "inference": to_dict(_inference_config(cfg, grouping)), "train_config": to_dict(cfg),
            # the same config, seed and thread count give the same weights (OMP_NUM_THREADS = the rule's threads)
            "num_threads": torch.get_num_threads(), "resume_key": _resume_key(cfg)}


def _validate_and_keep_best(ddp_model: torch.nn.Module, model: torch.nn.Module, val_ds: Any, cfg: BestieConfig,
                            dist: engine.DistInfo, jlog: engine.JsonLog, iteration: int, best: dict[str, Any],
                            best_path: Path, extra_base: Mapping[str, Any], grouping: GroupingParams) -> None:
    """Validate on rank 0 (a ``val`` record); on a better mAP50 update ``best`` in place and write the best
    checkpoint. The ranks meet afterwards under DDP."""
    if dist.is_main and val_ds is not None:
        res = _validate(ddp_model, val_ds, cfg, dist.device, grouping)
        jlog.write(event="val", iteration=iteration, split=cfg.val_split, **res)
        m = res.get("mAP50")
        if m is not None and (best["mAP50"] is None or m > best["mAP50"]):
            best.update({"mAP50": m, "iteration": iteration})
            engine.save_checkpoint(best_path, model, iteration=iteration,
                                   extra={**extra_base, "kind": "best", "val": res}, rank=0)
    if dist.is_distributed:
        torch.distributed.barrier()


class _TrainRecords:
    """The ``train`` records of the log and the run's counters.

    A record holds the window means of every value of :func:`train_step` (float64 sums on the device,
    averaged over the processes), ``lr`` (the scheduler's, after the window's last step), the pseudo
    instances per image and dropped points of the window's batches (summed over the processes),
    ``sec_per_iter`` and the learning probe's figures.
    """

    def __init__(self, jlog: engine.JsonLog, dist: engine.DistInfo, cfg: BestieConfig, local_batch: int,
                 scheduler: Any, probe: Any) -> None:
        from bestie.trainer import LogWindow

        self.jlog, self.dist, self.cfg, self.local_batch = jlog, dist, cfg, local_batch
        self.scheduler, self.probe = scheduler, probe
        self.window = LogWindow(torch.float64)
        self.instances = self.dropped = 0
        # iterations (of this process, since its start) with refinement / with a refined target
        self.refine_counts = torch.zeros(2, dtype=torch.int64, device=dist.device)
        self.t_last = time.time()
        self.last_probe: dict[str, Any] | None = None

    def count_batch(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Count the batch's pseudo instances and dropped points (CPU tensors of the loader)."""
        self.instances += int(batch["num_instances"].sum())
        self.dropped += int(batch["points_dropped"].sum())

    def add(self, it: int, losses: Mapping[str, torch.Tensor], lr: float) -> None:
        """Add one iteration's values to the window and the refinement counters (no host sync)."""
        self.window.add(losses)
        self.refine_counts += torch.stack([losses["refined"] > 0, losses["refined_pixel_share"] > 0])

    def write(self, done: int, lr: float) -> str:
        """Write the ``train`` record of the window ending at iteration ``done``; the bar's loss text."""
        from bestie.trainer import mean_over_ranks, sum_over_ranks

        n = self.window.n
        rec = mean_over_ranks(self.window.means(sorted(self.window.sums)), self.dist)
        instances, dropped, iters = sum_over_ranks([self.instances, self.dropped, n], self.dist)
        now = time.time()
        probe_rec = self.last_probe = self.probe()
        self.jlog.write(event="train", iteration=done, lr=self.scheduler.get_last_lr()[0],
                        pseudo_instances_per_image=float(instances / max(1.0, iters * self.local_batch)),
                        points_dropped=int(dropped), sec_per_iter=(now - self.t_last) / n, **rec, **probe_rec)
        self.instances = self.dropped = 0
        self.t_last = now
        return f"{rec.get('total', float('nan')):.4f}"

    def summary(self, start_iter: int, out_checkpoint: Path, best: Mapping[str, Any],
                skipped_empty: int) -> dict[str, Any]:
        """The end record and return value of :func:`run`; warns when refinement never produced a target."""
        refine_ran, refine_hit = (int(v) for v in self.refine_counts.tolist())
        cfg = self.cfg
        summary = {"iterations": cfg.max_iters, "resumed_from": start_iter, "checkpoint": str(out_checkpoint),
                   "best_checkpoint": str(best_checkpoint_path(out_checkpoint)) if best["iteration"] is not None
                   else None, "best": best, "skipped_empty_labels": skipped_empty,
                   "refinement": {"iterations_run": refine_ran, "iterations_with_targets": refine_hit},
                   # the last iteration is always logged, so its probe is the final weights' (a run resumed at
                   # max_iters logs nothing and probes here)
                   "probe": self.last_probe if self.last_probe is not None else self.probe()}
        if self.dist.is_main and refine_ran and not refine_hit:
            log.warning("self-refinement ran in %d iterations but never produced a refined target: the centre "
                        "head stayed below center_threshold_refine=%s (the refined terms were 0 and halved the "
                        "pseudo centre/offset losses). Train longer, lower bestie.center_threshold_refine, or set "
                        "bestie.refine_iter later / bestie.refine false.", refine_ran, cfg.center_threshold_refine)
        return summary
