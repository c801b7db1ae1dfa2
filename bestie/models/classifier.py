"""CAM classifier, with or without the Peak Attention Module (docs/METHOD.md sections 1-2).

Backbone (last feature map) -> ``num_extra_convs`` x [3x3 conv + ReLU (+ PAM)] -> 1x1 conv to ``C`` class
maps -> global average pooling = logits. With ``use_pam=True`` this is the BESTIE PAM classifier whose
CAMs are peaky (one cue per object, for the peak points); with ``use_pam=False`` it is a plain CAM
classifier whose CAMs cover object extents (for the WSSS maps).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from bestie.models.backbones import create_backbone
from bestie.models.pam import PAM, PAM_ALPHA

__all__ = ["CAMClassifier"]


class CAMClassifier(nn.Module):
    """Multi-label classifier whose class maps are CAMs.

    Args:
        backbone_name: a name of :data:`bestie.models.backbones.BACKBONES`.
        num_classes: ``C``, the number of foreground classes (0-based indices).
        weights: backbone weights, see :func:`~bestie.models.backbones.create_backbone` (``"imagenet"``,
            a file path, or ``None`` for random initialisation).
        use_pam: follow each extra conv by :class:`~bestie.models.pam.PAM` (else by a ReLU only).
        alpha: the PAM controller (default :data:`~bestie.models.pam.PAM_ALPHA`).
        num_extra_convs: number of new 3x3 convs (the reference VGG16 head has 3 of 512 channels). With 0,
            PAM (when used) acts on the backbone features directly.
        extra_channels: width of the extra convs.
        output_stride: backbone output stride (8/16/32 or None for the native one).
        freeze_bn: keep the backbone's BatchNorm layers in eval mode with frozen affine parameters (as the
            IRN / PSA classifiers do; batch-5 statistics are too noisy to adapt them).
        frozen_levels: freeze the backbone layers of its first ``frozen_levels`` feature levels
            (:meth:`~bestie.models.backbones.Backbone.freeze_levels`; 3 = everything up to stride 8), which
            cuts the CPU backward cost roughly in half.
        head_dilation: dilation of the extra 3x3 convs; a model trained at output stride ``s`` and run at
            ``s / d`` needs ``d`` to compute the same function on the denser grid.
        backbone_head: put the backbone's own ImageNet feature head (EfficientNet-Lite0: 1x1 conv to 1280
            channels + BN + ReLU6) before the new layers: CAMs then come from the features the ImageNet
            classifier pools.
        warn_random: passed to the backbone (False when a checkpoint will overwrite the weights).

    ``forward(x)`` with ``x`` ``(B, 3, H, W)`` float (normalised with :attr:`mean` / :attr:`std`) returns
    ``{"logits": (B, C), "cams": (B, C, h, w)}``: ``cams`` are the raw class maps (before ReLU) at the
    backbone's output stride, ``logits`` their spatial mean.

    Raises:
        ConfigError / WeightsError: from the backbone; ValueError on non-positive sizes.
    """

    def __init__(
        self,
        backbone_name: str,
        num_classes: int,
        weights: str | os.PathLike | None,
        use_pam: bool = True,
        alpha: float = PAM_ALPHA,
        num_extra_convs: int = 2,
        extra_channels: int = 512,
        output_stride: int | None = None,
        freeze_bn: bool = False,
        frozen_levels: int = 0,
        head_dilation: int = 1,
        backbone_head: bool = False,
        warn_random: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if num_extra_convs < 0 or extra_channels < 1:
            raise ValueError(
                f"num_extra_convs must be >= 0 and extra_channels >= 1, got {num_extra_convs}, {extra_channels}")
        self.num_classes = int(num_classes)
        self.use_pam = bool(use_pam)
        self.freeze_bn = bool(freeze_bn)
        self.backbone = create_backbone(backbone_name, weights, out_indices=(-1,) if backbone_name != "vgg16" else (4,),
                                        output_stride=output_stride, warn_random=warn_random,
                                        with_head=backbone_head)
        if frozen_levels:
            self.backbone.freeze_levels(frozen_levels)
        layers: list[nn.Module] = []
        in_ch = self.backbone.out_channels
        if num_extra_convs == 0 and use_pam:
            layers.append(PAM(alpha))
        for _ in range(num_extra_convs):
            layers.append(nn.Conv2d(in_ch, extra_channels, 3, padding=head_dilation, dilation=head_dilation))
            layers.append(PAM(alpha) if use_pam else nn.ReLU(inplace=False))
            in_ch = extra_channels
        self.extra = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(in_ch, self.num_classes, 1)
        for m in [*self.extra.modules(), self.classifier]:
            if isinstance(m, nn.Conv2d):  # He (fan-out) init, zero bias, as the reference head
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
                nn.init.zeros_(m.bias)
        if self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    for p in m.parameters():
                        p.requires_grad_(False)

    @property
    def mean(self) -> tuple[float, float, float]:
        """RGB mean for inputs in ``[0, 1]`` (of the backbone weights)."""
        return self.backbone.mean

    @property
    def std(self) -> tuple[float, float, float]:
        """RGB std for inputs in ``[0, 1]`` (of the backbone weights)."""
        return self.backbone.std

    @property
    def stride(self) -> int:
        """Output stride of the class maps (input pixels per CAM pixel)."""
        return self.backbone.feature_info[-1].reduction

    def train(self, mode: bool = True) -> "CAMClassifier":
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)[-1]
        cams = self.classifier(self.extra(feats))
        return {"logits": cams.mean(dim=(2, 3)), "cams": cams}

    def param_groups(self, lr: float, weight_decay: float = 0.0, bias_decay: bool = True) -> list[dict[str, Any]]:
        """Optimizer parameter groups with the reference learning-rate multipliers (METHOD.md section 1).

        Backbone weights ``1 x lr``, backbone biases ``2 x lr``, new layers (extra convs and class conv)
        weights ``10 x lr``, biases ``20 x lr``. Biases are parameters named ``*.bias``; everything else
        (conv and norm weights) counts as a weight, as the reference groups by name. Frozen parameters
        (``requires_grad=False``) are left out. Each group carries ``"name"`` and ``"lr_mult"``.

        Args:
            lr: base learning rate.
            weight_decay: weight decay of every group (the reference decays biases too).
            bias_decay: False gives the bias groups weight decay 0.

        Returns:
            A list of 4 dicts for ``torch.optim`` (empty groups omitted).
        """
        mults = {"backbone_weight": 1.0, "backbone_bias": 2.0, "new_weight": 10.0, "new_bias": 20.0}
        groups: dict[str, list[nn.Parameter]] = {key: [] for key in mults}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            part = "backbone" if name.startswith("backbone.") else "new"
            kind = "bias" if name.endswith(".bias") else "weight"
            groups[f"{part}_{kind}"].append(p)
        out = []
        for key, params in groups.items():
            if params:
                wd = weight_decay if (bias_decay or key.endswith("weight")) else 0.0
                out.append({"params": params, "lr": lr * mults[key], "weight_decay": wd, "name": key,
                            "lr_mult": mults[key]})
        return out
