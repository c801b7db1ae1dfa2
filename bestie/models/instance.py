"""The BESTIE instance network: an encoder and three heads (METHOD.md section 4, "Network").

``BestieNet(x)`` returns, at the input size (or a requested output size):

- ``"seg"``: ``(B, C + 1, H, W)`` float32 semantic logits, channel 0 = background, ``c + 1`` = class ``c``;
- ``"center"``: ``(B, C, H, W)`` float32 class-wise instance-center heatmaps (targets are Gaussians in
  ``[0, 1]``). With ``center_mode="agnostic"`` the center head has one channel shared by every class
  (Panoptic-DeepLab's class-agnostic center heatmap; a documented departure from the paper's class-wise
  map, which at small data sizes learns only the dominant class): ``forward`` returns it broadcast to
  ``(B, C, H, W)`` (an ``expand`` view: read it, never write into it), so every consumer indexes class
  ``c`` as before, and ``forward_raw`` returns the single channel;
- ``"offset"``: ``(B, 2, H, W)`` float32 offsets ``(dy, dx)`` in pixels of the output size, pointing from a
  pixel to its instance center.

The heads run at stride 4. Their outputs are upsampled bilinearly (``align_corners=False``) to the
output size; the offsets are then multiplied by the upsampling factor of each axis (``dy`` by
``H / h``, ``dx`` by ``W / w``), so that the raw offset channels are in pixels of the stride-4 grid and
the returned ones in output pixels (as Panoptic-DeepLab's ``upsample_predictions``; the public BESTIE
code interpolated without rescaling, which only works when the output size equals the input size).

Two head designs (``head=``):

``"light"``
    The heads of the paper's HRNet model: each head is a 3x3 conv to ``head_channels`` (256) + ReLU +
    1x1 conv, on one stride-4 feature map.

    - HRNet (``hrnet_w32`` / ``hrnet_w48``): the feature is the high-resolution branch (32 / 48 channels)
      of the last stage. In BESTIE's pose-HRNet the last stage's fuse layer adds every lower-resolution
      branch (1x1 conv + BN + nearest upsampling) into that branch; timm's HRNet computes the same sum for
      its branch 0, so ``hrnet_fusion="branch0"`` (default) is the public model's input to the heads. As
      in the pose-HRNet (``multi_scale_output=False``), the last module's fuse layers of the other
      branches are removed (they would be computed for nothing and get no gradient).
      ``hrnet_fusion="concat"`` instead concatenates all four branches, upsampled bilinearly to stride 4
      (HRNetV2, the segmentation variant; 15 x 32 or 15 x 48 channels). timm's ``features_only`` HRNet
      returns the classification "incre" features by default; they are switched off here (the timm
      module then returns the raw branch outputs).
    - Other encoders (EfficientNet-Lite0, ResNet): a light FPN-style fusion brings the stride 4, 8, 16
      and 32 features to stride 4: per level a 1x1 conv to ``fusion_channels`` (64, about the width of
      HRNet's high-resolution branch) + BN + ReLU, bilinear upsampling to the stride-4 size, a sum, then
      a 3x3 conv + BN + ReLU. The heads read its output. (Our addition: the paper has no EfficientNet
      model.)

``"deeplab"``
    Panoptic-DeepLab decoders as in the public BESTIE ResNet models: a semantic branch (ASPP on the
    stride-32 feature, 256 channels, rates 3/6/9 at output stride 32 and 6/12/18 at 16; decoder fusing
    the stride 16, 8, 4 features projected to 128 / 64 / 32 channels with 5x5 depthwise-separable convs
    of 256 channels; head: 5x5 depthwise-separable conv to 256 + 1x1 conv) and an instance branch (same
    structure with low-level projections 64 / 32 / 16, decoder channels 128; center head 128 channels,
    offset head 32 channels). The ASPP projection ends with dropout 0.5 as in Panoptic-DeepLab.

Initialisation (public code): every conv of the heads and decoders ~ N(0, 0.001), biases 0, BN weight 1
and bias 0; the encoder keeps its (ImageNet / user / random) weights. Every BatchNorm layer of the
network gets ``momentum = bn_momentum`` (0.01, METHOD.md section 4).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bestie.errors import ConfigError, DataError
from bestie.models.backbones import BACKBONES, create_backbone

__all__ = [
    "HEADS",
    "CENTER_MODES",
    "BestieNet",
    "build_bestie_net",
    "convert_sync_batchnorm",
    "set_bn_momentum",
    "upsample_outputs",
]

log = logging.getLogger(__name__)

#: Valid head designs.
HEADS: tuple[str, ...] = ("light", "deeplab")
#: center heatmap designs: one channel per class (the paper) or one shared channel (Panoptic-DeepLab)
CENTER_MODES: tuple[str, ...] = ("class", "agnostic")
_HRNET_FUSIONS = ("branch0", "concat")
_OUT_INDICES = (1, 2, 3, 4)  # timm feature levels at strides 4, 8, 16, 32


# --------------------------------------------------------------------------- building blocks
def _conv_bn_relu(cin: int, cout: int, k: int, padding: int = 0, dilation: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=padding, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _dw_separable(cin: int, cout: int, k: int = 5) -> nn.Sequential:
    """Depthwise ``k x k`` conv + BN + ReLU, then pointwise 1x1 conv + BN + ReLU (Panoptic-DeepLab)."""
    return nn.Sequential(_conv_bn_relu(cin, cin, k, padding=k // 2, groups=cin), _conv_bn_relu(cin, cout, 1))


class _LightHead(nn.Module):
    """3x3 conv (bias) + ReLU + 1x1 conv: the head of BESTIE's HRNet model."""

    def __init__(self, cin: int, mid: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, mid, 3, padding=1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.out = nn.Conv2d(mid, cout, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.relu(self.conv(x)))


class _FPNFusion(nn.Module):
    """Light FPN-style fusion of stride 4..32 features into one stride-4 map (see module docstring)."""

    def __init__(self, in_channels: Sequence[int], channels: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(_conv_bn_relu(c, channels, 1) for c in in_channels)
        self.smooth = _conv_bn_relu(channels, channels, 3, padding=1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        out = self.lateral[0](feats[0])
        for lat, f in zip(self.lateral[1:], feats[1:]):
            out = out + F.interpolate(lat(f), size=size, mode="bilinear", align_corners=False)
        return self.smooth(out)


class _ASPPPooling(nn.Module):
    """Image pooling branch of ASPP: global average + 1x1 conv + ReLU (no BN, as Panoptic-DeepLab)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv(F.adaptive_avg_pool2d(x, 1)))
        return y.expand(-1, -1, x.shape[-2], x.shape[-1])


class _ASPP(nn.Module):
    def __init__(self, cin: int, cout: int, rates: Sequence[int], dropout: float) -> None:
        super().__init__()
        branches: list[nn.Module] = [_conv_bn_relu(cin, cout, 1)]
        branches += [_conv_bn_relu(cin, cout, 3, padding=r, dilation=r) for r in rates]
        branches.append(_ASPPPooling(cin, cout))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(_conv_bn_relu(cout * len(branches), cout, 1), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class _DeepLabDecoder(nn.Module):
    """ASPP on the stride-32 feature, then top-down fusion with the stride 16, 8, 4 features."""

    def __init__(self, in_channels: Sequence[int], aspp_channels: int, project: Sequence[int],
                 channels: int, rates: Sequence[int], dropout: float) -> None:
        super().__init__()
        self.aspp = _ASPP(in_channels[-1], aspp_channels, rates, dropout)
        low = list(in_channels[:-1])[::-1]  # strides 16, 8, 4
        self.project = nn.ModuleList(_conv_bn_relu(c, p, 1) for c, p in zip(low, project))
        fuse_in = [aspp_channels + project[0]] + [channels + p for p in project[1:]]
        self.fuse = nn.ModuleList(_dw_separable(c, channels) for c in fuse_in)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.aspp(feats[-1])
        for proj, fuse, f in zip(self.project, self.fuse, list(feats[:-1])[::-1]):
            low = proj(f)
            x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
            x = fuse(torch.cat([x, low], dim=1))
        return x


class _DeepLabHead(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int) -> None:
        super().__init__()
        self.conv = _dw_separable(cin, mid)
        self.out = nn.Conv2d(mid, cout, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.conv(x))


# --------------------------------------------------------------------------- helpers
def set_bn_momentum(module: nn.Module, momentum: float) -> int:
    """Set ``momentum`` on every BatchNorm layer (``nn.modules.batchnorm._BatchNorm``, timm's
    ``BatchNormAct2d`` and ``SyncBatchNorm`` included). Returns the number of layers changed."""
    n = 0
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = float(momentum)
            n += 1
    return n


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer by a SyncBatchNorm (DDP on GPUs; METHOD.md: "4 GPUs with SyncBN").

    Uses timm's converter, which keeps the fused activation of timm's ``BatchNormAct2d`` (torch's own
    converter would drop it). Momentum, affine parameters and running statistics are kept. SyncBatchNorm
    only runs on GPUs: call this for CUDA DDP runs only.
    """
    from timm.layers import convert_sync_batchnorm as _timm_convert

    return _timm_convert(model)


def upsample_outputs(outputs: Mapping[str, torch.Tensor], size: Sequence[int]) -> dict[str, torch.Tensor]:
    """Bilinearly upsample head outputs to ``size = (H, W)`` and rescale the offsets.

    Args:
        outputs: ``{"seg": (B, C+1, h, w), "center": (B, C, h, w), "offset": (B, 2, h, w)}``, offsets
            ``(dy, dx)`` in pixels of the ``h x w`` grid.
        size: output ``(H, W)`` in pixels.

    Returns:
        The same keys at ``(H, W)``, float32; ``offset[:, 0] *= H / h`` and ``offset[:, 1] *= W / w``, so
        offsets are in output pixels (``align_corners=False`` maps the grids by exactly these factors).
    """
    out_h, out_w = int(size[0]), int(size[1])
    result: dict[str, torch.Tensor] = {}
    for key, val in outputs.items():
        h, w = val.shape[-2:]
        if (h, w) != (out_h, out_w):
            val = F.interpolate(val.float(), size=(out_h, out_w), mode="bilinear", align_corners=False)
            if key == "offset":
                scale = val.new_tensor([out_h / h, out_w / w]).view(1, 2, 1, 1)
                val = val * scale
        result[key] = val.float()
    return result


# --------------------------------------------------------------------------- the network
class BestieNet(nn.Module):
    """Encoder + semantic / center / offset heads (METHOD.md section 4; see the module docstring).

    Args:
        backbone: encoder name, one of :data:`bestie.models.backbones.BACKBONES` except ``vgg16``
            (``tf_efficientnet_lite0`` is the CPU default; ``hrnet_w48`` the paper's).
        num_classes: ``C``, the number of object classes (the semantic head has ``C + 1`` channels).
        weights: encoder weights: ``"imagenet"`` (EfficientNet-Lite0 or -Lite2 package), a file path, or None
            for random initialisation (see :func:`bestie.models.backbones.create_backbone`).
        head: ``"light"`` or ``"deeplab"``.
        head_channels: hidden channels of each light head (256).
        fusion_channels: channels of the FPN-style fusion of the light head on non-HRNet encoders (64).
        hrnet_fusion: ``"branch0"`` (BESTIE) or ``"concat"`` (HRNetV2), light head on HRNet only.
        bn_momentum: momentum of every BatchNorm layer (0.01).
        output_stride: encoder output stride for ``head="deeplab"`` (None = 32, or 16 / 8 by dilation).
        aspp_dropout: dropout after the ASPP projection (0.5).
        center_mode: ``"class"`` (C center channels, the paper) or ``"agnostic"`` (one shared channel,
            returned broadcast to C channels; module docstring).
        warn_random: log a warning when the encoder starts from random weights.

    Attributes:
        mean, std: RGB normalisation of the encoder weights (inputs scaled to [0, 1]).
        config: the constructor arguments except ``weights`` (to rebuild the network from a checkpoint
            with :func:`build_bestie_net`).

    Raises:
        ConfigError: unknown backbone / head / fusion / center mode, ``num_classes < 1``, or an unsupported
            stride.
        WeightsError: missing or unfitting encoder weights.
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        weights: str | None = None,
        head: str = "light",
        *,
        head_channels: int = 256,
        fusion_channels: int = 64,
        hrnet_fusion: str = "branch0",
        bn_momentum: float = 0.01,
        output_stride: int | None = None,
        aspp_dropout: float = 0.5,
        center_mode: str = "class",
        warn_random: bool = True,
    ) -> None:
        super().__init__()
        if backbone not in BACKBONES or backbone == "vgg16":
            valid = ", ".join(b for b in BACKBONES if b != "vgg16")
            raise ConfigError(f"bestie.backbone: unknown or unsupported encoder {backbone!r}; valid: {valid}")
        if head not in HEADS:
            raise ConfigError(f"bestie.head: must be one of {', '.join(HEADS)}, got {head!r}")
        if hrnet_fusion not in _HRNET_FUSIONS:
            raise ConfigError(f"bestie.hrnet_fusion: must be one of {', '.join(_HRNET_FUSIONS)}, got {hrnet_fusion!r}")
        if int(num_classes) < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        if center_mode not in CENTER_MODES:
            raise ConfigError(f"bestie.center_mode: must be one of {', '.join(CENTER_MODES)}, got {center_mode!r}")
        is_hrnet = backbone.startswith("hrnet")
        if output_stride not in (None, 32) and head != "deeplab":
            raise ConfigError("bestie.output_stride: only the deeplab head uses a dilated encoder; set it to null")
        self.num_classes = int(num_classes)
        self.head_type = head
        self.center_mode = center_mode
        self.config: dict[str, Any] = {
            "backbone": backbone, "num_classes": self.num_classes, "head": head,
            "head_channels": int(head_channels), "fusion_channels": int(fusion_channels),
            "hrnet_fusion": hrnet_fusion, "bn_momentum": float(bn_momentum),
            "output_stride": output_stride, "aspp_dropout": float(aspp_dropout), "center_mode": center_mode,
        }
        self.encoder = create_backbone(backbone, weights, out_indices=_OUT_INDICES, output_stride=output_stride,
                                       warn_random=warn_random)
        self.mean = self.encoder.mean
        self.std = self.encoder.std
        channels = list(self.encoder.feature_info.channels())
        if is_hrnet:
            channels = self._hrnet_raw_branches()
        self._hrnet_branch0 = is_hrnet and head == "light" and hrnet_fusion == "branch0"
        self._hrnet_concat = is_hrnet and head == "light" and hrnet_fusion == "concat"
        if self._hrnet_branch0:
            self._hrnet_keep_branch0_only()
        C = self.num_classes
        center_ch = C if center_mode == "class" else 1
        outs = {"seg": C + 1, "center": center_ch, "offset": 2}
        if head == "light":
            if self._hrnet_branch0:
                self.fusion: nn.Module | None = None
                feat_ch = channels[0]
            elif self._hrnet_concat:
                self.fusion = None
                feat_ch = sum(channels)
            else:
                self.fusion = _FPNFusion(channels, int(fusion_channels))
                feat_ch = int(fusion_channels)
            self.heads = nn.ModuleDict({k: _LightHead(feat_ch, int(head_channels), v) for k, v in outs.items()})
            decoders: list[nn.Module] = [m for m in (self.fusion,) if m is not None]
        else:
            stride = output_stride or 32
            rates = (3, 6, 9) if stride == 32 else (6, 12, 18) if stride == 16 else (12, 24, 36)
            self.sem_decoder = _DeepLabDecoder(channels, 256, (128, 64, 32), 256, rates, aspp_dropout)
            self.ins_decoder = _DeepLabDecoder(channels, 256, (64, 32, 16), 128, rates, aspp_dropout)
            self.heads = nn.ModuleDict({
                "seg": _DeepLabHead(256, 256, C + 1),
                "center": _DeepLabHead(128, 128, center_ch),
                "offset": _DeepLabHead(128, 32, 2),
            })
            decoders = [self.sem_decoder, self.ins_decoder]
        for mod in decoders + [self.heads]:
            self._init_decoder(mod)
        set_bn_momentum(self, bn_momentum)

    # ------------------------------------------------------------------ construction helpers
    def _hrnet_raw_branches(self) -> list[int]:
        """Switch timm's HRNet to its raw branch outputs (strides 4..32) and return their channels."""
        body = self.encoder.body
        if getattr(body, "incre_modules", None) is not None:
            body.incre_modules = None  # timm's HighResolutionNetFeatures then returns the branch outputs
        was_training = body.training
        body.eval()
        with torch.no_grad():
            feats = body(torch.zeros(1, 3, 64, 64))
        body.train(was_training)
        chans = [int(f.shape[1]) for f in feats]
        strides = [64 // int(f.shape[-1]) for f in feats]
        if strides != [4, 8, 16, 32]:
            raise ConfigError(f"HRNet encoder returned strides {strides}, expected [4, 8, 16, 32]")
        return chans

    def _hrnet_keep_branch0_only(self) -> None:
        """Drop the last HRNet module's fuse layers of branches 1-3 (BESTIE's ``multi_scale_output=False``):
        only the fused high-resolution branch is computed, and no parameter is left without gradient
        (DDP would otherwise need ``find_unused_parameters``)."""
        last = self.encoder.body.stage4[-1]
        last.fuse_layers = last.fuse_layers[:1]

    @staticmethod
    def _init_decoder(module: nn.Module) -> None:
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, mean=0.0, std=0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ forward
    def forward_raw(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Head outputs at stride 4 (``(B, *, ceil(H/4), ceil(W/4))`` roughly), offsets in stride-4 pixels."""
        feats = self.encoder(x)
        if self.head_type == "light":
            if self._hrnet_branch0:
                f = feats[0]
            elif self._hrnet_concat:
                size = feats[0].shape[-2:]
                f = torch.cat([feats[0]] + [F.interpolate(t, size=size, mode="bilinear", align_corners=False)
                                            for t in feats[1:]], dim=1)
            else:
                assert self.fusion is not None
                f = self.fusion(feats)
            return {k: head(f) for k, head in self.heads.items()}
        sem = self.sem_decoder(feats)
        ins = self.ins_decoder(feats)
        return {"seg": self.heads["seg"](sem), "center": self.heads["center"](ins), "offset": self.heads["offset"](ins)}

    def forward(self, x: torch.Tensor, output_size: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Predict the three maps.

        Args:
            x: ``(B, 3, H, W)`` float images normalised with :attr:`mean` / :attr:`std`.
            output_size: ``(H_out, W_out)`` of the returned maps (default: the input size ``(H, W)``).

        Returns:
            ``{"seg": (B, C+1, H_out, W_out), "center": (B, C, H_out, W_out), "offset": (B, 2, H_out, W_out)}``
            float32; offsets ``(dy, dx)`` in output pixels (rescaled on upsampling).

        Raises:
            DataError: ``x`` is not ``(B, 3, H, W)``.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise DataError(f"BestieNet expects (B, 3, H, W) images, got shape {tuple(x.shape)}")
        size = tuple(output_size) if output_size is not None else tuple(x.shape[-2:])
        out = upsample_outputs(self.forward_raw(x), size)
        if self.center_mode == "agnostic":
            out["center"] = out["center"].expand(-1, self.num_classes, -1, -1)
        return out


def build_bestie_net(config: Mapping[str, Any], weights: str | None = None, warn_random: bool = False) -> BestieNet:
    """Rebuild a :class:`BestieNet` from its :attr:`BestieNet.config` dict (e.g. stored in a checkpoint).

    The encoder starts from ``weights`` (default None: random, without warning, since a checkpoint's
    state dict is loaded next).

    Raises:
        ConfigError: an unknown key or value in ``config``.
    """
    cfg = dict(config)
    known = {"backbone", "num_classes", "head", "head_channels", "fusion_channels", "hrnet_fusion",
             "bn_momentum", "output_stride", "aspp_dropout", "center_mode"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(f"BestieNet config: unknown key(s) {unknown}; valid keys: {sorted(known)}")
    backbone = cfg.pop("backbone")
    num_classes = cfg.pop("num_classes")
    head = cfg.pop("head", "light")
    return BestieNet(backbone, num_classes, weights, head, warn_random=warn_random, **cfg)
