"""Benchmarks of the BESTIE pipeline (``make bench`` -> ``benchmarks/results/bench.json``).

Modules (each exposes ``run(...) -> dict``, a JSON-serialisable result):

- :mod:`benchmarks.bench_core`: per-call timings of the hot per-sample functions (pseudo labels,
  self-refinement, inference grouping) on one thread;
- :mod:`benchmarks.bench_eval`: VOC instance AP of 1449 synthetic images' predictions;
- :mod:`benchmarks.bench_stages`: images/s and peak RSS of the CAM, WSSS and evaluation stages on 1x and
  4x the images of ``../shared/data/coco128-voc`` (each stage in its own process);
- :mod:`benchmarks.bench_dag`: ``snakemake -n`` over a 10,000-image id list;
- :mod:`benchmarks.gpu_bench`: BESTIE training step / inference on a CUDA machine (run by hand);
- :mod:`benchmarks.run`: the driver writing one JSON file with all of them and the machine description.

This module holds the helpers they share: :func:`machine_info`, :func:`time_calls`, :func:`peak_rss_mb`,
:func:`reset_peak_rss`, :func:`emit_json`.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["REPO_ROOT", "machine_info", "time_calls", "peak_rss_mb", "reset_peak_rss", "cpu_model", "load_average",
           "emit_json"]

#: Root of the repository (the folder holding ``bestie/`` and ``benchmarks/``).
REPO_ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str | None:
    """CPU model name from ``/proc/cpuinfo`` (Linux), else :func:`platform.processor`, else None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (runnable processes), rounded; None where unsupported."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - a missing package is reported as None
        return None


def machine_info() -> dict[str, Any]:
    """Description of the machine and software the figures were measured on.

    Returns:
        ``{"cpu_model", "cpu_count" (logical cores seen by the OS), "cpu_affinity" (cores this process
        may use), "memory_gb", "torch_threads" (after :func:`torch.set_num_threads` by the caller),
        "python", "platform", "versions": {package: version}, "cuda_available", "load_average"}``.
    """
    import numpy as np
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = None
    mem = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = round(int(line.split()[1]) / 2**20, 1)
                    break
    except OSError:
        pass
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "memory_gb": mem,
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {
            "numpy": np.__version__,
            "torch": torch.__version__,
            "opencv": _version("opencv-python-headless") or _version("opencv-python"),
            "h5py": _version("h5py"),
            "scipy": _version("scipy"),
            "timm": _version("timm"),
            "snakemake": _version("snakemake"),
            "pydensecrf": _version("pydensecrf2") or _version("pydensecrf"),
        },
        "cuda_available": bool(torch.cuda.is_available()),
        "load_average": load_average(),
    }


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Wall and CPU time of ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    CPU time is ``time.process_time`` of this process (all its threads): on an oversubscribed machine the
    wall time also counts the waits for a core, the CPU time does not.

    Returns:
        ``{"median_s", "min_s", "cpu_median_s", "cpu_min_s", "runs_s" (list), "repeats", "warmup"}``;
        seconds.

    Raises:
        ValueError: ``repeats < 1``.
    """
    if repeats < 1:
        raise ValueError(f"time_calls: repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "median_s": round(statistics.median(wall), 6),
        "min_s": round(min(wall), 6),
        "cpu_median_s": round(statistics.median(cpu), 6),
        "cpu_min_s": round(min(cpu), 6),
        "runs_s": [round(w, 4) for w in wall],
        "repeats": repeats,
        "warmup": warmup,
    }


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set size of a process so far, MiB.

    For this process (``RUSAGE_SELF``) the high-water mark of its own address space is read from
    ``/proc/self/status`` (``VmHWM``): unlike ``ru_maxrss``, which Linux carries over ``fork`` + ``exec``
    (a child started by a 900 MB parent reports at least 900 MB), it starts afresh with the program.
    Elsewhere, and for ``RUSAGE_CHILDREN`` (the largest terminated, waited-for child), ``getrusage`` is
    used (``ru_maxrss``: KiB on Linux, bytes on macOS).
    """
    if who == resource.RUSAGE_SELF:
        try:
            with open("/proc/self/status", encoding="ascii", errors="replace") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return round(int(line.split()[1]) / 1024, 1)
        except (OSError, ValueError, IndexError):
            pass
    kb = resource.getrusage(who).ru_maxrss
    if sys.platform == "darwin":  # pragma: no cover - bytes there
        kb /= 1024
    return round(kb / 1024, 1)


def reset_peak_rss() -> bool:
    """Reset this process's resident-set high-water mark (``VmHWM``) to its current RSS.

    Writes ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0), so that :func:`peak_rss_mb` measures the
    peak of what runs next. Returns False (nothing reset) where that is not possible.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def emit_json(doc: dict[str, Any], out: Path | None) -> None:
    """Print a benchmark's JSON result and, when ``out`` is given, write it there atomically
    (:func:`bestie.io.atomic.write_json_atomic`; parent folders created, NaN kept as in ``json.dumps``)."""
    import json

    from bestie.io.atomic import write_json_atomic

    print(json.dumps(doc, indent=2))
    if out is not None:
        write_json_atomic(out, doc, allow_nan=True)
