"""Parameter groups of the instance pipeline, passed whole from a stage's config to the library.

Each group is a frozen dataclass whose field defaults are the values of METHOD.md section 4, defined here
once: the config sections of :mod:`bestie.sections` take their defaults from these classes and build the
groups (:meth:`~bestie.sections.BestieConfig.pseudo_label_params`,
:meth:`~bestie.sections.BestieConfig.refine_params`, :meth:`~bestie.sections.InferenceConfig.grouping_params`),
and the library functions take a group instead of loose keywords:

- :class:`PseudoLabelParams`: semantic knowledge transfer (:func:`bestie.targets.make_pseudo_instance_labels`,
  :class:`bestie.instance_data.BestieTrainDataset`, the pseudo-label baseline, and the setting / Gaussian /
  point filter of :func:`bestie.refine.refine_targets`);
- :class:`GroupingParams`: instance grouping of center / offset maps (:func:`bestie.postprocess.get_instances`,
  the learning probe, in-training validation);
- :class:`RefineParams`: the grouping of online self-refinement (:func:`bestie.refine.refine_targets`), whose
  component size limit is the pseudo labels' ``min_area`` (:meth:`RefineParams.grouping`).

Each ``__post_init__`` rejects a bad value with a :class:`~bestie.errors.ConfigError` naming the field. The
module imports neither torch nor numpy (``bestie check`` validates a config without them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bestie.errors import ConfigError

__all__ = ["PAM_ALPHA", "SETTINGS", "PseudoLabelParams", "GroupingParams", "RefineParams", "check_nms_kernel", "check_sigma"]

#: The PAM controller of the paper (0.7; METHOD.md section 1): activations below this fraction of their
#: channel's peak are zeroed. Here, not in :mod:`bestie.models.pam`, so that the torch-free config sections
#: take their default from the same constant.
PAM_ALPHA = 0.7

#: Supervision settings: image-level labels + peak points, or GT instance center points.
SETTINGS = ("image", "point")


def check_nms_kernel(nms_kernel: int) -> int:
    """The NMS window as an ``int``.

    Raises:
        ConfigError: not a positive odd integer (names the value).
    """
    if int(nms_kernel) != nms_kernel or nms_kernel < 1 or nms_kernel % 2 == 0:
        raise ConfigError(f"nms_kernel must be a positive odd integer, got {nms_kernel!r}")
    return int(nms_kernel)


def check_sigma(sigma: float) -> float:
    """A Gaussian sigma (pixels) as a ``float``.

    Raises:
        ConfigError: not a number, not finite, or ``<= 0``.
    """
    try:
        s = float(sigma)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"sigma must be a number, got {sigma!r}") from exc
    if not math.isfinite(s) or s <= 0:
        raise ConfigError(f"sigma must be > 0, got {sigma!r}")
    return s


def _check_min_area(min_area: int) -> None:
    if int(min_area) != min_area or min_area < 0:
        raise ConfigError(f"min_area must be a non-negative integer, got {min_area!r}")


@dataclass(frozen=True)
class PseudoLabelParams:
    """Pseudo instance labels from a WSSS map and points (METHOD.md section 4, "Semantic knowledge transfer").

    Attributes:
        setting: ``"image"`` (peak points of the CAMs; one Gaussian per accepted component, at its
            centroid) or ``"point"`` (GT center points; Gaussians at every kept point).
        sigma: standard deviation of the center Gaussians, pixels (6; kernel size ``6 sigma + 3``).
        min_area: 8-connected WSSS components with fewer pixels give no instance (50).
        point_threshold: points with a lower confidence are ignored (0.7).
        split_components: a WSSS component holding two or more kept points of its class is split into one
            part per point (each pixel to its nearest point, Euclidean) and every part of at least
            ``min_area`` pixels becomes a pseudo instance (:func:`bestie.targets.split_by_points`). False =
            the paper: such a component gives no instance. A documented departure (issue 15): on real
            images the CRF WSSS maps merge touching objects into one component, which the paper's rule drops.

    Raises:
        ConfigError: a setting outside :data:`SETTINGS`, ``sigma`` not a positive finite number, ``min_area``
            not a non-negative integer.
    """

    setting: str = "image"
    sigma: float = 6.0
    min_area: int = 50
    point_threshold: float = 0.7
    split_components: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.split_components, bool):
            raise ConfigError(f"split_components must be true or false, got {self.split_components!r}")
        if self.setting not in SETTINGS:
            raise ConfigError(f"setting must be 'image' or 'point', got {self.setting!r}")
        check_sigma(self.sigma)
        _check_min_area(self.min_area)


@dataclass(frozen=True)
class GroupingParams:
    """Instance grouping of center / offset maps (METHOD.md section 4, "Inference"; :mod:`bestie.postprocess`).

    Attributes:
        center_threshold: center scores ``<= center_threshold`` are never centers (0.1 at inference).
        nms_kernel: odd max-pool window of the center NMS, pixels (41).
        beta: center-clustering area tolerance (3); ``<= 0`` disables clustering.
        min_area: components of the semantic map with fewer pixels are ignored (50).
        min_center_support: a center of a component with several keeps its group only if at least this
            share of the group's pixels vote (``pixel + offset``) within 8 px (network input scale,
            :data:`bestie.postprocess.SUPPORT_RADIUS`) of it; the others' pixels are regrouped among the
            rest. In ``[0, 1]``; 0 = off, the paper (:func:`bestie.postprocess.supported_centers`).

    Raises:
        ConfigError: even or non-positive ``nms_kernel``, negative ``center_threshold`` or ``min_area``,
            ``min_center_support`` outside ``[0, 1]``.
    """

    center_threshold: float = 0.1
    nms_kernel: int = 41
    beta: float = 3.0
    min_area: int = PseudoLabelParams.min_area  # the same METHOD.md limit on WSSS / semantic components
    min_center_support: float = 0.0

    def __post_init__(self) -> None:
        check_nms_kernel(self.nms_kernel)
        _check_min_area(self.min_area)
        if self.center_threshold < 0:
            raise ConfigError(f"center_threshold must be >= 0, got {self.center_threshold!r}")
        if not 0.0 <= self.min_center_support <= 1.0:
            raise ConfigError(f"min_center_support must be in [0, 1], got {self.min_center_support!r}")


@dataclass(frozen=True)
class RefineParams:
    """Grouping of online self-refinement (METHOD.md section 4, "Self-refinement"; :mod:`bestie.refine`).

    Attributes:
        center_threshold: NMS threshold and fallback threshold of the refined centers (0.3).
        nms_kernel: odd NMS window, pixels (as :class:`GroupingParams`: 41).
        beta: center-clustering tolerance (as :class:`GroupingParams`: 3); ``<= 0`` disables clustering.
        max_instances: a WSSS component with more non-empty groups gives no target (5).

    Raises:
        ConfigError: as :class:`GroupingParams`, or ``max_instances`` not a positive integer.
    """

    center_threshold: float = 0.3
    nms_kernel: int = GroupingParams.nms_kernel
    beta: float = GroupingParams.beta
    max_instances: int = 5

    def __post_init__(self) -> None:
        self.grouping(0)  # validates the shared fields
        if int(self.max_instances) != self.max_instances or self.max_instances < 1:
            raise ConfigError(f"max_instances must be a positive integer, got {self.max_instances!r}")

    def grouping(self, min_area: int) -> GroupingParams:
        """The per-component grouping of refinement, on WSSS components of at least ``min_area`` pixels
        (the pseudo labels' :attr:`PseudoLabelParams.min_area`)."""
        return GroupingParams(center_threshold=self.center_threshold, nms_kernel=self.nms_kernel, beta=self.beta,
                              min_area=min_area)
