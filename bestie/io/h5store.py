"""Per-image arrays of one stage output in one HDF5 file, keyed by image id.

Layout of a store (format version 1)::

    /                      file attrs: ``bestie_h5_format`` = 1, ``attrs_json`` = JSON of the writer's
                           ``attrs`` dict (stage parameters, ...), returned by ``H5Reader.file_attrs``
    /ids                   1-D variable-length UTF-8 string dataset: the image ids in insertion order
    /images/<enc(id)>/     one group per image; ``enc`` percent-encodes the id (urllib ``quote`` with no
                           safe characters, so ``/`` -> ``%2F`` and ``%`` -> ``%25``), which is reversible
                           for any id string; group attrs hold small per-image metadata
    /images/<enc(id)>/<name>   one dataset per array

Arrays larger than 4 KiB are stored chunked, byte-shuffled and compressed (gzip level 4 by default).
Readers open one image group at a time; nothing but the id list is loaded when a store is opened.

Standard contents written by the stages (docs/ARCHITECTURE.md data contracts):

- CAMs (``cams.h5``): ``cams`` float16 ``(K, h, w)`` for the ``K`` classes present in the image (score
  map at the CAM stride), ``classes`` int16 ``(K,)`` 0-based class indices of those maps; image attr
  ``image_size`` = ``(H, W)`` of the original image in pixels.
- Points (``points.h5``): ``points`` float32 ``(N, 4)``, columns ``x, y, class, conf`` (pixels of the
  original image, 0-based class index).
- WSSS maps (``wsss.h5``): ``wsss`` uint8 ``(H, W)``; 0 background, ``c + 1`` class ``c``, 255 ignore.

Files are written through :func:`bestie.io.atomic.atomic_path`: the target appears only when the writer
closes without error, so a killed or failed run leaves the previous complete file in place.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import h5py
import numpy as np

from bestie.errors import ArtifactError
from bestie.io.atomic import atomic_path, to_jsonable

__all__ = ["H5Writer", "H5Reader", "FORMAT_VERSION", "encode_id", "decode_id"]

FORMAT_VERSION = 1
_IMAGES = "images"
_IDS = "ids"
_COMPRESS_MIN_BYTES = 4096
_STR = h5py.string_dtype(encoding="utf-8")


def encode_id(image_id: str) -> str:
    """HDF5 group name for an image id: percent-encoding of every character outside ``[A-Za-z0-9_.~-]``.

    Reversible by :func:`decode_id` for any non-empty string; ``"."`` and ``".."`` (special as HDF5 path
    components) are encoded as ``%2E`` / ``%2E%2E``.

    Raises:
        TypeError: ``image_id`` is not a str.
        ValueError: ``image_id`` is empty.
    """
    if not isinstance(image_id, str):
        raise TypeError(f"image id must be a str, got {type(image_id).__name__}: {image_id!r}")
    if not image_id:
        raise ValueError("image id must be a non-empty string")
    name = quote(image_id, safe="")
    if name in (".", ".."):
        name = name.replace(".", "%2E")
    return name


def decode_id(name: str) -> str:
    """Inverse of :func:`encode_id`."""
    return unquote(name)


def _attr_value(value: Any) -> Any:
    """Convert a per-image attribute value to something h5py stores (tuples/lists -> arrays)."""
    if value is None:
        raise ValueError("None cannot be stored as an HDF5 attribute")
    if isinstance(value, (str, bytes, np.ndarray, np.generic, bool, int, float)):
        return value
    if isinstance(value, (tuple, list)):
        arr = np.asarray(value)
        if arr.dtype == object:
            raise ValueError(f"attribute value {value!r} is not a homogeneous array")
        return arr
    raise ValueError(f"cannot store a {type(value).__name__} as an HDF5 attribute: {value!r}")


def _attr_out(value: Any) -> Any:
    """Attribute value as returned to callers: numpy scalars -> Python scalars, bytes -> str."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


class H5Writer:
    """Write per-image arrays to a new HDF5 store at ``path``, atomically (context manager).

    Usage::

        with H5Writer("cams.h5", attrs={"stage": "cam", "scales": [1.0, 0.5]}) as w:
            w.write("2007_000032", cams=cams, classes=classes)
            w.set_attrs("2007_000032", image_size=(375, 500))

    The data go to a temporary file next to ``path``; it is renamed onto ``path`` when the ``with`` block
    ends without error, and deleted otherwise (the previous file at ``path`` stays as it was).

    Args:
        path: target ``.h5`` file.
        attrs: file-level metadata (stage parameters, ...); any JSON-serialisable dict (numpy scalars
            and arrays allowed), stored as JSON and returned unchanged by :attr:`H5Reader.file_attrs`.
        compression: h5py filter for arrays over 4 KiB (``"gzip"``, ``"lzf"`` or None for none).
        level: gzip level 0-9 (ignored for other filters).

    Raises:
        ArtifactError: the file cannot be created, or ``attrs`` is not JSON serialisable (names the file).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        attrs: Mapping[str, Any] | None = None,
        compression: str | None = "gzip",
        level: int = 4,
    ) -> None:
        self.path = Path(path)
        try:
            self._attrs_json = json.dumps(dict(attrs or {}), default=to_jsonable, allow_nan=True)
        except (TypeError, ValueError) as exc:
            raise ArtifactError(f"{self.path}: file attrs are not JSON serialisable: {exc}") from exc
        if compression not in (None, "gzip", "lzf"):
            raise ValueError(f"{self.path}: compression must be 'gzip', 'lzf' or None, got {compression!r}")
        if compression == "gzip" and not 0 <= int(level) <= 9:
            raise ValueError(f"{self.path}: gzip level must be in 0..9, got {level}")
        self._compression = compression
        self._opts = int(level) if compression == "gzip" else None
        self._stack: ExitStack | None = None
        self._file: h5py.File | None = None
        self._ids: list[str] = []
        self._seen: set[str] = set()  # ids only: no open HDF5 handle per image

    def __enter__(self) -> H5Writer:
        if self._stack is not None:
            raise RuntimeError(f"{self.path}: H5Writer is already open")
        stack = ExitStack()
        try:
            tmp = stack.enter_context(atomic_path(self.path))
            try:
                self._file = h5py.File(tmp, "w")
            except OSError as exc:
                raise ArtifactError(f"{self.path}: cannot create HDF5 file {tmp}: {exc}") from exc
            self._file.attrs["bestie_h5_format"] = FORMAT_VERSION
            self._file.attrs["attrs_json"] = self._attrs_json
            self._file.create_group(_IMAGES)
        except BaseException as exc:
            if self._file is not None:
                self._file.close()
                self._file = None
            stack.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._stack = stack
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        stack, self._stack = self._stack, None
        file, self._file = self._file, None
        if stack is None:
            return False
        try:
            try:
                if exc_type is None and file is not None:
                    file.create_dataset(_IDS, data=np.array(self._ids, dtype=object), dtype=_STR)
            finally:
                if file is not None:
                    file.close()
        except BaseException as err:
            stack.__exit__(type(err), err, err.__traceback__)  # removes the temp file
            raise
        # commits (rename) on success, removes the temp file on error
        return bool(stack.__exit__(exc_type, exc, tb))

    def _group(self, image_id: str) -> h5py.Group:
        if self._file is None:
            raise RuntimeError(f"{self.path}: H5Writer must be used inside a 'with' block")
        images = self._file[_IMAGES]
        name = encode_id(image_id)
        if image_id in self._seen:
            return images[name]
        group = images.create_group(name)
        self._seen.add(image_id)
        self._ids.append(image_id)
        return group

    def write(self, image_id: str, **arrays: np.ndarray) -> None:
        """Store arrays for one image as datasets ``images/<enc(id)>/<name>``.

        May be called several times for one id with different names (e.g. ``cams`` then ``classes``).
        Arrays keep their dtype and shape; arrays over 4 KiB are chunked and compressed.

        Raises:
            TypeError / ValueError: bad id, an object-dtype array, or a name already written for this id.
            RuntimeError: called outside the ``with`` block.
        """
        group = self._group(image_id)
        for name, value in arrays.items():
            arr = np.asarray(value)
            if arr.dtype == object:
                raise ValueError(f"{self.path}: array {name!r} of image {image_id!r} has object dtype")
            if name in group:
                raise ValueError(f"{self.path}: array {name!r} of image {image_id!r} was already written")
            if self._compression is not None and arr.nbytes > _COMPRESS_MIN_BYTES and arr.ndim > 0:
                group.create_dataset(
                    name, data=arr, chunks=True, shuffle=True,
                    compression=self._compression, compression_opts=self._opts,
                )
            else:
                group.create_dataset(name, data=arr)

    def set_attrs(self, image_id: str, **attrs: Any) -> None:
        """Attach small metadata to one image (e.g. ``image_size=(H, W)``): scalars, strings, short arrays.

        Raises:
            ValueError: a value h5py cannot store as an attribute (None, nested/mixed lists, dicts).
        """
        group = self._group(image_id)
        for key, value in attrs.items():
            try:
                group.attrs[key] = _attr_value(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{self.path}: attribute {key!r} of image {image_id!r}: {exc}") from exc

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._seen

    def __len__(self) -> int:
        return len(self._ids)


class H5Reader:
    """Read a store written by :class:`H5Writer`, one image at a time.

    Usable as a context manager or directly (then call :meth:`close`). Opening loads only the id list.

    Raises (on open):
        ArtifactError: the file does not exist, is not an HDF5 file or is corrupt, or is not a store of
            this format (each names the file).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: HDF5 store does not exist")
        try:
            # stores are immutable once renamed into place: no HDF5 file lock needed (locks fail on
            # some network file systems)
            self._file = h5py.File(self.path, "r", locking=False)
        except OSError as exc:
            raise ArtifactError(f"{self.path}: not a readable HDF5 file ({exc})") from exc
        try:
            version = self._file.attrs.get("bestie_h5_format")
            if version is None or _IDS not in self._file or _IMAGES not in self._file:
                raise ArtifactError(f"{self.path}: not a bestie HDF5 store (missing format attr, 'ids' or 'images')")
            if int(version) > FORMAT_VERSION:
                raise ArtifactError(
                    f"{self.path}: store format version {int(version)} is newer than this code ({FORMAT_VERSION})"
                )
            self._ids = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in self._file[_IDS][()]]
            self._images = self._file[_IMAGES]
            raw = self._file.attrs.get("attrs_json", "{}")
            self._file_attrs = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
        except ArtifactError:
            self._file.close()
            raise
        except (OSError, KeyError, ValueError) as exc:
            self._file.close()
            raise ArtifactError(f"{self.path}: corrupt HDF5 store ({exc})") from exc
        self._id_set = set(self._ids)

    def __enter__(self) -> H5Reader:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass

    @property
    def file_attrs(self) -> dict:
        """File-level metadata as given to ``H5Writer(attrs=...)`` (JSON round trip)."""
        return dict(self._file_attrs)

    def ids(self) -> list[str]:
        """Image ids in the order they were first written."""
        return list(self._ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._id_set

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._ids))

    def _group(self, image_id: str) -> h5py.Group:
        if self._file is None:
            raise ArtifactError(f"{self.path}: reader is closed")
        if image_id not in self._id_set:
            raise KeyError(f"image id {image_id!r} not in {self.path}")
        try:
            return self._images[encode_id(image_id)]
        except (KeyError, OSError) as exc:
            raise ArtifactError(f"{self.path}: group of image {image_id!r} is missing or corrupt ({exc})") from exc

    def read(self, image_id: str) -> dict[str, np.ndarray]:
        """All arrays of one image, ``{name: array}`` with the stored dtype and shape.

        Raises:
            KeyError: the id is not in the store (names id and file).
            ArtifactError: the data cannot be read (corrupt file).
        """
        group = self._group(image_id)
        try:
            return {name: group[name][()] for name in group}
        except (OSError, KeyError) as exc:
            raise ArtifactError(f"{self.path}: cannot read arrays of image {image_id!r} ({exc})") from exc

    def read_array(self, image_id: str, name: str) -> np.ndarray:
        """One array of one image.

        Raises:
            KeyError: unknown id, or no array ``name`` for that id (names id, array and file).
            ArtifactError: the data cannot be read (corrupt file).
        """
        group = self._group(image_id)
        if name not in group:
            raise KeyError(f"array {name!r} of image {image_id!r} not in {self.path} (has {sorted(group)})")
        try:
            return group[name][()]
        except OSError as exc:
            raise ArtifactError(f"{self.path}: cannot read array {name!r} of image {image_id!r} ({exc})") from exc

    def attrs(self, image_id: str) -> dict[str, Any]:
        """Per-image metadata set with :meth:`H5Writer.set_attrs` (arrays as numpy, scalars as Python).

        Raises:
            KeyError: the id is not in the store.
        """
        group = self._group(image_id)
        return {key: _attr_out(value) for key, value in group.attrs.items()}

    def items(self) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """Yield ``(image_id, arrays)`` in insertion order, reading one image at a time."""
        for image_id in list(self._ids):
            yield image_id, self.read(image_id)
