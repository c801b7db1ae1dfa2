"""Tests of bestie.io.atomic: the target is replaced completely or not at all."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from bestie.errors import ArtifactError
from bestie.io import atomic
from bestie.io.atomic import atomic_path, atomic_write, write_json_atomic
from process_util import python_child, sigkill_mid_write


def _others(directory: Path, keep: str) -> list[str]:
    """Names in ``directory`` other than ``keep`` (left-over temp files)."""
    return sorted(p.name for p in directory.iterdir() if p.name != keep)


def test_success_replaces_content_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_write(target) as fh:
        fh.write(b"new content")
        # not visible before the block ends
        assert target.read_bytes() == b"old"
    assert target.read_bytes() == b"new content"
    assert _others(tmp_path, "out.bin") == []


def test_text_mode_and_missing_parent_dirs(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    with atomic_write(target, "w") as fh:
        fh.write("héllo\n")
    assert target.read_text(encoding="utf-8") == "héllo\n"


def test_new_file_gets_umask_permissions_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "f") as fh:
            fh.write(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644


def test_read_mode_refused(tmp_path):
    with pytest.raises(ValueError, match="write mode"):
        with atomic_write(tmp_path / "f", "rb"):
            pass


def test_exception_mid_write_keeps_old_content_and_no_temp(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old content")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target) as fh:
            fh.write(b"partial " * 1000)
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old content"
    assert _others(tmp_path, "out.bin") == []


def test_exception_without_previous_file_creates_nothing(tmp_path):
    with pytest.raises(KeyError):
        with atomic_write(tmp_path / "new.bin") as fh:
            fh.write(b"x")
            raise KeyError("k")
    assert list(tmp_path.iterdir()) == []


class _FullDiskFile:
    """A file object whose write() fails with ENOSPC after ``limit`` bytes, like a full disk."""

    def __init__(self, fh, limit):
        self._fh, self._left = fh, limit

    def write(self, data):
        if len(data) > self._left:
            self._fh.write(data[: self._left])
            self._left = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._left -= len(data)
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()
        return False


def test_enospc_during_write_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"v": 1})
    real_fdopen = os.fdopen
    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, *a, **k: _FullDiskFile(real_fdopen(fd, *a, **k), 100))
    with pytest.raises(ArtifactError) as info:
        write_json_atomic(target, {"v": list(range(1000))})
    assert info.value.errno == errno.ENOSPC and f"cannot write {target}" in str(info.value)
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert _others(tmp_path, "out.json") == []


def test_enospc_at_fsync_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def full_disk_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full_disk_fsync)
    with pytest.raises(ArtifactError) as info:
        with atomic_write(target) as fh:
            fh.write(b"new")
    assert info.value.errno == errno.ENOSPC and "out.bin" in str(info.value)
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert _others(tmp_path, "out.bin") == []


def test_atomic_path_success_failure_and_suffix(tmp_path):
    target = tmp_path / "weights.pt"
    with atomic_path(target) as tmp:
        assert Path(tmp).parent == tmp_path
        assert tmp.endswith(".pt") and Path(tmp).name.startswith(".weights.pt.")
        Path(tmp).write_bytes(b"v1")
        assert not target.exists()
    assert target.read_bytes() == b"v1"
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            Path(tmp).write_bytes(b"v2 partial")
            raise ValueError("fail")
    assert target.read_bytes() == b"v1"
    assert _others(tmp_path, "weights.pt") == []


def test_atomic_path_unique_per_call(tmp_path):
    with atomic_path(tmp_path / "x.h5") as a, atomic_path(tmp_path / "x.h5") as b:
        assert a != b
        Path(a).write_bytes(b"a")
        Path(b).write_bytes(b"b")
    # inner context (b) commits first, then a: the last to finish wins
    assert (tmp_path / "x.h5").read_bytes() == b"a"


def test_write_json_atomic_numpy_and_nan(tmp_path):
    target = tmp_path / "m.json"
    write_json_atomic(target, {"a": np.float32(0.5), "b": np.arange(3), "c": np.int64(7), "d": None})
    assert json.loads(target.read_text()) == {"a": 0.5, "b": [0, 1, 2], "c": 7, "d": None}
    with pytest.raises(ArtifactError, match="m.json"):
        write_json_atomic(target, {"a": float("nan")})
    with pytest.raises(ArtifactError, match="m.json"):
        write_json_atomic(target, {"a": object()})
    assert json.loads(target.read_text())["c"] == 7


_SLOW_WRITER = textwrap.dedent(
    """
    import sys, time
    from bestie.io.atomic import atomic_write
    with atomic_write(sys.argv[1]) as fh:
        for i in range(100000):
            fh.write(b"N" * 65536)
            fh.flush()
            time.sleep(0.01)
    """
)


def test_sigkill_mid_write_leaves_old_file_intact(tmp_path):
    target = tmp_path / "big.bin"
    old = os.urandom(1 << 16)
    target.write_bytes(old)
    proc = sigkill_mid_write(_SLOW_WRITER, target, min_bytes=4 * 65536, timeout_s=30)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == old
    # the orphaned temp file is hidden and named after the target
    leftovers = _others(tmp_path, "big.bin")
    assert len(leftovers) == 1 and leftovers[0].startswith(".big.bin.")


_JSON_WRITER = textwrap.dedent(
    """
    import sys
    from bestie.io.atomic import write_json_atomic
    tag, shared, own = sys.argv[1], sys.argv[2], sys.argv[3]
    for i in range(150):
        payload = {"writer": tag, "i": i, "data": [tag] * 2000}
        write_json_atomic(shared, payload)
        write_json_atomic(own, payload)
    """
)


def test_two_processes_writing_in_one_directory_never_corrupt_each_other(tmp_path):
    """Two runs in one working directory: unique temp paths, so every read of the shared target is a
    complete file of one writer and each run's own artifact is its own."""
    shared = tmp_path / "shared.json"
    procs = [python_child(_JSON_WRITER, tag, shared, tmp_path / f"{tag}.json") for tag in ("A", "B")]
    reads = 0
    while any(p.poll() is None for p in procs):
        if shared.exists():
            obj = json.loads(shared.read_text())  # never a half-written or interleaved file
            assert obj["writer"] in ("A", "B") and obj["data"] == [obj["writer"]] * 2000
            reads += 1
        time.sleep(0.001)
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    assert reads > 0
    for tag in ("A", "B"):
        assert json.loads((tmp_path / f"{tag}.json").read_text()) == {"writer": tag, "i": 149, "data": [tag] * 2000}
    assert json.loads(shared.read_text())["i"] == 149
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A.json", "B.json", "shared.json"]  # no temp left
