"""Helpers for the crash tests of the atomic writers: a writer in a child process, killed mid-write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def repo_env() -> dict[str, str]:
    """This process's environment with the repository first on ``PYTHONPATH`` (children import ``bestie``)."""
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def python_child(script: str, *args: str | os.PathLike) -> subprocess.Popen:
    """``python -c script args...`` started in the background with :func:`repo_env`."""
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=repo_env())


def sigkill_mid_write(script: str, target: Path, min_bytes: int, timeout_s: float) -> subprocess.Popen:
    """Run the writer ``python -c script target`` and SIGKILL it once its temporary file holds data.

    The temporary file is any file of ``target``'s folder other than ``target`` (the folder must hold
    nothing else). The test fails when the writer exits early, or when its temporary file has not grown
    beyond ``min_bytes`` within ``timeout_s`` seconds.

    Returns:
        The killed, reaped process (``returncode == -signal.SIGKILL``).
    """
    proc = python_child(script, target)
    try:
        deadline = time.monotonic() + timeout_s
        # wait until the child has written a good amount into its temp file
        while time.monotonic() < deadline:
            temps = [p for p in target.parent.iterdir() if p.name != target.name]
            if temps and temps[0].stat().st_size > min_bytes:
                break
            assert proc.poll() is None, "writer exited early"
            time.sleep(0.02)
        else:
            pytest.fail(f"the writer subprocess did not start writing within {timeout_s:g} s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    return proc
