"""TensorBoard event files mirroring a JSON-lines training log (config key ``tensorboard``, off by default).

When the environment variable :data:`ENV_VAR` is ``1`` (the workflow sets it from the top-level config
key ``tensorboard``; ``BESTIE_TENSORBOARD=1 bestie train-... `` does the same by hand),
:class:`bestie.engine.JsonLog` hands every record it writes to a :class:`TensorBoardLog` as well. The
event files (``torch.utils.tensorboard.SummaryWriter`` of the ``tensorboard`` package) go to
``<log stem>.tensorboard/`` next to the log, e.g. ``results/demo/bestie/train_log.tensorboard/``, so
``tensorboard --logdir results/`` shows every stage of every run.

Mapping of a record to scalars: the step is the record's ``iteration`` (else ``step``, ``epoch``, else
a running count); the wall time its ``time``; every other top-level field holding a finite int or float
(not a bool) becomes the scalar ``<event>/<field>``, with ``<event>`` the record's ``event`` field
(``train`` when it has none). Strings, lists, dicts and non-finite values are skipped. A fresh log (the
JSON file absent or empty when opened) clears the event files of an earlier run in that folder; a
resumed run (appending to its log) adds to them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bestie.errors import ConfigError

__all__ = ["ENV_VAR", "TensorBoardLog", "tensorboard_dir", "tensorboard_for"]

#: Environment variable that switches the mirror on ("1") or off (anything else, or unset).
ENV_VAR = "BESTIE_TENSORBOARD"

_STEP_KEYS = ("iteration", "step", "epoch")
_SKIP = {"time", "event", *_STEP_KEYS}


def tensorboard_dir(log_path: str | os.PathLike) -> Path:
    """``train_log.jsonl`` -> ``train_log.tensorboard``: the event folder of a JSON-lines log."""
    p = Path(log_path)
    return p.with_name(f"{p.stem}.tensorboard")


class TensorBoardLog:
    """Scalars of JSON-log records as TensorBoard events (module docstring).

    Args:
        log_path: the JSON-lines log being mirrored; the events go to :func:`tensorboard_dir` of it.

    Raises:
        ConfigError: the ``tensorboard`` package is not installed.
    """

    def __init__(self, log_path: str | os.PathLike) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError(f"tensorboard: true (or {ENV_VAR}=1) needs the tensorboard package "
                              f"(pip install tensorboard): {exc}") from exc
        log_path = Path(log_path)
        self.dir = tensorboard_dir(log_path)
        if self.dir.is_dir() and (not log_path.exists() or log_path.stat().st_size == 0):
            for f in self.dir.glob("events.out.tfevents.*"):
                f.unlink()
        self._writer = SummaryWriter(log_dir=str(self.dir))
        self._count = 0

    def write(self, record: Mapping[str, Any]) -> int:
        """Add the record's scalars; returns how many were added."""
        step = next((record[k] for k in _STEP_KEYS if _is_number(record.get(k))), None)
        step = int(step) if step is not None else self._count
        self._count += 1
        prefix = str(record.get("event") or "train")
        walltime = float(record["time"]) if _is_number(record.get("time")) else None
        n = 0
        for key, value in record.items():
            if key in _SKIP or not _is_number(value) or not math.isfinite(float(value)):
                continue
            self._writer.add_scalar(f"{prefix}/{key}", float(value), step, walltime=walltime)
            n += 1
        if n:
            self._writer.flush()
        return n

    def close(self) -> None:
        """Flush and close the event file (idempotent)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def tensorboard_for(log_path: str | os.PathLike) -> TensorBoardLog | None:
    """A :class:`TensorBoardLog` for ``log_path`` when :data:`ENV_VAR` is ``"1"``, else None.

    Raises:
        ConfigError: switched on but the ``tensorboard`` package is missing.
    """
    if os.environ.get(ENV_VAR) != "1":
        return None
    return TensorBoardLog(log_path)
