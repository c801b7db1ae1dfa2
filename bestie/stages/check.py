"""Stage 0 of every run: the pre-flight checks of :mod:`bestie.check` (``bestie check``, rule ``check``).

Reads the whole workflow configuration, runs :func:`bestie.check.run_checks` and either writes the
report (``results/<run>/check.json``, the marker every stage's rule waits for) or raises one
:class:`~bestie.errors.DataError` that lists every fault found, with its file and line, before any
training starts.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

from bestie.check import CheckReport, run_checks, write_report
from bestie.errors import DataError

__all__ = ["run"]

log = logging.getLogger(__name__)


def run(config: Mapping[str, Any], out_report: str | os.PathLike | None = None,
        out_dir: str | os.PathLike | None = None, weights: bool = True) -> CheckReport:
    """Check ``config`` and its data; write ``out_report`` (JSON) only when nothing is at fault.

    Args:
        config: the workflow configuration (``config.yaml`` as a mapping).
        out_report: the report file (None: write nothing).
        out_dir: the run's output folder, for the disk-room check (default ``results/<run>``).
        weights: also load configured weights files.

    Returns:
        The report (no faults).

    Raises:
        DataError: one or more faults; the message lists them all (file, line, fault).
    """
    report = run_checks(config, out_dir=out_dir, weights=weights)
    if not report.ok:
        raise DataError(report.text())
    images = report.counts.get("images", {})
    log.info("check: no fault found (%s; about %.1f GB of artifacts)",
             ", ".join(f"{k}: {v} images" for k, v in images.items()) or "no split",
             report.counts.get("estimated_bytes", 0) / 1e9)
    if out_report is not None:
        write_report(report, Path(out_report))
    return report
