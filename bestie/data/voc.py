"""PASCAL VOC 2012 layout datasets (also the embedded demo data and ``coco128-voc``).

Layout under ``root``::

    JPEGImages/<id>.jpg                 images (.jpeg / .png accepted when no .jpg exists)
    Annotations/<id>.xml                object names -> image-level labels
    SegmentationClass/<id>.png          palette PNG: 0 background, 1..C class c+1, 255 boundary/ignore
    SegmentationObject/<id>.png         palette PNG: 0 background, 1..N instance index, 255 boundary/ignore
    ImageSets/Segmentation/<split>.txt  one id per line (the whole line: an id may hold spaces)

Image ids are arbitrary strings (never assumed to be ``YYYY_NNNNNN``). Ids and file names are compared
after Unicode NFC normalisation, so a list written in NFC finds a file whose name is stored in NFD (as
macOS writes them) and vice versa; the files are then opened under their names on disk.
"""

from __future__ import annotations

import difflib
import logging
import os
import unicodedata
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

import numpy as np

from bestie.errors import ConfigError, DataError
from bestie.data.images import drop_missing_images, drop_unreadable_images, load_label_png, load_rgb
from bestie.data.textfiles import read_text

__all__ = ["VOC_CLASSES", "VOCDataset", "IMAGE_EXTENSIONS", "check_class_names", "read_split_list", "nfc",
           "list_stems", "near_miss", "xml_object_names"]

log = logging.getLogger(__name__)

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

#: Image file extensions looked up in ``JPEGImages``, in order of preference.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".bmp", ".tif", ".tiff", ".webp")

_MAX_LISTED = 10  # ids listed by name in one error message


def check_class_names(class_names: Sequence[str], source: str = "class_names") -> tuple[str, ...]:
    """Return ``class_names`` as a tuple after checking it is a non-empty list of unique, non-empty strings.

    Raises:
        ConfigError: empty list, a non-string / empty name, a duplicate, or more than 254 classes
            (class maps store ``c + 1`` in a uint8 with 255 reserved).
    """
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise ConfigError(f"{source}: expected a list of class names, got {class_names!r}")
    names = tuple(class_names)
    if not names:
        raise ConfigError(f"{source}: the class list is empty")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise ConfigError(f"{source}: class names must be non-empty strings, got {bad!r}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{source}: duplicate class name(s) {dup}")
    if len(names) > 254:
        raise ConfigError(f"{source}: {len(names)} classes; at most 254 fit in a uint8 class map")
    return names


def nfc(text: str) -> str:
    """``text`` in Unicode normal form C (how ids and file names are compared)."""
    return unicodedata.normalize("NFC", text)


def list_stems(directory: Path, suffixes: Sequence[str]) -> dict[str, str]:
    """Map NFC file stem -> file name on disk for the files of ``directory`` with one of ``suffixes``
    (earlier suffixes win); ``{}`` for a missing directory."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    rank = {s: i for i, s in enumerate(suffixes)}
    best: dict[str, tuple[int, str]] = {}
    for name in names:
        stem, ext = os.path.splitext(name)
        r = rank.get(ext)
        if r is None:
            continue
        stem = nfc(stem)
        if stem not in best or r < best[stem][0]:
            best[stem] = (r, name)
    return {stem: name for stem, (_, name) in best.items()}


_list_stems = list_stems


def _loose(text: str) -> str:
    """``text`` without case, accents (combining marks after NFKD) and surrounding blanks."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold().strip()


def near_miss(img_id: str, directory: Path, names: Sequence[str] | None = None) -> str | None:
    """The file of ``directory`` whose name most nearly matches ``img_id`` (for "no image file" errors):
    a stem equal up to case, accents (NFKD combining marks) and surrounding blanks, else the closest stem
    by ``difflib`` on those forms (ratio >= 0.8), else None. ``names`` (default: the folder listing) saves a listing."""
    if names is None:
        try:
            names = os.listdir(directory)
        except OSError:
            return None
    stems = {os.path.splitext(n)[0]: n for n in names}
    want = _loose(img_id)
    for stem, name in stems.items():
        if _loose(stem) == want:
            return name
    loose = {_loose(stem): name for stem, name in stems.items()}
    close = difflib.get_close_matches(want, list(loose), n=1, cutoff=0.8)
    return loose[close[0]] if close else None


def xml_object_names(path: Path) -> list[str]:
    """The ``<object><name>`` texts of a VOC annotation XML, in file order (blanks stripped).

    Raises:
        DataError: unparsable XML or an ``<object>`` without a name (names the file).
    """
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError) as exc:
        raise DataError(f"cannot parse annotation XML {path}: {exc}") from exc
    names = []
    for obj in tree.getroot().iter("object"):
        name_el = obj.find("name")
        if name_el is None or name_el.text is None or not name_el.text.strip():
            raise DataError(f"{path}: an <object> without a <name>")
        names.append(name_el.text.strip())
    return names


def read_split_list(path: Path) -> tuple[list[str], list[tuple[int, str]]]:
    """Read a split list ``ImageSets/Segmentation/<split>.txt``: one id per line, the whole line.

    Only the line end (``\\n``, ``\\r\\n``) is removed; blank lines are skipped. An id may hold spaces
    (``a b`` is the id ``a b``, never ``a``); an id that starts or ends with a blank is refused, since
    such blanks are invisible in the file and would silently name another file. Ids are NFC-normalised.

    Args:
        path: the text file (UTF-8).

    Returns:
        ``(ids, faults)``: the ids in file order (each once) and ``[(line number, fault), ...]`` for
        refused lines (leading/trailing blanks, duplicates); the caller raises or collects them.

    Raises:
        DataError: the file cannot be read or is not UTF-8 (names the file).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read split list {path}: {exc}") from exc
    ids: list[str] = []
    faults: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if line != line.strip():
            faults.append((lineno, f"id {line!r} starts or ends with a blank (remove the blanks, or rename the file)"))
            continue
        img_id = nfc(line)
        if img_id in seen:
            faults.append((lineno, f"duplicate id {img_id!r} (first on line {seen[img_id]})"))
            continue
        seen[img_id] = lineno
        ids.append(img_id)
    return ids, faults


def _fmt_ids(ids: Sequence[str], paths: Sequence[object] | None = None) -> str:
    shown = list(ids[:_MAX_LISTED])
    if paths is not None:
        items = [f"{i} ({p})" for i, p in zip(shown, paths[:_MAX_LISTED])]
    else:
        items = shown
    more = f" ... and {len(ids) - _MAX_LISTED} more" if len(ids) > _MAX_LISTED else ""
    return ", ".join(items) + more


class VOCDataset:
    """A split of a VOC-layout dataset: ids, images, image-level labels and GT masks.

    Ids come from ``root/ImageSets/Segmentation/<split>.txt`` (:func:`read_split_list`: one id per line,
    the whole line, so ids may hold spaces), or from ``list_file`` whose lines are ``<id> c1 c2 ...``
    with 0-based class indices (the ``train_cls.txt`` form of the public BESTIE code); labels then come
    from that file. Ids are NFC-normalised and matched to NFC-normalised file names.

    Without a list file, the labels of an image are the names of the ``<object>`` elements of
    ``Annotations/<id>.xml`` (all objects, "difficult" ones included); when that XML is missing, the
    class set of ``SegmentationClass/<id>.png`` (values ``1..C``, i.e. excluding 0 and 255).

    Construction checks, for all ids at once, that each image file exists and that each id has a label
    source; every error lists the offending ids (up to 10 by name, then a count).

    Args:
        root: dataset root directory.
        split: name of the ``ImageSets/Segmentation`` list (ignored when ``list_file`` is given).
        list_file: optional ``<id> c1 c2 ...`` list; relative paths are taken as given (cwd).
        class_names: the ``C`` class names in index order (default :data:`VOC_CLASSES`).
        skip_bad_images: drop ids whose image file is missing, truncated, not an image or otherwise
            undecodable, with a logged warning naming each file, instead of raising (every image is then
            decoded once at construction). Off, a missing file raises here and an undecodable one raises
            :class:`DataError` naming the file when it is read.

    Raises:
        DataError: missing root / split list / list file, a malformed list line, a class index outside
            ``0..C-1`` in the list file (names file, line and value), duplicate ids, missing image files
            (unless ``skip_bad_images``), ids without any label source.
        ConfigError: a bad ``class_names`` list.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        list_file: str | os.PathLike | None = None,
        class_names: Sequence[str] = VOC_CLASSES,
        skip_bad_images: bool = False,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.class_names: tuple[str, ...] = check_class_names(class_names)
        self._class_index = {n: i for i, n in enumerate(self.class_names)}
        if not self.root.is_dir():
            raise DataError(f"VOC dataset root is not a directory: {self.root}")
        self.list_file = Path(list_file) if list_file is not None else None
        self._list_labels: dict[str, tuple[int, ...]] | None = None
        if self.list_file is not None:
            ids, self._list_labels = self._read_list_file(self.list_file)
        else:
            ids = self._read_split(split)
        self._image_names = _list_stems(self.root / "JPEGImages", IMAGE_EXTENSIONS)
        missing = [i for i in ids if i not in self._image_names]
        if missing:
            paths = [self.root / "JPEGImages" / f"{i}.jpg" for i in missing]
            names = list(self._image_names.values())
            for k, i in enumerate(missing[:_MAX_LISTED]):
                hit = near_miss(i, self.root / "JPEGImages", names)
                if hit is not None:
                    paths[k] = f"{paths[k]}; nearest file on disk: {hit!r}"
            msg = f"{len(missing)} of {len(ids)} image(s) listed in {self._source} have no image file: " + _fmt_ids(
                missing, paths
            )
            ids = drop_missing_images(ids, missing, msg, skip_bad_images, log)
        if skip_bad_images and ids:
            paths = [self.root / "JPEGImages" / self._image_names[i] for i in ids]
            ids = drop_unreadable_images(ids, paths, self._source, log)
        self.ids: list[str] = ids
        self._xml = list_stems(self.root / "Annotations", (".xml",))
        self._cls_png = list_stems(self.root / "SegmentationClass", (".png",))
        self._obj_png = list_stems(self.root / "SegmentationObject", (".png",))
        if self._list_labels is None:
            unlabeled = [i for i in ids if i not in self._xml and i not in self._cls_png]
            if unlabeled:
                raise DataError(
                    f"{len(unlabeled)} id(s) of {self._source} have no label source (neither "
                    f"{self.root / 'Annotations'}/<id>.xml nor {self.root / 'SegmentationClass'}/<id>.png): "
                    + _fmt_ids(unlabeled)
                )
        self._labels_cache: dict[str, tuple[int, ...]] = {}
        self._id_set = set(self.ids)

    # ------------------------------------------------------------------ construction helpers
    def _read_split(self, split: str) -> list[str]:
        sets = self.root / "ImageSets" / "Segmentation"
        path = sets / f"{split}.txt"
        self._source = str(path)
        if not path.is_file():
            avail = sorted(p.stem for p in sets.glob("*.txt")) if sets.is_dir() else []
            raise DataError(f"split list not found: {path} (available splits: {avail or 'none'})")
        ids, faults = read_split_list(path)
        if faults:
            shown = "; ".join(f"line {n}: {m}" for n, m in faults[:_MAX_LISTED])
            more = f" ... and {len(faults) - _MAX_LISTED} more" if len(faults) > _MAX_LISTED else ""
            raise DataError(f"{path}: {len(faults)} bad line(s): {shown}{more}")
        return ids

    def _read_list_file(self, path: Path) -> tuple[list[str], dict[str, tuple[int, ...]]]:
        self._source = str(path)
        text = read_text(path, "list file")
        ids: list[str] = []
        labels: dict[str, tuple[int, ...]] = {}
        seen: dict[str, int] = {}
        c = self.num_classes
        for lineno, line in enumerate(text.splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            img_id, vals = nfc(fields[0]), fields[1:]
            if img_id in seen:
                raise DataError(f"{path}, line {lineno}: duplicate id {img_id!r} (first on line {seen[img_id]})")
            seen[img_id] = lineno
            idx: set[int] = set()
            for v in vals:
                try:
                    k = int(v)
                except ValueError as exc:
                    raise DataError(f"{path}, line {lineno}: class index {v!r} is not an integer") from exc
                if not 0 <= k < c:
                    raise DataError(f"{path}, line {lineno}: class index {k} outside 0..{c - 1} ({c} classes)")
                idx.add(k)
            ids.append(img_id)
            labels[img_id] = tuple(sorted(idx))
        return ids, labels

    # ------------------------------------------------------------------ basic accessors
    @property
    def num_classes(self) -> int:
        """``C``, the number of object classes (background not counted)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        src = self.list_file if self.list_file is not None else self.split
        return f"VOCDataset(root={str(self.root)!r}, split={str(src)!r}, images={len(self)}, classes={self.num_classes})"

    def _check_id(self, img_id: str) -> None:
        if img_id not in self._id_set:
            raise DataError(f"image id {img_id!r} is not in {self._source}")

    def image_path(self, img_id: str) -> Path:
        """Path of the image file of ``img_id`` (``JPEGImages/<id>.jpg`` or another listed extension)."""
        self._check_id(img_id)
        return self.root / "JPEGImages" / self._image_names[img_id]

    def image(self, img_id: str) -> np.ndarray:
        """The image as ``(H, W, 3)`` ``uint8`` RGB (see :func:`bestie.data.images.load_rgb`).

        Raises:
            DataError: unknown id, or an unreadable image file (names the path).
        """
        return load_rgb(self.image_path(img_id))

    def xml_path(self, img_id: str) -> Path:
        """``Annotations/<id>.xml`` (under its name on disk when that differs only in normalisation)."""
        return self.root / "Annotations" / self._xml.get(img_id, f"{img_id}.xml")

    def class_png_path(self, img_id: str) -> Path:
        """``SegmentationClass/<id>.png`` (under its name on disk)."""
        return self.root / "SegmentationClass" / self._cls_png.get(img_id, f"{img_id}.png")

    def object_png_path(self, img_id: str) -> Path:
        """``SegmentationObject/<id>.png`` (under its name on disk)."""
        return self.root / "SegmentationObject" / self._obj_png.get(img_id, f"{img_id}.png")

    # ------------------------------------------------------------------ labels
    def labels(self, img_id: str) -> tuple[int, ...]:
        """Image-level labels: sorted unique 0-based class indices (may be empty).

        Source: the list file if given, else ``Annotations/<id>.xml``, else ``SegmentationClass/<id>.png``.

        Raises:
            DataError: unknown id; unparsable XML; an object name not in ``class_names`` (names the XML
                file and the name); a class map value outside ``0..C`` and 255.
        """
        self._check_id(img_id)
        if self._list_labels is not None:
            return self._list_labels[img_id]
        hit = self._labels_cache.get(img_id)
        if hit is not None:
            return hit
        if img_id in self._xml:
            out = self._labels_from_xml(self.xml_path(img_id))
        else:
            cls = self.semantic_gt(img_id)
            assert cls is not None  # construction checked that a label source exists
            present = np.flatnonzero(np.bincount(cls.ravel(), minlength=256)[1 : self.num_classes + 1])
            out = tuple(int(k) for k in present)
        self._labels_cache[img_id] = out
        return out

    def _labels_from_xml(self, path: Path) -> tuple[int, ...]:
        idx: set[int] = set()
        for name in xml_object_names(path):
            k = self._class_index.get(name)
            if k is None:
                raise DataError(
                    f"{path}: object name {name!r} is not one of the {self.num_classes} dataset classes "
                    f"({', '.join(self.class_names)})"
                )
            idx.add(k)
        return tuple(sorted(idx))

    # ------------------------------------------------------------------ ground truth
    def has_gt(self, img_id: str) -> bool:
        """True when instance GT exists: both ``SegmentationClass`` and ``SegmentationObject`` PNGs."""
        self._check_id(img_id)
        return img_id in self._cls_png and img_id in self._obj_png

    def semantic_gt(self, img_id: str) -> np.ndarray | None:
        """The GT class map: ``(H, W)`` ``uint8``, 0 background, ``1..C`` class ``c+1``, 255 ignore.

        Returns:
            The map, or None when ``SegmentationClass/<id>.png`` does not exist.

        Raises:
            DataError: unreadable PNG, or values outside ``0..C`` and 255 (names the file and values).
        """
        self._check_id(img_id)
        if img_id not in self._cls_png:
            return None
        path = self.class_png_path(img_id)
        cls = load_label_png(path)
        hist = np.bincount(cls.ravel(), minlength=256)
        bad = np.flatnonzero(hist[self.num_classes + 1 : 255]) + self.num_classes + 1
        if bad.size:
            raise DataError(
                f"{path}: class value(s) {bad.tolist()} outside 0..{self.num_classes} and 255 "
                f"({self.num_classes} classes)"
            )
        return cls

    def instances_gt(self, img_id: str) -> dict[str, np.ndarray] | None:
        """GT instances from ``SegmentationObject`` + ``SegmentationClass`` (METHOD.md, evaluation protocol).

        Instance values are the non-zero, non-255 values of the object map, in ascending order; pixels
        0 and 255 belong to no instance. The class of an instance is the majority class (``1..C``) of its
        pixels in the class map (ties: the lower class).

        Returns:
            ``{"masks": (N, H, W) bool, "labels": (N,) int64 0-based}``, or None when either PNG is missing.

        Raises:
            DataError: unreadable PNG, the two maps differ in size, or an instance none of whose pixels
                carries a class ``1..C`` in the class map (names both files).
        """
        self._check_id(img_id)
        if not self.has_gt(img_id):
            return None
        cls = self.semantic_gt(img_id)
        assert cls is not None
        obj_path = self.object_png_path(img_id)
        obj = load_label_png(obj_path)
        if obj.shape != cls.shape:
            raise DataError(
                f"{obj_path} has size {obj.shape[::-1]} (WxH) but {self.class_png_path(img_id)} has {cls.shape[::-1]}"
            )
        # Joint histogram (instance value, class value) in one pass.
        joint = np.bincount(obj.ravel().astype(np.int64) * 256 + cls.ravel(), minlength=256 * 256).reshape(256, 256)
        inst_vals = np.flatnonzero(joint.sum(axis=1))
        inst_vals = inst_vals[(inst_vals != 0) & (inst_vals != 255)]
        votes = joint[inst_vals][:, 1 : self.num_classes + 1]  # (N, C)
        orphan = inst_vals[votes.sum(axis=1) == 0]
        if orphan.size:
            raise DataError(
                f"{obj_path}: instance value(s) {orphan.tolist()} have no pixel of a class 1..{self.num_classes} "
                f"in {self.class_png_path(img_id)}"
            )
        labels = votes.argmax(axis=1).astype(np.int64)
        masks = obj[None, :, :] == inst_vals.astype(np.uint8)[:, None, None]
        return {"masks": masks, "labels": labels}
