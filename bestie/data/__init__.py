"""Datasets and input file formats: images, VOC / COCO layouts, point records, demo data, augmentations.

:func:`build_dataset` turns the ``dataset`` section of ``config.yaml`` into a dataset object; VOC and
COCO datasets share the interface ``ids``, ``class_names``, ``num_classes``, ``len()``,
``image_path(id)``, ``image(id)``, ``labels(id)``, ``semantic_gt(id)``, ``instances_gt(id)``, ``has_gt(id)``.
"""

from __future__ import annotations

from typing import Any, Mapping

from bestie.config import parse_bool
from bestie.errors import ConfigError
from bestie.data.images import load_label_png, load_rgb
from bestie.data.voc import VOC_CLASSES, VOCDataset
from bestie.data.coco import COCODataset
from bestie.data.points import (
    centers_from_instances,
    empty_points,
    read_points_txt,
    validate_points,
    write_points_txt,
)

# ``bestie.data.demo`` is imported lazily (module ``__getattr__``) so that ``python -m bestie.data.demo``
# does not find the module already imported by its package.
_LAZY = {"DEMO_CLASSES": "bestie.data.demo", "generate_demo_dataset": "bestie.data.demo"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bestie.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "eval_dataset_cfg",
    "load_rgb",
    "load_label_png",
    "VOC_CLASSES",
    "VOCDataset",
    "COCODataset",
    "DEMO_CLASSES",
    "generate_demo_dataset",
    "read_points_txt",
    "write_points_txt",
    "validate_points",
    "centers_from_instances",
    "empty_points",
    "build_dataset",
    "default_split",
    "DATASET_FORMATS",
]

DATASET_FORMATS = ("voc", "coco")


def _voc_list_file(list_file: Any, split: str, list_split: str) -> str | None:
    """The list file that applies to ``split``: ``list_file`` with ``{split}`` filled in, the plain
    ``list_file`` when ``split`` is the training split ``list_split``, else None (use ImageSets)."""
    if not list_file:
        return None
    text = str(list_file)
    if "{split}" in text:
        return text.replace("{split}", split)
    return text if split == list_split else None


def default_split(cfg: Mapping[str, Any]) -> str:
    """The split a dataset section trains on: ``split``, else ``train_split``, else ``"train"``."""
    return cfg.get("split") or cfg.get("train_split") or "train"


def build_dataset(cfg: Mapping[str, Any], split: str | None = None) -> VOCDataset | COCODataset:
    """Build the dataset described by the ``dataset`` section of ``config.yaml``.

    Keys: ``format`` (``"voc"`` | ``"coco"``, required); ``split`` or ``train_split`` (the default split,
    in that order, else ``"train"``); VOC: ``root``, ``list_file`` (optional ``<id> c1 c2 ...`` list),
    ``classes`` (None = :data:`VOC_CLASSES`); COCO: ``ann_file``, ``image_dir`` (a ``{split}`` placeholder
    in either is replaced by the split); both: ``skip_bad_images`` (default False). Keys of the other
    format are ignored.

    A VOC ``list_file`` lists the images (and labels) of the **training** split only (``train_split``, or
    ``split``, else ``"train"``): for any other split it is not used and the split's own
    ``ImageSets/Segmentation/<split>.txt`` lists the images (labels from the XML / class PNGs). A
    ``{split}`` placeholder in ``list_file`` makes it apply to every split (``lists/{split}_cls.txt``).

    Args:
        cfg: the mapping.
        split: the split to build (default: the config's default split, see above).

    Raises:
        ConfigError: unknown format (the valid ones are listed) or a missing required key.
        DataError: from the dataset constructors (missing files, bad labels, ...).
    """
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"dataset: expected a mapping, got {type(cfg).__name__}")
    fmt = cfg.get("format")
    train_split = default_split(cfg)
    split_name = split if split is not None else train_split
    skip = parse_bool(cfg.get("skip_bad_images", False), "dataset.skip_bad_images")

    def need(key: str) -> Any:
        v = cfg.get(key)
        if v is None or v == "":
            raise ConfigError(f"dataset.{key} is required for dataset.format '{fmt}'")
        return v

    if fmt == "voc":
        classes = cfg.get("classes")
        return VOCDataset(
            root=need("root"),
            split=split_name,
            list_file=_voc_list_file(cfg.get("list_file") or None, split_name, train_split),
            class_names=tuple(classes) if classes else VOC_CLASSES,
            skip_bad_images=skip,
        )
    if fmt == "coco":
        ann = str(need("ann_file")).replace("{split}", split_name)
        img_dir = str(need("image_dir")).replace("{split}", split_name)
        return COCODataset(ann, img_dir, skip_bad_images=skip)
    raise ConfigError(f"dataset.format: unknown format {fmt!r}; valid formats: {', '.join(DATASET_FORMATS)}")


def eval_dataset_cfg(dataset_cfg: Mapping[str, Any], split: str) -> dict[str, Any]:
    """The dataset section adapted to the held-out split.

    - VOC: unchanged (:func:`bestie.data.build_dataset` itself uses a ``list_file`` for the training
      split only, so a held-out split is listed by its own ``ImageSets/Segmentation/<split>.txt``);
    - COCO: when ``split`` is the config's ``eval_split`` and ``eval_ann_file`` / ``eval_image_dir``
      are set, they replace ``ann_file`` / ``image_dir``.
    """
    cfg = dict(dataset_cfg)
    if cfg.get("format") == "coco" and split == cfg.get("eval_split", "val"):
        if cfg.get("eval_ann_file"):
            cfg["ann_file"] = cfg["eval_ann_file"]
        if cfg.get("eval_image_dir"):
            cfg["image_dir"] = cfg["eval_image_dir"]
    return cfg
