"""The text files of a dataset (image-level label lists, point files), read with errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path

from bestie.errors import DataError

__all__ = ["read_text"]


def read_text(path: str | os.PathLike, what: str) -> str:
    """The whole of a UTF-8 text file.

    Args:
        path: the file.
        what: what the file is, for the error messages (``"point file"``, ``"list file"``).

    Raises:
        DataError: ``"<what> not found: <path>"`` for a missing file, ``"cannot read <what> <path>: <fault>"``
            for any other ``OSError`` or a file that is not UTF-8.
    """
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DataError(f"{what} not found: {p}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {what} {p}: {exc}") from exc
