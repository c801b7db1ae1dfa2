"""Progress reports that suit where they go: a tqdm bar on a terminal, plain lines in a log file.

A tqdm bar written to a file (the workflow's ``results/<run>/logs/*.log``) becomes one line of thousands
of carriage-return states. :func:`progress` therefore returns a tqdm bar only when the stream is a
terminal; otherwise a :class:`LogProgress` that logs one plain line each time another ``every`` percent
of the total is done (and at the end), with the rate and the time left::

    bestie.progress: classifier pam: 120/400 (30%), 3.21 it/s, ETA 1m27s, loss=0.4123

Under the workflow, a log-file report also reaches the terminal that runs Snakemake: every rule's command
starts with ``BESTIE_RULE=<rule>`` and ``3>&2`` (``workflow/rules/common.smk``, ``launcher()``), so file
descriptor 3 is Snakemake's own stderr while 1 and 2 go to the rule's log. A :class:`LogProgress` then
also writes its current line there, prefixed with the rule's name, every ``TERMINAL_INTERVAL`` seconds
and at the end::

    [train_bestie] bestie: 300/1500 (20%), 1.93 it/s, ETA 10m22s, total=0.8123

Under SLURM, descriptor 3 is the job's own stderr (the executor's job log). Processes that torchrun
starts do not inherit it; they report to their log only.

Both offer what the stages use of tqdm: iteration, ``update(n)``, ``set_postfix(**values)``,
``close()`` and use as a context manager::

    with progress(total=max_iters, initial=start, desc="bestie") as bar:
        for it in range(start, max_iters):
            ...
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")

    for img_id in progress(ids, desc="predict"):
        ...
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import IO, Any, Iterable, Iterator

__all__ = ["progress", "LogProgress", "format_seconds", "DEFAULT_EVERY", "TERMINAL_INTERVAL", "terminal_fd"]

log = logging.getLogger(__name__)

#: percent of the total between two log lines
DEFAULT_EVERY = 10.0
#: seconds between two log lines when the total is unknown
UNKNOWN_TOTAL_INTERVAL = 60.0
#: seconds between two lines on the workflow's terminal (a few a minute)
TERMINAL_INTERVAL = 20.0
#: environment variable naming the running rule (set by the workflow's launcher)
RULE_ENV = "BESTIE_RULE"
#: the file descriptor the workflow opens on its own stderr for each job
TERMINAL_FD = 3


def _identity(fd: int) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of what descriptor ``fd`` refers to, or ``None`` when it is not open."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


#: what descriptor 3 referred to when this module was first imported (``bestie/__init__.py`` imports it,
#: so before any stage opens a file). When the launcher did not open descriptor 3 (a rule's command run by
#: hand without ``3>&2``, an executor that closes it), the first file a stage opens gets the number 3; it
#: must not receive progress lines (they would corrupt an artifact such as the training's JSONL log).
_TERMINAL_AT_IMPORT = _identity(TERMINAL_FD)


def terminal_fd() -> int | None:
    """The descriptor for progress lines on the workflow's terminal, or ``None``.

    It is :data:`TERMINAL_FD` when :data:`RULE_ENV` is set, the descriptor was already open when the
    package was imported and still refers to the same object (not a file the process opened since, which
    took the free number), and it is not the file stderr already writes to (which would print every line
    twice).
    """
    if not os.environ.get(RULE_ENV):
        return None
    now, err = _identity(TERMINAL_FD), _identity(2)
    if now is None or now != _TERMINAL_AT_IMPORT or now == err:
        return None
    return TERMINAL_FD


def format_seconds(seconds: float) -> str:
    """``93`` -> ``"1m33s"``, ``4000`` -> ``"1h06m"``, ``5.2`` -> ``"5s"``; ``"?"`` for an unknown time."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class LogProgress:
    """Progress as log lines (INFO on the ``bestie.progress`` logger) every ``every`` percent.

    Args:
        iterable: what to iterate over (optional: use :meth:`update` without one).
        total: number of steps (default ``len(iterable)`` when it has one).
        desc: the name at the start of each line.
        initial: steps already done (a resumed run): rates and ETAs count from here.
        every: percent of ``total`` between lines (the last step always logs).
        disable: report nothing (e.g. on ranks other than 0).
    """

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
                 initial: int = 0, every: float = DEFAULT_EVERY, disable: bool = False) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        if every <= 0:
            raise ValueError(f"LogProgress: every must be > 0 percent, got {every}")
        self.iterable = iterable
        self.total = int(total) if total is not None else None
        self.desc = desc
        self.n = int(initial)
        self.initial = int(initial)
        self.every = float(every)
        self.disable = bool(disable)
        self.postfix: dict[str, Any] = {}
        self.lines: list[str] = []  # every line logged (for tests and callers that want them)
        self._t0 = time.monotonic()
        self._last_bucket = self._bucket(self.n)
        self._last_time = self._t0
        self._closed = False
        self._final_logged = False
        self._terminal = None if self.disable else terminal_fd()
        self._last_echo = self._t0

    def _bucket(self, n: int) -> int:
        if not self.total:
            return 0
        return int(100.0 * n / self.total // self.every)

    def line(self) -> str:
        """The current progress line (what is logged)."""
        elapsed = time.monotonic() - self._t0
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else float("nan")
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            left = (self.total - self.n) / rate if rate and rate == rate and rate > 0 else float("nan")
            text = f"{head}{self.n}/{self.total} ({100.0 * self.n / self.total:.0f}%)"
            text += f", {_rate(rate)}, ETA {format_seconds(left)}"
        else:
            text = f"{head}{self.n} done, {_rate(rate)}, {format_seconds(elapsed)} elapsed"
        if self.postfix:
            text += ", " + ", ".join(f"{k}={v}" for k, v in self.postfix.items())
        return text

    def _emit(self) -> None:
        text = self.line()
        self.lines.append(text)
        log.info("%s", text)

    def _echo(self, final: bool = False) -> None:
        """Write the current line to the workflow's terminal (at most every TERMINAL_INTERVAL s, and at the end)."""
        if self._terminal is None:
            return
        now = time.monotonic()
        if not final and now - self._last_echo < TERMINAL_INTERVAL:
            return
        self._last_echo = now
        try:
            os.write(self._terminal, f"[{os.environ.get(RULE_ENV)}] {self.line()}\n".encode())
        except OSError:  # the terminal went away: keep training, report to the log only
            self._terminal = None

    def update(self, n: int = 1) -> None:
        """Count ``n`` more steps; log a line when another ``every`` percent is done, or at the total."""
        self.n += int(n)
        if self.disable:
            return
        if self.total:
            if self._final_logged:
                return
            if self.n >= self.total:
                self._final_logged = True
                self._emit()
                self._echo(final=True)
                return
            self._echo()
            bucket = self._bucket(self.n)
            if bucket > self._last_bucket:
                self._last_bucket = bucket
                self._emit()
        else:
            now = time.monotonic()
            if now - self._last_time >= UNKNOWN_TOTAL_INTERVAL:
                self._last_time = now
                self._emit()
            self._echo()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **values: Any) -> None:
        """Values shown at the end of the next line (tqdm's signature; ``refresh`` is ignored)."""
        self.postfix = {**(ordered_dict or {}), **values}

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        """End the report: an unknown-total run logs its final count (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if not self.disable and not self.total and self.n > self.initial:
            self._emit()
            self._echo(final=True)

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("LogProgress: no iterable given")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _rate(rate: float) -> str:
    if rate != rate or rate <= 0:
        return "? it/s"
    return f"{rate:.2f} it/s" if rate >= 1 else f"{1.0 / rate:.2f} s/it"


def _is_terminal(stream: IO[str] | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def progress(iterable_or_total: Iterable[Any] | int | None = None, *, desc: str = "", total: int | None = None,
             initial: int = 0, disable: bool = False, every: float = DEFAULT_EVERY,
             stream: IO[str] | None = None) -> Any:
    """A progress reporter: a tqdm bar when ``stream`` (default ``sys.stderr``) is a terminal, else a
    :class:`LogProgress` that logs a plain line every ``every`` percent with rate and ETA.

    Args:
        iterable_or_total: an iterable to wrap, or the total number of steps (then call ``update``).
        desc: name shown with the progress.
        total: number of steps (default: ``len`` of the iterable, or ``iterable_or_total`` when an int).
        initial: steps already done (resumed runs).
        disable: report nothing (ranks other than 0, or a caller's quiet flag).
        every: log-line spacing in percent of the total (log mode only).
        stream: where the bar would go (default ``sys.stderr``, which the workflow's rules redirect to
            their log file).

    Returns:
        An object with iteration, ``update(n)``, ``set_postfix(**kw)``, ``close()`` and ``with`` support.
    """
    iterable: Iterable[Any] | None
    if isinstance(iterable_or_total, int) and not isinstance(iterable_or_total, bool):
        iterable, total = None, iterable_or_total if total is None else total
    else:
        iterable = iterable_or_total
    out = stream if stream is not None else sys.stderr
    if _is_terminal(out):
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc or None, initial=initial, disable=disable, file=out,
                    mininterval=1.0, dynamic_ncols=True)
    return LogProgress(iterable, total=total, desc=desc, initial=initial, every=every, disable=disable)
