"""Training samples of the BESTIE network (METHOD.md section 4).

:class:`BestieTrainDataset` turns one image of a dataset (``bestie.data.build_dataset``) into a training
sample: the image, its WSSS map (stage 3, HDF5 ``wsss`` per id), its points (peak points of stage 2,
HDF5 ``points`` per id, in the image setting; GT instance centers from ``instances_gt`` in the point
setting), augmented jointly, and the pseudo instance labels computed **after** augmentation, in compact form
(:func:`bestie.targets.pseudo_instance_components`: an ``int16`` component map, one row per component and
per Gaussian; issue 16). :func:`collate_compact` batches them and the training step renders the dense
centre / offset / weight targets on its device (:func:`bestie.targets.render_targets`), so no dense
``(C, S, S)`` tensor is made, pickled or copied on the host. :class:`DenseTargets` renders them on the host
(the learning probe's fixed batch, tests).

Augmentation, in order (reference settings of METHOD.md section 4; the public code's order):

1. photometric distortion (image only),
2. resize so that the long side is ``resize`` pixels (480; ``None``: keep the size),
3. random scale, a factor drawn from ``scales`` (0.7 .. 1.3 in steps of 0.1),
4. random crop ``crop_size`` (416). An image smaller than the crop is padded: the image with the mean
   pixel of the encoder normalisation (0 after normalisation), the semantic map with **255 = ignore**.
   (The public code padded the semantic map with 0 = background, which teaches the network that the
   padding is background.) Points outside the crop are dropped.
5. horizontal flip with probability 0.5.

Determinism: the augmentation of a sample depends only on ``(seed, epoch, index)`` through
:func:`bestie.engine.sample_rng` (``numpy.random.default_rng((seed, epoch, index))``): the same sample is
produced in any worker process, under any number of DDP processes and after a resume. The stream layout
of :class:`bestie.engine.ResumableSampler` yields those ``(index, epoch)`` keys for iteration-based
training.

Images whose label set is empty cannot give an instance and are excluded (a documented skip, counted
in :attr:`BestieTrainDataset.num_skipped_empty` and logged).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from bestie.data import transforms as T
from bestie.data.points import centers_from_instances, validate_points
from bestie.engine import sample_rng
from bestie.errors import ArtifactError, ConfigError, DataError
from bestie.io.h5store import H5Reader
from bestie.params import PseudoLabelParams
from bestie.targets import pseudo_instance_components, render_pseudo_targets

__all__ = ["BestieTrainDataset", "MAX_POINTS", "collate_compact", "DenseTargets"]

log = logging.getLogger(__name__)

#: Points kept per sample in the padded ``points`` tensor (the public code's class-wise buffer held 128).
MAX_POINTS = 128


def _fmt_ids(ids: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


class BestieTrainDataset(Dataset):
    """BESTIE training samples with pseudo instance labels (see the module docstring).

    Args:
        dataset: a dataset of ``bestie.data`` (``ids``, ``num_classes``, ``image(id)``, ``labels(id)``,
            ``instances_gt(id)``).
        wsss_h5: HDF5 store with a ``wsss`` ``(H, W)`` uint8 map per id (0 bg, ``c + 1``, 255 ignore),
            of the size of the image.
        points_h5: HDF5 store with ``points`` ``(N, 4)`` float32 per id (image setting; required there,
            ignored in the point setting).
        pseudo: :class:`~bestie.params.PseudoLabelParams` (``setting`` ``"image"`` or ``"point"``, ``sigma``,
            ``min_area``, ``point_threshold``: 6, 50, 0.7).
        crop_size: square crop side in pixels (416).
        resize: long side before the random scale (480), or None to keep the size.
        scales: random-scale factors (0.7 .. 1.3).
        mean, std: RGB normalisation of the encoder (inputs in [0, 1]).
        seed: augmentation seed (3407).
        photometric, flip: enable those augmentations.
        max_points: size of the padded ``points`` tensor.

    Raises:
        ConfigError: bad sizes, or ``points_h5`` missing in the image setting.
        ArtifactError: an id of the dataset missing from an HDF5 store (names the file and ids).
        DataError: every image has an empty label set, or (point setting) an image has no GT instances.
    """

    def __init__(
        self,
        dataset: Any,
        wsss_h5: str | os.PathLike,
        points_h5: str | os.PathLike | None = None,
        *,
        pseudo: PseudoLabelParams = PseudoLabelParams(),
        crop_size: int = 416,
        resize: int | None = 480,
        scales: Sequence[float] = T.DEFAULT_SCALES,
        mean: Sequence[float] = T.IMAGENET_MEAN,
        std: Sequence[float] = T.IMAGENET_STD,
        seed: int = 3407,
        photometric: bool = True,
        flip: bool = True,
        max_points: int = MAX_POINTS,
    ) -> None:
        setting = pseudo.setting
        if int(crop_size) < 1 or (resize is not None and int(resize) < 1):
            raise ConfigError(f"bestie.crop_size / bestie.resize must be positive, got {crop_size}, {resize}")
        if setting == "image" and points_h5 is None:
            raise ConfigError("bestie: the image setting needs the peak points HDF5 (points_h5)")
        self.dataset = dataset
        self.num_classes = int(dataset.num_classes)
        self.setting = setting
        self.wsss_path = Path(wsss_h5)
        self.points_path = Path(points_h5) if (points_h5 is not None and setting == "image") else None
        self.crop_size = int(crop_size)
        self.resize = None if resize is None else int(resize)
        self.scales = tuple(float(s) for s in scales)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.image_pad = tuple(int(round(255 * m)) for m in self.mean)
        self.pseudo = pseudo
        self.seed = int(seed)
        self.photometric, self.flip = bool(photometric), bool(flip)
        self.max_points = int(max_points)

        ids, labels, empty = [], [], []
        for img_id in dataset.ids:
            lab = tuple(int(c) for c in dataset.labels(img_id))
            if lab:
                ids.append(img_id)
                labels.append(lab)
            else:
                empty.append(img_id)
        self.num_skipped_empty = len(empty)
        if empty:
            log.info("BESTIE training: %d image(s) with an empty label set are excluded (no instance to learn): %s",
                     len(empty), _fmt_ids(empty))
        if not ids:
            raise DataError(f"BESTIE training: all {len(empty)} image(s) of the dataset have an empty label set")
        self.ids: list[str] = ids
        self.labels: list[tuple[int, ...]] = labels
        for path, what in ((self.wsss_path, "WSSS maps"), (self.points_path, "peak points")):
            if path is None:
                continue
            with H5Reader(path) as reader:
                missing = [i for i in ids if i not in reader]
            if missing:
                raise ArtifactError(f"{path}: {what} missing for {len(missing)} of {len(ids)} training image(s): "
                                    f"{_fmt_ids(missing)}")
        if setting == "point" and hasattr(dataset, "has_gt"):
            no_gt = [i for i in ids if not dataset.has_gt(i)]
            if no_gt:
                raise DataError(f"point setting: {len(no_gt)} training image(s) have no GT instances to take the "
                                f"points from: {_fmt_ids(no_gt)}")
        self._readers: dict[str, H5Reader] = {}
        self._reader_pid: int | None = None

    # ------------------------------------------------------------------ lazy per-process HDF5 readers
    def _reader(self, path: Path) -> H5Reader:
        pid = os.getpid()
        if self._reader_pid != pid:  # a forked worker must not share the parent's h5py handles
            self._readers = {}
            self._reader_pid = pid
        key = str(path)
        if key not in self._readers:
            self._readers[key] = H5Reader(path)
        return self._readers[key]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_readers"], state["_reader_pid"] = {}, None
        return state

    def __len__(self) -> int:
        return len(self.ids)

    # ------------------------------------------------------------------ loading
    def load_raw(self, index: int) -> dict[str, Any]:
        """The un-augmented inputs of sample ``index``.

        Returns:
            ``{"id", "image" (H, W, 3) uint8, "semantic" (H, W) uint8 WSSS map, "points" (N, 4) float32
            (off-image points dropped), "labels" tuple, "points_dropped" int}``.

        Raises:
            ArtifactError: a WSSS map of another size than the image (names file and id).
            DataError: malformed points, or (point setting) missing GT instances.
        """
        img_id = self.ids[index]
        image = self.dataset.image(img_id)
        h, w = image.shape[:2]
        wsss = np.asarray(self._reader(self.wsss_path).read_array(img_id, "wsss"))
        if wsss.shape != (h, w):
            raise ArtifactError(f"{self.wsss_path}: WSSS map of {img_id!r} is {wsss.shape} but the image is {(h, w)}")
        if wsss.dtype != np.uint8:
            if wsss.size and (wsss.min() < 0 or wsss.max() > 255):
                raise ArtifactError(f"{self.wsss_path}: WSSS map of {img_id!r} has values outside 0..255")
            wsss = wsss.astype(np.uint8)
        if self.setting == "image":
            assert self.points_path is not None
            raw = self._reader(self.points_path).read_array(img_id, "points")
            source = f"{self.points_path} [{img_id}]"
        else:
            gt = self.dataset.instances_gt(img_id)
            if gt is None:
                raise DataError(f"point setting: image {img_id!r} has no GT instances to take the points from")
            raw = centers_from_instances(gt["masks"], gt["labels"])
            source = f"GT centers of {img_id!r}"
        points, dropped = validate_points(raw, h, w, self.num_classes, source)
        return {"id": img_id, "image": image, "semantic": wsss, "points": points,
                "labels": self.labels[index], "points_dropped": dropped}

    def augment(self, raw: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """Apply the training augmentation (module docstring) to a raw sample; returns the sample dict."""
        sample = {"image": raw["image"], "semantic": raw["semantic"], "points": raw["points"]}
        if self.photometric:
            sample = T.photometric_distortion(sample, rng)
        if self.resize is not None:
            sample = T.resize_long(sample, self.resize)
        sample = T.random_scale(sample, rng, self.scales)
        sample = T.random_crop(sample, rng, self.crop_size, image_pad=self.image_pad, label_pad=255)
        if self.flip:
            sample = T.hflip(sample, rng)
        return sample

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        """One training sample with its pseudo instance labels in compact form; ``key`` is an index or an
        ``(index, epoch)`` pair (epoch 0 for an index), as :class:`bestie.engine.ResumableSampler` yields.
        Batch samples with :func:`collate_compact`; the dense targets are rendered from them on the device
        (:func:`bestie.targets.render_targets`), or on the host by :class:`DenseTargets`.

        Returns:
            dict of tensors:
            ``"image"`` ``(3, S, S)`` float32 normalised; ``"semantic"`` ``(S, S)`` uint8 (0 bg, ``c + 1``,
            255 ignore, incl. the crop padding); ``"components"`` ``(S, S)`` int16, ``"table"`` ``(K, 4)`` int32
            ``[class, y, x, accepted]`` and ``"gaussians"`` ``(G, 3)`` int32 ``[class, y, x]``
            (:func:`bestie.targets.pseudo_instance_components`); ``"labels"`` ``(C,)`` float32 multi-hot;
            ``"points"`` ``(P, 4)`` float32 ``x, y, class, conf`` in crop pixels, padded with zeros,
            highest confidence first; ``"num_points"`` int64 (valid rows); ``"num_instances"`` int64
            (accepted pseudo instances); ``"points_dropped"`` int64 (off-image points in the input);
            ``"index"`` int64. ``S`` = ``crop_size``, ``P`` = ``max_points``.
        """
        index = int(key[0]) if isinstance(key, (tuple, list)) else int(key)
        if not 0 <= index < len(self.ids):
            raise IndexError(f"sample index {index} outside 0..{len(self.ids) - 1}")
        rng = sample_rng(key, self.seed)
        raw = self.load_raw(index)
        sample = self.augment(raw, rng)
        sem = np.ascontiguousarray(sample["semantic"], dtype=np.uint8)
        pts = np.asarray(sample["points"], dtype=np.float32).reshape(-1, 4)
        comp = pseudo_instance_components(sem, raw["labels"], pts, num_classes=self.num_classes, params=self.pseudo)
        order = np.argsort(-pts[:, 3], kind="stable")[: self.max_points]
        padded = np.zeros((self.max_points, 4), dtype=np.float32)
        padded[: order.size] = pts[order]
        multi_hot = np.zeros(self.num_classes, dtype=np.float32)
        multi_hot[list(raw["labels"])] = 1.0
        image = T.normalize(sample["image"], self.mean, self.std)
        return {
            "image": torch.from_numpy(image),
            "semantic": torch.from_numpy(sem),
            "components": torch.from_numpy(comp["components"]),
            "table": torch.from_numpy(comp["table"]),
            "gaussians": torch.from_numpy(comp["gaussians"]),
            "labels": torch.from_numpy(multi_hot),
            "points": torch.from_numpy(padded),
            "num_points": torch.tensor(int(order.size), dtype=torch.int64),
            "num_instances": torch.tensor(int(comp["num_instances"]), dtype=torch.int64),
            "points_dropped": torch.tensor(int(raw["points_dropped"]), dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
        }


#: keys of a sample that vary in length (rows per component / Gaussian), concatenated by :func:`collate_compact`
_RAGGED = ("table", "gaussians")


def collate_compact(samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Batch :class:`BestieTrainDataset` samples (the DataLoader's ``collate_fn``).

    The fixed-size tensors are stacked (``torch.utils.data.default_collate``); the ragged ones are
    concatenated with the sample index as a first column: ``"table"`` ``(N, 5)`` int32
    ``[sample, class, y, x, accepted]``, ``"gaussians"`` ``(G, 4)`` int32 ``[sample, class, y, x]``, and
    ``"first_row"`` ``(B,)`` int64 is the row of ``table`` where each sample's components start (the
    arguments of :func:`bestie.targets.render_targets`).
    """
    fixed = default_collate([{k: v for k, v in s.items() if k not in _RAGGED} for s in samples])
    for key in _RAGGED:
        parts = [torch.cat([torch.full((s[key].shape[0], 1), i, dtype=torch.int32), s[key]], dim=1)
                 for i, s in enumerate(samples)]
        fixed[key] = torch.cat(parts, dim=0)
    counts = torch.tensor([s["table"].shape[0] for s in samples], dtype=torch.int64)
    fixed["first_row"] = torch.cumsum(counts, 0) - counts
    return fixed


class DenseTargets(Dataset):
    """A :class:`BestieTrainDataset` whose samples also carry the dense pseudo targets rendered on the host
    (``"center"`` ``(C, S, S)``, ``"offset"`` ``(2, S, S)``, ``"weight"`` ``(S, S)`` float32, as
    :func:`bestie.targets.make_pseudo_instance_labels` gives them) and ``"semantic"`` as int64: for the
    learning probe's fixed batch and for tests, not for the training loader."""

    def __init__(self, dataset: BestieTrainDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        s = dict(self.dataset[key])
        comp = {"components": s["components"].numpy(), "table": s["table"].numpy(),
                "gaussians": s["gaussians"].numpy(), "num_instances": int(s["num_instances"])}
        dense = render_pseudo_targets(comp, num_classes=self.dataset.num_classes, sigma=self.dataset.pseudo.sigma)
        s.update({k: torch.from_numpy(dense[k]) for k in ("center", "offset", "weight")})
        s["semantic"] = s["semantic"].long()
        for k in ("components",) + _RAGGED:
            s.pop(k)
        return s
