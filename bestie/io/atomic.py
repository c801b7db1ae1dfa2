"""Atomic file writes: a stage's output either appears complete or not at all.

Every artifact of the pipeline is written to a uniquely named temporary file in the target's own
directory (so that the final rename never crosses file systems), flushed and ``fsync``-ed, and then moved
onto the target with :func:`os.replace`, which is atomic on POSIX file systems. If the writer raises,
the temporary file is removed and the previous content of the target (if any) is left untouched. If the
process is killed outright (SIGKILL, power loss) the target is still intact; only an orphaned temporary
file named ``.<target name>.<random>.tmp<suffix>`` may remain next to it (hidden, so that globbing for the
real suffix does not pick it up).

Temporary names come from :func:`tempfile.mkstemp`, so two processes writing the same target at once
never share a temporary path; the last one to finish wins (docs/ARCHITECTURE.md, "Conventions": "Every
artifact is written through bestie.io.atomic").
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from bestie.errors import ArtifactError

__all__ = ["atomic_write", "atomic_path", "write_json_atomic", "to_jsonable"]

#: errno values meaning "the disk (or quota, or file size limit) is full": re-raised as ArtifactError.
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

_WRITE_MODES = {"w", "wb", "wt", "w+", "wb+", "w+b", "wt+", "w+t"}


def _umask() -> int:
    """Current process umask, read without changing it where the platform allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # fallback: not thread-safe, but only reached off Linux
    os.umask(old)
    return old


def _final_mode(target: Path) -> int:
    """Permission bits for the finished file: those of the file it replaces, else 0o666 & ~umask.

    ``mkstemp`` creates files with mode 0o600; without this the artifacts would be private to the
    user, unlike files written with a plain ``open``.
    """
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _make_temp(target: Path) -> tuple[int, str]:
    """Create the temporary file next to ``target``; returns ``(fd, temp_path)``.

    Raises:
        ArtifactError: the directory cannot be created or is not writable (names the target).
    """
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=parent)
    except OSError as exc:
        raise ArtifactError(f"{target}: cannot create a temporary file in {parent}: {exc}") from exc


def _fsync_dir(directory: Path) -> None:
    """Flush the directory entry of a rename to disk (best effort; not possible on every OS/FS)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _disk_full_error(exc: BaseException, target: Path) -> ArtifactError | None:
    """An :class:`ArtifactError` naming ``target`` for a disk-full ``OSError`` (same errno), else None."""
    if isinstance(exc, OSError) and not isinstance(exc, ArtifactError) and exc.errno in _DISK_FULL:
        return ArtifactError(exc.errno, f"cannot write {target}: {exc.strerror or exc}; its previous content "
                                        "(if any) is left intact")
    return None


def _commit(tmp: str, target: Path) -> None:
    """Set permissions on the finished temp file and rename it onto ``target``."""
    os.chmod(tmp, _final_mode(target))
    os.replace(tmp, target)
    _fsync_dir(target.parent)


@contextlib.contextmanager
def _committed(tmp: str, target: Path) -> Iterator[None]:
    """Commit ``tmp`` onto ``target`` (:func:`_commit`) when the block succeeds; remove it when it raises.

    The block writes (and syncs) ``tmp``. Any exception (``KeyboardInterrupt`` included) removes ``tmp`` and is
    re-raised, a disk-full ``OSError`` as the :class:`ArtifactError` of :func:`_disk_full_error` (errno kept,
    naming ``target``); the previous content of ``target`` is left intact.
    """
    try:
        yield
        _commit(tmp, target)
    except BaseException as exc:
        _remove_quietly(tmp)
        full = _disk_full_error(exc, target)
        if full is not None:
            raise full from exc
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open ``path`` for writing such that it is replaced only when the ``with`` block succeeds.

    Yields a file object on a temporary file in the same directory (created with the target's name as
    prefix by :func:`tempfile.mkstemp`, unique per process). On a clean exit the file is flushed,
    ``fsync``-ed and renamed onto ``path`` with :func:`os.replace`; on any exception (including
    ``KeyboardInterrupt`` and ``OSError(ENOSPC)``) the temporary file is deleted and the exception
    re-raised, leaving the previous content of ``path`` intact. Missing parent directories are created.

    Args:
        path: target file.
        mode: a write mode, ``"wb"`` (bytes, default) or ``"w"`` (text); read/append modes are refused.
        encoding: text encoding for text modes (default UTF-8); must be None for binary modes.

    Raises:
        ValueError: ``mode`` is not a write mode.
        ArtifactError: the temporary file cannot be created next to ``path``, or the disk is full
            (``ENOSPC`` / ``EDQUOT`` / ``EFBIG``, errno kept; the message names ``path``).
    """
    if mode not in _WRITE_MODES:
        raise ValueError(f"atomic_write: mode must be a write mode such as 'wb' or 'w', got {mode!r}")
    binary = "b" in mode
    if binary and encoding is not None:
        raise ValueError("atomic_write: encoding is only valid for text modes")
    target = Path(path)
    fd, tmp = _make_temp(target)
    try:
        fh = os.fdopen(fd, mode, encoding=None if binary else (encoding or "utf-8"))
    except BaseException:
        os.close(fd)
        _remove_quietly(tmp)
        raise
    with _committed(tmp, target), fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file path that replaces ``path`` when the ``with`` block succeeds.

    For libraries that want a file name rather than a file object (``h5py.File``, ``torch.save``,
    ``cv2.imwrite``). The temporary file lives in the target's directory, already exists (empty) and
    ends with the target's suffix (e.g. ``.cams.h5.k3j2.tmp.h5``), so format detection by extension
    works. The caller must have closed the file before the block ends. On success the file is
    ``fsync``-ed and renamed onto ``path``; on any exception it is removed and the exception re-raised,
    leaving the previous content of ``path`` intact.

    Raises:
        ArtifactError: the temporary file cannot be created, or the caller removed it, so that nothing
            could be written to ``path``, or the disk is full (``ENOSPC`` / ``EDQUOT`` / ``EFBIG``, errno
            kept); the message names the target.
    """
    target = Path(path)
    fd, tmp = _make_temp(target)
    os.close(fd)
    with _committed(tmp, target):
        yield tmp
        try:
            sync_fd = os.open(tmp, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise ArtifactError(f"{target}: the temporary file {tmp} vanished before it was committed") from exc
        try:
            os.fsync(sync_fd)
        finally:
            os.close(sync_fd)


def to_jsonable(obj: Any) -> Any:
    """JSON ``default`` hook: numpy scalars/arrays -> Python numbers/lists, paths -> str.

    Raises:
        TypeError: for any other non-serialisable object (as :func:`json.dumps` expects).
    """
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2, allow_nan: bool = False) -> None:
    """Serialise ``obj`` to JSON (UTF-8, trailing newline) and write it atomically to ``path``.

    numpy scalars and arrays are converted to Python numbers and lists. By default NaN/inf are refused,
    since they make the file invalid JSON for strict readers (use None for "no value").

    Raises:
        ArtifactError: ``obj`` is not JSON serialisable or holds NaN/inf (names the file and the fault),
            or the file cannot be created; the previous content of ``path`` is then left intact.
    """
    try:
        text = json.dumps(obj, indent=indent, default=to_jsonable, allow_nan=allow_nan, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{path}: cannot serialise the object to JSON: {exc}") from exc
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.write("\n")
