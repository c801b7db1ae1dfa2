"""The affinity network's pair geometry and training settings (numpy only: no torch import).

:func:`radius_offsets` and :class:`AffinityTrainParams` are used by :mod:`bestie.wsss.affinity` (which
re-exports both) and by the ``wsss`` config section (:class:`bestie.sections.WsssConfig`), which
validates its keys without loading torch. Source: AffinityNet (Ahn and Kwak, CVPR 2018), section 3.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bestie.errors import ConfigError

__all__ = ["radius_offsets", "AffinityTrainParams"]


def radius_offsets(radius: int) -> np.ndarray:
    """Half-disk of pixel offsets ``(dy, dx)`` with ``0 < dy^2 + dx^2 < radius^2`` (AffinityNet's set).

    Only one of ``d`` and ``-d`` is listed (``dy > 0``, or ``dy == 0`` and ``dx > 0``), so every unordered
    pair of pixels within the radius appears once. ``radius=5`` gives 34 offsets.

    Returns:
        ``(P, 2)`` int64 array of ``(dy, dx)`` (rows, columns of the grid).

    Raises:
        ConfigError: ``radius < 2`` (no neighbour would be within the radius).
    """
    if int(radius) < 2:
        raise ConfigError(f"affinity radius must be >= 2 grid pixels, got {radius!r}")
    r = int(radius)
    out = [(0, dx) for dx in range(1, r)]
    out += [(dy, dx) for dy in range(1, r) for dx in range(-r + 1, r) if dy * dy + dx * dx < r * r]
    return np.asarray(out, dtype=np.int64)


@dataclass(frozen=True)
class AffinityTrainParams:
    """Training settings of :func:`train_affinity_net`.

    Attributes:
        epochs: passes over the images (AffinityNet: 8).
        batch_size: images per step.
        lr: AdamW learning rate of the head (and ``lr / 10`` for the backbone when trained), poly decay
            (power 0.9) to 0.
        weight_decay: AdamW weight decay.
        crop: square training crop in pixels (a multiple of 32; padded with label 255 where the scaled
            image is smaller).
        scale_range: random rescale factors ``(lo, hi)`` of the image before cropping.
        radius: pair radius on the grid (grid pixels; AffinityNet: 5 at stride 8).
        seed: RNG seed (crops, flips, order, init).
    """

    epochs: int = 8
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    crop: int = 320
    scale_range: tuple[float, float] = (0.7, 1.3)
    radius: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"affinity epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.crop < 32 or self.crop % 32:
            raise ConfigError(f"affinity crop must be a positive multiple of 32, got {self.crop}")
        if not self.lr > 0:
            raise ConfigError(f"affinity lr must be > 0, got {self.lr}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ConfigError(f"affinity scale_range must satisfy 0 < lo <= hi, got {self.scale_range}")
        radius_offsets(self.radius)
