"""Shared pieces of the training loops (classifier, BESTIE, Mask R-CNN), torchvision-references style.

- :func:`init_distributed`: DDP under ``torchrun`` (env ``RANK`` / ``WORLD_SIZE``), else one process.
- :func:`seed_everything`, :func:`save_checkpoint` / :func:`load_checkpoint`: atomic, ``weights_only``
  loadable checkpoints carrying model, optimizer, scheduler, GradScaler, iteration, RNG states (python,
  numpy, torch, CUDA) and a free ``extra`` dict, so a killed run resumes exactly.
- :class:`ResumableSampler` (the one sampler of the three trainers) + :func:`infinite_loader`: a data order
  that depends only on (seed, epoch), can start in the middle of an epoch (or, as one stream of epochs, at
  any iteration), and hands each sample its own augmentation seed (:func:`sample_rng`), so resumed and
  uninterrupted runs see identical batches regardless of worker count.
- :func:`check_finite`: the NaN / inf guard; :class:`JsonLog`: one JSON object per line, in a side file
  (:func:`partial_log_path`) that survives a killed job and that a resumed run continues.
- :class:`WarmupPolyLR`, :class:`WarmupMultiStepLR`: iteration-based schedules whose state dicts hold
  plain numbers only (torch's ``MultiStepLR`` stores a ``Counter``, which ``weights_only`` refuses).
- :func:`autocast_context`, :func:`create_grad_scaler`: AMP on CUDA (bf16 where supported, else fp16 with
  a GradScaler), nothing on CPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from bestie.errors import ArtifactError, ConfigError, TrainingError

__all__ = [
    "DistInfo",
    "resolve_device",
    "init_distributed",
    "unwrap_model",
    "seed_everything",
    "rng_state",
    "set_rng_state",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "partial_checkpoint_path",
    "check_finite",
    "JsonLog",
    "partial_log_path",
    "WarmupPolyLR",
    "WarmupMultiStepLR",
    "ResumableSampler",
    "PERMUTATIONS",
    "infinite_loader",
    "sample_rng",
    "autocast_context",
    "amp_dtype",
    "create_grad_scaler",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


# --------------------------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistInfo:
    """Process placement: ``rank`` / ``world_size`` (1 when not distributed), ``local_rank``, ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_distributed: bool

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that writes files and logs)."""
        return self.rank == 0


def resolve_device(device: str | torch.device | None, who: str = "bestie") -> torch.device:
    """The device a stage runs on: ``device`` when given, else ``cuda`` when CUDA is available, else ``cpu``.

    Args:
        device: ``None`` / ``""`` (choose), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``, or a ``torch.device``.
        who: the stage, named in the errors.

    Raises:
        ConfigError: an unparsable or unsupported device, ``cuda`` without CUDA, or a GPU index that does
            not exist here.
    """
    try:
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"{who}: bad device {device!r} (use cpu, cuda or cuda:N): {exc}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{who}: device {device!r} requested but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{who}: device {device!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    elif dev.type != "cpu":
        raise ConfigError(f"{who}: unsupported device {device!r} (use cpu, cuda or cuda:N)")
    return dev


def init_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Initialise ``torch.distributed`` when launched by ``torchrun``, else describe a single process.

    Under torchrun (env ``RANK`` and ``WORLD_SIZE`` set) the default process group is created with NCCL
    on CUDA and Gloo on CPU (``init_method="env://"``) unless one exists already; the device is
    ``cuda:LOCAL_RANK`` (and made current) when CUDA is available. A plain ``python`` launch gives rank 0
    of 1 on ``device`` (default ``cuda`` if available, else ``cpu``).

    Args:
        device: force a device type (``"cpu"`` / ``"cuda"``); under torchrun the CUDA index is always
            LOCAL_RANK.
    """
    want = torch.device(device) if device is not None else None
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        use_cuda = torch.cuda.is_available() and (want is None or want.type == "cuda")
        dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
        if not _dist_ready():
            torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
        return DistInfo(rank, world, local, dev, True)
    return DistInfo(0, 1, 0, resolve_device(want, "init_distributed"), False)


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (else ``model``)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


# ---------------------------------------------------------------------------------------------------- RNG
def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy (global), torch and CUDA RNGs with ``seed + rank``."""
    s = int(seed) + int(rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(s)


def rng_state() -> dict[str, Any]:
    """All global RNG states as tensors / plain types (loadable with ``torch.load(weights_only=True)``)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only when CUDA is available and stored)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            log.warning("checkpoint holds %d CUDA RNG states for %d devices: not restored",
                        len(cuda_states), torch.cuda.device_count())


# ------------------------------------------------------------------------------------------ checkpoints
PARTIAL_SUFFIX = ".partial"


def partial_checkpoint_path(out_checkpoint: str | os.PathLike) -> Path:
    """The resumable training state of a run that writes ``out_checkpoint``: ``<out_checkpoint>.partial``.

    One convention for every training stage (classifier, BESTIE, Mask R-CNN): ``pam.pt`` ->
    ``pam.pt.partial``, ``model.pt`` -> ``model.pt.partial``. The name does not end in ``.pt``, so a glob
    for finished checkpoints (``*.pt``) never picks up an unfinished one. The file lives next to the final
    checkpoint, so two runs writing different outputs in one working directory never share it.
    """
    p = Path(out_checkpoint)
    return p.with_name(p.name + PARTIAL_SUFFIX)


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    iteration: int = 0,
    extra: Mapping[str, Any] | None = None,
    rank: int | None = None,
) -> None:
    """Write a checkpoint atomically (rank 0 only; other ranks return at once).

    Content: ``{"format": 1, "model": state dict (DDP unwrapped), "optimizer", "scheduler", "scaler"
    (state dicts or None), "iteration": int, "extra": dict, "rng": rng_state()}``. Everything is a tensor
    or a plain python value, so :func:`load_checkpoint` can use ``weights_only=True``: ``extra`` may hold
    str / int / float / bool / None / lists / tuples / dicts with str keys / tensors; numpy scalars and
    arrays become Python numbers and tensors, paths become strings.

    Args:
        rank: process rank (default: ``torch.distributed`` rank when initialised, else 0).

    Raises:
        ArtifactError: the file cannot be written.
        TypeError: ``extra`` holds another type (named with its key), which ``weights_only`` would refuse.
    """
    if rank is None:
        rank = torch.distributed.get_rank() if _dist_ready() else 0
    if rank != 0:
        return
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "iteration": int(iteration),
        "extra": _plain_extra(dict(extra or {}), "extra"),
        "rng": rng_state(),
    }
    from bestie.io.atomic import atomic_path

    path = Path(path)
    try:
        # through a file object: torch.save names the zip's folder after a path it is given (here the
        # random temp name), so the same state would give different bytes on every run
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            torch.save(state, fh)
    except ArtifactError:
        raise
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot write checkpoint: {exc}") from exc


def _plain_extra(value: Any, key: str) -> Any:
    """``value`` with numpy / path objects converted to types ``torch.load(weights_only=True)`` accepts."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        items = [_plain_extra(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"checkpoint {key}: key {k!r} is not a string")
            out[k] = _plain_extra(v, f"{key}.{k}")
        return out
    raise TypeError(f"checkpoint {key}: a {type(value).__name__} cannot be loaded with weights_only=True")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file with ``torch.load(map_location="cpu", weights_only=True)``.

    Raises:
        ArtifactError: the file does not exist, cannot be unpickled safely, or is not a dict with
            ``"model"`` (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, unsafe pickle, ...: all mean "unusable checkpoint"
        raise ArtifactError(f"checkpoint {path} is corrupt or not loadable with weights_only=True: {exc}") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise ArtifactError(f"checkpoint {path}: expected a dict with a 'model' state dict")
    return state


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint` into the given objects.

    The model state is loaded strictly (into the DDP-unwrapped module); optimizer, scheduler and scaler
    only when both the object and its stored state exist; RNG states when ``restore_rng``.

    Returns:
        ``{"iteration": int, "extra": dict}``.

    Raises:
        ArtifactError: unreadable file, or a model state that does not fit ``model`` (names the file).
    """
    state = read_checkpoint(path)
    if model is not None:
        try:
            unwrap_model(model).load_state_dict(state["model"], strict=True)
        except RuntimeError as exc:
            raise ArtifactError(f"checkpoint {path} does not fit the model: {exc}") from exc
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if restore_rng and state.get("rng") is not None:
        set_rng_state(state["rng"])
    return {"iteration": int(state.get("iteration", 0)), "extra": dict(state.get("extra") or {})}


# ----------------------------------------------------------------------------------------- guards, logs
def check_finite(losses: Mapping[str, torch.Tensor], iteration: int) -> None:
    """Raise when any loss is NaN or inf (one device sync for all of them).

    Args:
        losses: ``{name: scalar tensor}``.
        iteration: current iteration, reported in the message.

    Raises:
        TrainingError: naming the iteration and every loss value, e.g.
            ``"non-finite loss at iteration 12: seg=0.4123, center=nan"``.
    """
    if not losses:
        return
    values = torch.stack([v.detach().float().reshape(-1).sum() for v in losses.values()])
    if bool(torch.isfinite(values).all()):
        return
    vals = values.cpu().tolist()
    text = ", ".join(f"{k}={v:.6g}" for k, v in zip(losses, vals))
    raise TrainingError(f"non-finite loss at iteration {iteration}: {text}")


def partial_log_path(out_log: str | os.PathLike) -> Path:
    """Where a resumable run writes its JSON-lines log until it finishes: ``<out_log>.partial``.

    The convention of :func:`partial_checkpoint_path` for logs (``train_log.jsonl`` ->
    ``train_log.jsonl.partial``). The file is not a workflow output, so Snakemake never deletes it when a
    job fails or is killed: a resumed run continues it, and :meth:`JsonLog.finish` moves it to ``out_log``.
    """
    p = Path(out_log)
    return p.with_name(p.name + PARTIAL_SUFFIX)


class JsonLog:
    """Append-only JSON-lines log: one object per :meth:`write`, flushed at once (rank 0 only).

    With ``BESTIE_TENSORBOARD=1`` (config key ``tensorboard``) each record's scalars also go to TensorBoard
    event files next to the log (:mod:`bestie.tensorboard_log`).

    Two modes:

    - plain (``start_iteration=None``, no :meth:`begin`): lines are appended to ``path`` itself;
    - resumable (``start_iteration`` given, or :meth:`begin` called before the first write): lines go to
      :func:`partial_log_path` (``<path>.partial``), which survives a failed or killed job, and
      :meth:`finish` moves it to ``path`` once training has ended. ``begin(0)`` (a fresh run) empties the
      history; ``begin(t)`` with ``t > 0`` (a run resumed from the checkpoint of iteration ``t``) keeps
      the records up to iteration ``t``, drops the later ones (the killed run logged them after its last
      checkpoint; this run logs them again) and a torn last line, and appends a record
      ``{"event": "resume", "iteration": t, "dropped": k}``. So the finished log holds every logged
      iteration exactly once, however often the run was killed.

    A record's iteration is its ``"iteration"`` field; records without one are always kept.

    Args:
        path: the log file (parents are created when the first line is written).
        rank: process rank; other ranks write nothing.
        start_iteration: the iteration training starts at: resumable mode (see above).
    """

    def __init__(self, path: str | os.PathLike, rank: int = 0, start_iteration: int | None = None) -> None:
        self.path = Path(path)
        self.enabled = rank == 0
        self._fh = None
        self._tb = None
        if self.enabled:
            from bestie.tensorboard_log import tensorboard_for

            self._tb = tensorboard_for(self.path)  # TensorBoard mirror, None unless switched on
        self._target = self.path
        self.resumable = False
        if start_iteration is not None:
            self.begin(start_iteration)

    def begin(self, start_iteration: int) -> None:
        """Switch to resumable mode for a run that starts at ``start_iteration`` (see the class docstring).

        Raises:
            RuntimeError: a line was written already in plain mode.
            ArtifactError: the partial log cannot be rewritten.
        """
        if self._fh is not None and not self.resumable:
            raise RuntimeError(f"JsonLog {self.path}: begin() must come before the first write")
        self.resumable = True
        self._target = partial_log_path(self.path)
        if not self.enabled:
            return
        if self._fh is not None:  # the file only: the TensorBoard mirror stays open
            self._fh.close()
            self._fh = None
        start = int(start_iteration)
        kept: list[str] = []
        dropped = 0
        if start > 0 and self._target.is_file():
            for line in self._target.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line torn by the kill
                    dropped += 1
                    continue
                it = rec.get("iteration") if isinstance(rec, dict) else None
                if isinstance(it, (int, float)) and it > start:
                    dropped += 1
                    continue
                kept.append(line)
        from bestie.io.atomic import atomic_write

        with atomic_write(self._target, "w", encoding="utf-8") as f:
            f.write("".join(f"{line}\n" for line in kept))
        self._fh = open(self._target, "a", encoding="utf-8")
        if start > 0:
            self.write(event="resume", iteration=start, dropped=dropped)

    def write(self, record: Mapping[str, Any] | None = None, **fields: Any) -> None:
        """Append ``record`` merged with ``fields``; tensors / numpy scalars become numbers, NaN/inf become
        strings (so each line stays valid JSON); ``"time"`` (unix seconds) is added when absent."""
        if not self.enabled:
            return
        if self._fh is None:
            self._target.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self._target, "a", encoding="utf-8")
        obj = {**(record or {}), **fields}
        obj.setdefault("time", time.time())
        plain = {k: _plain(v) for k, v in obj.items()}
        self._fh.write(json.dumps(plain) + "\n")
        self._fh.flush()
        if self._tb is not None:
            self._tb.write(plain)

    def close(self) -> None:
        """Close the file and the TensorBoard mirror (idempotent); a resumable log stays at
        ``<path>.partial`` until :meth:`finish`."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def finish(self) -> None:
        """Close, and in resumable mode move ``<path>.partial`` to ``path`` (atomic ``os.replace``).

        Call once training has ended successfully; a failed run leaves the partial log for its resumption.
        """
        fh = self._fh
        if fh is not None:
            fh.flush()
            os.fsync(fh.fileno())
        self.close()
        if self.enabled and self.resumable and self._target.is_file():
            os.replace(self._target, self.path)

    def __enter__(self) -> "JsonLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


# ----------------------------------------------------------------------------------------- schedulers
class _IterScheduler(torch.optim.lr_scheduler.LRScheduler):
    """Base: lr of group i = ``base_lrs[i] * factor(last_epoch)``; ``last_epoch`` counts iterations."""

    def factor(self, it: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()


#: lr factor at iteration 0 of a linear warm-up (torchvision's detection reference)
WARMUP_FACTOR = 0.001


class WarmupPolyLR(_IterScheduler):
    """Linear warm-up from ``warmup_factor`` to 1 over ``warmup_iters``, then ``(1 - t/max_iters)^power``.

    Call ``step()`` once per iteration (after ``optimizer.step()``). Factor at iteration ``t``:
    ``warmup_factor + (1 - warmup_factor) * t / warmup_iters`` for ``t < warmup_iters``, else
    ``(1 - t / max_iters) ** power`` (0 from ``max_iters`` on). METHOD.md section 4 (warm-up 2000, power 0.9).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_iters: int, max_iters: int, power: float = 0.9,
                 warmup_factor: float = WARMUP_FACTOR, last_epoch: int = -1) -> None:
        if max_iters < 1 or warmup_iters < 0:
            raise ValueError(
                f"WarmupPolyLR: need max_iters >= 1 and warmup_iters >= 0, got {max_iters}, {warmup_iters}")
        self.warmup_iters = int(warmup_iters)
        self.max_iters = int(max_iters)
        self.power = float(power)
        self.warmup_factor = float(warmup_factor)
        super().__init__(optimizer, last_epoch)

    def factor(self, it: int) -> float:
        if it < self.warmup_iters:
            return self.warmup_factor + (1.0 - self.warmup_factor) * it / self.warmup_iters
        return max(0.0, 1.0 - it / self.max_iters) ** self.power


class WarmupMultiStepLR(_IterScheduler):
    """Multiply the lr by ``gamma`` at each iteration of ``milestones`` (after an optional linear warm-up).

    Factor at iteration ``t``: ``gamma ** #{m in milestones: m <= t}`` (times the warm-up ramp for
    ``t < warmup_iters``). Used for the classifier's "lr / 10 at epochs 5 and 10" (METHOD.md section 1).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, milestones: Sequence[int], gamma: float = 0.1,
                 warmup_iters: int = 0, warmup_factor: float = WARMUP_FACTOR, last_epoch: int = -1) -> None:
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = float(warmup_factor)
        super().__init__(optimizer, last_epoch)

    def factor(self, it: int) -> float:
        f = self.gamma ** sum(1 for m in self.milestones if m <= it)
        if it < self.warmup_iters:
            f *= self.warmup_factor + (1.0 - self.warmup_factor) * it / self.warmup_iters
        return f


# ---------------------------------------------------------------------------------------------- data
#: How :class:`ResumableSampler` permutes the indices of an epoch (both depend only on ``(seed, epoch)``):
#: ``"torch"``: ``torch.randperm`` with ``torch.Generator().manual_seed(seed + epoch)`` (the classifier and
#: Mask R-CNN trainers); ``"numpy"``: ``numpy.random.default_rng((seed, epoch)).permutation`` (BESTIE). Each
#: trainer keeps the order it had, so its weights, and a partial checkpoint that a run resumes, stay valid.
PERMUTATIONS = ("torch", "numpy")


def sample_rng(key: Any, seed: int) -> np.random.Generator:
    """Augmentation generator of one sample: ``np.random.default_rng((seed, epoch, index))``.

    ``key`` is what :class:`ResumableSampler` yields, ``(index, epoch)``; a plain int index gives
    ``(seed, 0, index)``.
    """
    if isinstance(key, (tuple, list)):
        index, epoch = int(key[0]), int(key[1])
    else:
        index, epoch = int(key), 0
    return np.random.default_rng((int(seed), epoch, index))


class ResumableSampler(torch.utils.data.Sampler):
    """The trainers' sample order: depends only on ``(seed, epoch)``, sharded over DDP ranks, resumable.

    Yields ``(index, epoch)`` keys (a map-style dataset receives them in ``__getitem__`` and draws its
    augmentation from :func:`sample_rng`). Each epoch visits ``0..n-1`` once, permuted as
    :data:`PERMUTATIONS` says (``shuffle`` off: in order). Two layouts of the epochs:

    - **per epoch** (``global_batch=None``; classifier, Mask R-CNN; driven by :func:`infinite_loader`): the
      epoch is padded (repeating its start) to a multiple of ``world_size`` and split round-robin as
      ``DistributedSampler`` does; :meth:`set_epoch` selects it, :meth:`set_start` skips the first samples
      of this rank's share (resume in the middle of an epoch without loading them). Finite (``len``).
    - **stream** (``global_batch=B``; BESTIE): the epochs concatenated without padding; iteration ``t``
      takes stream positions ``t * B .. (t + 1) * B - 1`` and rank ``r`` the ``r``-th contiguous slice of
      ``B / world_size`` of them. So the global batch of an iteration is the same for any number of
      processes, and a sampler made with ``start_iteration=t`` continues an uninterrupted run's batches.
      Infinite; load it with ``batch_size=`` :attr:`local_batch`.

    Args:
        n: dataset length (>= 1).
        seed: order seed (same on every rank).
        shuffle: False keeps ``0..n-1``.
        rank, world_size: this process's shard.
        global_batch: None for the per-epoch layout, else ``B`` (divisible by ``world_size``).
        start_iteration: stream layout: the first iteration yielded.
        permutation: one of :data:`PERMUTATIONS`.

    Raises:
        ValueError: an empty dataset.
        ConfigError: ``global_batch`` not a positive multiple of ``world_size``, a rank outside
            ``0..world_size-1``, or an unknown ``permutation``.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1, *,
                 global_batch: int | None = None, start_iteration: int = 0, permutation: str = "torch") -> None:
        if n < 1:
            raise ValueError("ResumableSampler: the dataset is empty")
        if permutation not in PERMUTATIONS:
            raise ConfigError(f"ResumableSampler: permutation must be one of {PERMUTATIONS}, got {permutation!r}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"ResumableSampler: rank {rank} outside 0..{world_size - 1}")
        if global_batch is not None and (global_batch < 1 or global_batch % world_size):
            raise ConfigError(f"batch size {global_batch} is not divisible by the {world_size} processes")
        self.n = int(n)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.permutation = permutation
        self.global_batch = None if global_batch is None else int(global_batch)
        self.local_batch = None if global_batch is None else self.global_batch // self.world_size
        self.start_iteration = int(start_iteration)
        self.epoch = 0
        self.start = 0
        self.per_rank = -(-self.n // self.world_size)
        self._cached: tuple[int, list[int]] | None = None

    def epoch_order(self, epoch: int) -> list[int]:
        """The indices of ``epoch`` in visiting order, before sharding (the last epoch asked is cached)."""
        if self._cached is None or self._cached[0] != epoch:
            if not self.shuffle:
                order = list(range(self.n))
            elif self.permutation == "torch":
                order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            else:
                order = np.random.default_rng((self.seed, epoch)).permutation(self.n).tolist()
            self._cached = (epoch, order)
        return self._cached[1]

    # ------------------------------------------------------------------ per-epoch layout
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order is produced next (resets :meth:`set_start`)."""
        self.epoch = int(epoch)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of this rank's share of the current epoch."""
        self.start = max(0, int(start))

    def _shard(self) -> list[int]:
        order = self.epoch_order(self.epoch)
        total = self.per_rank * self.world_size
        order = (order * (-(-total // self.n)))[:total]
        return order[self.rank::self.world_size]

    # ------------------------------------------------------------------ stream layout
    def keys_for_iteration(self, iteration: int) -> list[tuple[int, int]]:
        """Stream layout: this rank's ``(index, epoch)`` keys of ``iteration``."""
        if self.local_batch is None:
            raise ConfigError("ResumableSampler.keys_for_iteration needs the stream layout (global_batch)")
        first = iteration * self.global_batch + self.rank * self.local_batch
        keys = []
        for pos in range(first, first + self.local_batch):
            epoch, k = divmod(pos, self.n)
            keys.append((self.epoch_order(epoch)[k], epoch))
        return keys

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.global_batch is None:
            epoch = self.epoch
            for idx in self._shard()[self.start:]:
                yield idx, epoch
            return
        t = self.start_iteration
        while True:
            yield from self.keys_for_iteration(t)
            t += 1

    def __len__(self) -> int:
        if self.global_batch is not None:
            raise TypeError("ResumableSampler: the stream layout is infinite")
        return max(0, self.per_rank - self.start)


def infinite_loader(loader: torch.utils.data.DataLoader, sampler: Any = None, start_iteration: int = 0,
                    iters_per_epoch: int | None = None) -> Iterator[Any]:
    """Yield batches forever, epoch after epoch, starting at iteration ``start_iteration``.

    Before each epoch ``sampler.set_epoch(epoch)`` is called (when it has one). To resume, the epoch is
    ``start_iteration // iters_per_epoch`` and its first ``start_iteration % iters_per_epoch`` batches are
    skipped: by :meth:`ResumableSampler.set_start` (no data loaded) when the sampler has it, else by
    drawing and discarding batches.

    For an exact resume the loader must not consume the global torch RNG: build it with its own
    ``generator=torch.Generator()`` (a DataLoader without one draws a base seed from the global RNG at
    every epoch start, so a resumed run, which starts one more iterator, would shift e.g. dropout).

    Args:
        loader: a finite DataLoader (one pass = one epoch).
        sampler: the loader's sampler (needed for epochs and cheap resume).
        start_iteration: global iteration of the first yielded batch.
        iters_per_epoch: batches per full epoch (default ``len(loader)`` at the start of an epoch).
    """
    ipe = int(iters_per_epoch) if iters_per_epoch is not None else None
    if ipe is None:
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(0)
        ipe = len(loader)
    if ipe < 1:
        raise ValueError("infinite_loader: the loader yields no batch per epoch")
    epoch, skip = divmod(int(start_iteration), ipe)
    while True:
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        drop = 0
        if skip:
            if sampler is not None and hasattr(sampler, "set_start"):
                sampler.set_start(skip * int(loader.batch_size or 1))
            else:
                drop = skip
        for i, batch in enumerate(loader):
            if i >= drop:
                yield batch
        skip = 0
        epoch += 1


# ------------------------------------------------------------------------------------------------ AMP
def amp_dtype(device: str | torch.device) -> torch.dtype | None:
    """Autocast dtype on ``device``: bfloat16 on CUDA where supported, else float16; None on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast_context(device: str | torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on CUDA with :func:`amp_dtype` when ``enabled``; a no-op context otherwise."""
    dtype = amp_dtype(device)
    if not enabled or dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def create_grad_scaler(device: str | torch.device, enabled: bool = True) -> torch.amp.GradScaler:
    """A GradScaler that is active only for CUDA float16 autocast (bf16 and CPU need none).

    The returned scaler is always usable: disabled, ``scale(loss)`` returns ``loss`` and ``step`` calls
    ``optimizer.step()``.
    """
    active = bool(enabled) and amp_dtype(device) == torch.float16
    return torch.amp.GradScaler("cuda", enabled=active)
