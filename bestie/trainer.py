"""The training skeleton shared by the three trainers (classifier, BESTIE, Mask R-CNN).

In the manner of torchvision's detection references (``references/detection/engine.py``: one loop
helper, the model / data / loss in the training script), a trainer here is:

1. **build**: its own model, data set and loss; :func:`wrap_ddp` and :func:`make_loader` (a loader with its
   own generator over a :class:`bestie.engine.ResumableSampler`);
2. **resume**: :func:`resume` from ``<out_checkpoint>.partial`` when it exists, refusing a state written
   with other settings (:class:`~bestie.errors.ConfigError` naming the differing keys);
3. **train**: :func:`train_loop` runs the iterations: the trainer's step (forward + loss), the NaN / inf
   guard (:func:`bestie.engine.check_finite` per iteration, or :class:`FiniteGuard` on the device, read at
   log time: BESTIE's no-sync step), :meth:`Optimization.step` (backward, optional gradient
   clipping, optimizer, GradScaler and scheduler steps), the trainer's per-iteration bookkeeping, a log
   record every ``log_every`` iterations and at the last one, periodic actions (checkpoint, validation)
   every ``n`` iterations before the last. :class:`LogWindow` keeps the loss sums of a log window on the
   device (no host sync per iteration) and gives their means at log time;
4. **finish**: :func:`finish` writes the final checkpoint, removes the partial one, writes the end record
   and moves the log from ``<log>.partial`` to its place.

Each trainer keeps only what is its own: model, data, loss, and the fields of its log records.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from bestie import engine
from bestie.errors import ConfigError

__all__ = ["wrap_ddp", "make_loader", "resume", "Optimization", "LogWindow", "FiniteGuard", "mean_over_ranks",
           "sum_over_ranks", "train_loop", "finish"]


# ------------------------------------------------------------------------------------------------ build
def wrap_ddp(model: nn.Module, dist: engine.DistInfo) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` when ``dist`` is distributed (device ids only on CUDA), else
    ``model`` itself."""
    if not dist.is_distributed:
        return model
    dev = dist.device
    return nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def make_loader(dataset: torch.utils.data.Dataset, sampler: engine.ResumableSampler, batch_size: int, *,
                num_workers: int, device: torch.device, seed: int,
                collate_fn: Callable | None = None) -> torch.utils.data.DataLoader:
    """The training loader of a trainer: ``batch_size`` samples per process from ``sampler``.

    The loader gets its own ``torch.Generator`` seeded with ``seed``: without one it draws its workers'
    base seed from the global torch RNG (at every epoch start with ``num_workers=0``, once with persistent
    workers), which would shift the model's random draws (dropout, RPN / ROI sampling) between a resumed
    and an uninterrupted run, or between worker counts. Memory is pinned on CUDA; workers persist.
    """
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


# ----------------------------------------------------------------------------------------------- resume
def _stored_resume_key(extra: Mapping[str, Any]) -> Mapping[str, Any]:
    return extra.get("resume_key") or {}


def resume(partial: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
           key: Mapping[str, Any], *, what: str = "settings",
           stored_key: Callable[[Mapping[str, Any]], Mapping[str, Any]] = _stored_resume_key,
           ) -> tuple[int, dict[str, Any]]:
    """Restore the training state of ``partial`` (a :func:`bestie.engine.save_checkpoint` file) when it exists.

    Args:
        partial: ``<out_checkpoint>.partial``.
        model, optimizer, scheduler, scaler: restored in place (RNG states too).
        key: what must be equal for a resumption to give the uninterrupted run's result (settings, input
            file identity); compared with ``stored_key(extra)`` of the partial file.
        what: named in the error ("settings", "settings or pseudo labels", ...).
        stored_key: the key a partial file holds (default: its ``extra["resume_key"]``).

    Returns:
        ``(start_iteration, extra)``; ``(0, {})`` when ``partial`` does not exist.

    Raises:
        ConfigError: the partial file was written with another key (names the file and the differing
            entries).
        ArtifactError: an unreadable partial file, or one that does not fit ``model``.
    """
    if not partial.is_file():
        return 0, {}
    old = dict(stored_key(engine.read_checkpoint(partial).get("extra") or {}))
    if old != dict(key):
        diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
        raise ConfigError(f"{partial}: partial checkpoint of a run with other {what} (differs in: "
                          f"{', '.join(diff) or 'unknown'}); delete it to start afresh")
    info = engine.load_checkpoint(partial, model, optimizer, scheduler, scaler)
    return info["iteration"], info["extra"]


# ------------------------------------------------------------------------------------------------ train
@dataclass
class Optimization:
    """What one training iteration updates: optimizer, iteration scheduler, GradScaler, optional clipping.

    Attributes:
        clip_params, clip_norm: with ``clip_norm > 0`` the gradients of ``clip_params`` are unscaled and
            clipped to that total L2 norm before the optimizer step.
    """

    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    clip_params: Sequence[torch.Tensor] = ()
    clip_norm: float = 0.0

    def step(self, loss: torch.Tensor) -> float:
        """Backward of ``loss`` (scaled), optimizer and GradScaler steps, then one scheduler step.

        Returns:
            The learning rate of the first parameter group used by this step (read before the scheduler
            steps).
        """
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.clip_params, self.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return lr


class LogWindow:
    """Sums of scalar tensors over the iterations of one log window, kept on their device.

    ``add`` costs no host sync; :meth:`means` syncs once per value at log time. ``dtype`` is the type of the
    sums: float64 sums of float32 losses equal Python-float sums exactly; float32 sums round at each step.

    Args:
        dtype: the accumulation type.
    """

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0

    def add(self, values: Mapping[str, torch.Tensor]) -> None:
        """Add one iteration's ``{name: scalar tensor}`` (detached)."""
        for k, v in values.items():
            v = v.detach().to(self.dtype)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n += 1

    def means(self, keys: Iterable[str] | None = None) -> dict[str, float]:
        """``{name: sum / n}`` as Python floats (in ``keys`` order when given, else insertion order), and a
        new window. Raises ZeroDivisionError on an empty window."""
        order = list(self.sums) if keys is None else list(keys)
        out = {k: float(self.sums[k]) / self.n for k in order}
        self.sums, self.n = {}, 0
        return out


class FiniteGuard:
    """The NaN / inf guard without a host sync per iteration: each iteration's losses are checked on their
    device and the first non-finite iteration is remembered there; :meth:`check` (one sync) raises for it.

    :meth:`check` calls :func:`bestie.engine.check_finite` with the values of the first bad iteration, so
    the error names that iteration and its values, as a per-iteration check would.
    """

    def __init__(self) -> None:
        self.names: list[str] | None = None
        self.first_bad: torch.Tensor | None = None  # int64 scalar: -1, or the first non-finite iteration
        self.values: torch.Tensor | None = None  # that iteration's loss values

    def add(self, losses: Mapping[str, torch.Tensor], iteration: int) -> None:
        """Record iteration ``iteration``'s ``{name: scalar tensor}`` (device ops only, no sync)."""
        if not losses:
            return
        values = torch.stack([v.detach().float().reshape(-1).sum() for v in losses.values()])
        if self.first_bad is None:
            self.names = list(losses)
            self.first_bad = torch.full((), -1, dtype=torch.int64, device=values.device)
            self.values = torch.zeros_like(values)
        new = torch.isfinite(values).all().logical_not() & (self.first_bad < 0)
        self.first_bad = torch.where(new, iteration, self.first_bad)
        self.values = torch.where(new, values, self.values)

    def check(self) -> None:
        """Raise TrainingError (through :func:`bestie.engine.check_finite`) when a recorded iteration had a
        non-finite loss; one device sync."""
        if self.first_bad is None:
            return
        bad = int(self.first_bad)
        if bad >= 0:
            engine.check_finite(dict(zip(self.names or [], self.values.cpu().unbind())), bad)


def sum_over_ranks(values: Sequence[float], dist: engine.DistInfo) -> list[float]:
    """Sum scalar values over the processes (float64 all-reduce; identity for one process)."""
    if not dist.is_distributed:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def mean_over_ranks(values: dict[str, float], dist: engine.DistInfo) -> dict[str, float]:
    """Average scalar log values over the processes (:func:`sum_over_ranks` / ``world_size``)."""
    if not dist.is_distributed:
        return values
    return {k: s / dist.world_size for k, s in zip(values, sum_over_ranks(list(values.values()), dist))}


def train_loop(
    start: int,
    max_iters: int,
    step: Callable[[int], Mapping[str, torch.Tensor]],
    optimization: Optimization,
    *,
    objective: str,
    log_every: int,
    on_log: Callable[[int, float], str | None],
    after_step: Callable[[int, Mapping[str, torch.Tensor], float], None] | None = None,
    periodic: Sequence[tuple[int, Callable[[int], None]]] = (),
    not_guarded: Iterable[str] = (),
    bar: Any = None,
    guard_at_log: bool = False,
) -> int:
    """Run iterations ``start .. max_iters - 1`` (0-based) of a trainer.

    Per iteration ``it``: ``losses = step(it)``; :func:`bestie.engine.check_finite` on the losses whose names
    are not in ``not_guarded`` (diagnostics); ``lr = optimization.step(losses[objective])``;
    ``after_step(it, losses, lr)``; the progress bar advances; with ``done = it + 1``: ``on_log(done, lr)``
    when ``done`` is a multiple of ``log_every`` or the last iteration (its return value, when not None, is
    the bar's loss text); then each ``(n, action)`` of ``periodic`` in order: ``action(done)`` when ``n > 0``,
    ``done % n == 0`` and ``done < max_iters`` (the last iteration's state is the final checkpoint's).

    With ``guard_at_log`` the guard runs without a host sync per iteration (:class:`FiniteGuard`): the losses
    are checked on the device and the first bad iteration is reported (its number and values) at the next
    log record or periodic action, before it is written; no iteration then syncs the device except those.

    Returns:
        The iteration count reached (``max(start, max_iters)``).

    Raises:
        TrainingError: a non-finite loss (from the guard; the last periodic checkpoint stays).
    """
    skip = set(not_guarded)
    guard = FiniteGuard() if guard_at_log else None
    for it in range(start, max_iters):
        losses = step(it)
        guarded = {k: v for k, v in losses.items() if k not in skip}
        if guard is None:
            engine.check_finite(guarded, it)
        else:
            guard.add(guarded, it)
        lr = optimization.step(losses[objective])
        if after_step is not None:
            after_step(it, losses, lr)
        done = it + 1
        if bar is not None:
            bar.update(1)
        logs = done % log_every == 0 or done == max_iters
        due = [action for every, action in periodic if every and done % every == 0 and done < max_iters]
        if guard is not None and (logs or due):
            guard.check()
        if logs:
            text = on_log(done, lr)
            if bar is not None and text is not None:
                bar.set_postfix(loss=text, refresh=False)
        for action in due:
            action(done)
    return max(start, max_iters)


# ----------------------------------------------------------------------------------------------- finish
def finish(dist: engine.DistInfo, jlog: engine.JsonLog, out_checkpoint: str | os.PathLike, model: nn.Module,
           iteration: int, extra: Mapping[str, Any], record: Mapping[str, Any] | None = None) -> None:
    """End a training run: the final checkpoint (model only, rank 0, atomic), removal of the partial one,
    the end ``record`` of the log, and the log moved to its place (:meth:`bestie.engine.JsonLog.finish`).

    Under DDP the ranks meet after the checkpoint is written (the partial file goes only then) and at the end.
    """
    engine.save_checkpoint(out_checkpoint, model, iteration=iteration, extra=extra, rank=dist.rank)
    if dist.is_distributed:
        torch.distributed.barrier()
    if dist.is_main:
        engine.partial_checkpoint_path(out_checkpoint).unlink(missing_ok=True)
    if record is not None:
        jlog.write(record)
    jlog.finish()
    if dist.is_distributed:
        torch.distributed.barrier()
