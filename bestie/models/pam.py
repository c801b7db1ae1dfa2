"""Peak Attention Module (PAM) of BESTIE (docs/METHOD.md section 1; Kim et al., CVPR 2022, section 3.2)."""

from __future__ import annotations

import torch
from torch import nn

from bestie.params import PAM_ALPHA

__all__ = ["PAM", "PAM_ALPHA"]


class PAM(nn.Module):
    """Keep each channel's peak region and zero its weaker activations.

    ``x = relu(x)``; ``p_c = max_{h,w} x[c]`` per sample and channel; every activation ``< alpha * p_c`` is
    set to 0, the others pass unchanged (the gradient flows through the kept activations only). A channel
    that is all <= 0 becomes all 0.

    Args:
        alpha: the controller, in ``[0, 1]`` (0.7 in the paper).

    Shapes: ``(B, C, H, W)`` float in, same shape and dtype out.

    Raises:
        ValueError: ``alpha`` outside ``[0, 1]``, or an input that is not 4-D.
    """

    def __init__(self, alpha: float = PAM_ALPHA) -> None:
        super().__init__()
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"PAM alpha must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"PAM expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        x = torch.relu(x)
        peak = x.amax(dim=(2, 3), keepdim=True)
        return torch.where(x < self.alpha * peak, torch.zeros_like(x), x)
