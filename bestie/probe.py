"""The learning probe of BESTIE training: is the center head learning, on a fixed set of training crops?

Self-refinement and inference both need center scores above a threshold (0.3 / 0.1). A network whose
center head stays near the all-zero prediction still lowers its loss (the weighted MSE of a near-zero
map against a small Gaussian inside a large pseudo instance is close to the loss of all zeros), so the
loss curve alone does not show whether the head learns. The probe measures it directly, every log window,
on the same ``n`` training crops (fixed augmentation), with the network in eval mode:

- ``probe_peak_score``: mean predicted center score at the pseudo-target peaks (the pixels where a pseudo
  Gaussian equals 1.0: a component's centroid in the image setting, a given point in the point setting),
  read on the channel of the peak's class;
- ``probe_peak_share``: share of those peaks whose score reaches the inference center threshold (0.1);
- ``probe_center_mse`` and ``probe_center_mse_zero``: the weighted center term of the loss (``x 200``)
  for the prediction and for the all-zero prediction; a learning head goes well below the second;
- ``probe_center_instance_share``: share of the instances that :func:`bestie.postprocess.get_instances`
  (inference thresholds) groups from a center (NMS or clustered) rather than the centre-less fallback
  (None when it finds no instance).

A perfect prediction (center map = pseudo target) scores 1.0 at every peak, ``probe_peak_share`` 1.0
and ``probe_center_mse`` 0.0. Our addition; the public code has no such diagnostic.

The few crops of the log windows hold few peaks (5 on coco128-voc's real labels, 28 with its GT
centres), so at the end of training :func:`probe_over_dataset` measures the same figures on one crop of
every training image (``probe_final`` in the end record, ``probe_crops`` crops), batch by batch from the
additive totals of :func:`probe_sums`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bestie.errors import ConfigError
from bestie.params import GroupingParams

__all__ = ["PROBE_EPOCH", "probe_keys", "collate_probe", "peak_scores", "probe_sums", "probe_figures", "probe_metrics",
           "probe_over_dataset"]

#: the epoch of the probe crops' augmentation keys ``(index, epoch)``; any fixed value gives fixed crops,
#: a large one keeps them apart from the first training epochs' crops
PROBE_EPOCH = 1_000_000


def probe_keys(num_samples: int, n: int) -> list[tuple[int, int]]:
    """``n`` dataset keys spread evenly over ``0..num_samples-1`` (all when ``n >= num_samples``).

    Returns:
        ``[(index, PROBE_EPOCH), ...]`` keys for :class:`bestie.instance_data.BestieTrainDataset` (the key
        order of :class:`bestie.engine.ResumableSampler`).

    Raises:
        ConfigError: ``n < 1`` or an empty dataset.
    """
    if n < 1 or num_samples < 1:
        raise ConfigError(f"learning probe: need n >= 1 crops of a non-empty dataset, got n={n}, "
                          f"{num_samples} samples")
    idx = np.unique(np.linspace(0, num_samples - 1, num=min(n, num_samples)).round().astype(np.int64))
    return [(int(i), PROBE_EPOCH) for i in idx]


def collate_probe(dataset: Any, keys: Sequence[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """The probe batch: the samples of ``keys`` stacked (``image (n, 3, S, S)``, ``semantic``, ``center``,
    ``offset``, ``weight``; see :meth:`bestie.instance_data.BestieTrainDataset.__getitem__`)."""
    samples = [dataset[k] for k in keys]
    return {k: torch.stack([s[k] for s in samples]) for k in ("image", "semantic", "center", "offset", "weight")}


def peak_scores(pred_center: torch.Tensor, target_center: torch.Tensor) -> torch.Tensor:
    """Predicted center scores at the pseudo-target peaks.

    Args:
        pred_center: ``(B, C, H, W)`` float predicted center maps (class-agnostic maps broadcast to C).
        target_center: ``(B, C, H, W)`` float pseudo targets; a peak is a pixel equal to 1.0 (the Gaussian
            peak of :func:`bestie.targets.draw_gaussian` is exactly 1).

    Returns:
        ``(P,)`` float32 scores, one per peak (empty when the targets have no peak).
    """
    peaks = target_center >= 1.0
    return pred_center[peaks].float()


def probe_sums(
    outputs: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    center_term: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    grouping: GroupingParams,
) -> dict[str, float]:
    """The probe's additive totals for one forward pass of a probe batch; :func:`probe_figures` turns the
    sum of several batches' totals into the figures of :func:`probe_metrics`.

    Args: as :func:`probe_metrics`.

    Returns:
        ``{"peaks", "peak_score_sum", "peaks_above", "mse_sum", "mse_zero_sum", "weighted_pixels",
        "instances", "instances_from_center"}`` (floats): the count of target peaks, the sum of their
        predicted scores and how many reach ``grouping.center_threshold``; the center term of the
        prediction and of the all-zero prediction, each times the batch's count of pixels with weight > 0
        (the term's denominator, so that the sums of several batches average exactly), that count; the
        instances :func:`bestie.postprocess.get_instances` finds, and how many of them come from a center.
    """
    from bestie.postprocess import SOURCE_FALLBACK, get_instances

    pred = outputs["center"].detach().float()
    target = batch["center"].to(pred.device)
    weight = batch["weight"].to(pred.device)
    scores = peak_scores(pred, target)
    count = float((weight > 0).sum())
    mse = float(center_term(pred, target, weight))
    mse_zero = float(center_term(torch.zeros_like(pred), target, weight))
    prob = F.softmax(outputs["seg"].detach().float(), dim=1).cpu().numpy()
    center = pred.cpu().numpy()
    offset = outputs["offset"].detach().float().cpu().numpy()
    n_inst = n_from_center = 0
    for i in range(prob.shape[0]):
        inst = get_instances(prob[i], center[i], offset[i], params=grouping, return_sources=True)
        n_inst += int(inst["sources"].size)
        n_from_center += int((inst["sources"] != SOURCE_FALLBACK).sum())
    return {
        "peaks": float(scores.numel()),
        "peak_score_sum": float(scores.sum()),
        "peaks_above": float((scores >= grouping.center_threshold).sum()),
        "mse_sum": mse * count,
        "mse_zero_sum": mse_zero * count,
        "weighted_pixels": count,
        "instances": float(n_inst),
        "instances_from_center": float(n_from_center),
    }


def probe_figures(sums: Mapping[str, float]) -> dict[str, Any]:
    """The figures of :func:`probe_metrics` from :func:`probe_sums` totals (of one batch or summed over
    several; the MSEs are 0 when no pixel has a positive weight, as the loss's)."""
    n_peaks, n_inst, count = int(sums["peaks"]), int(sums["instances"]), sums["weighted_pixels"]
    return {
        "probe_peaks": n_peaks,
        "probe_peak_score": sums["peak_score_sum"] / n_peaks if n_peaks else None,
        "probe_peak_share": sums["peaks_above"] / n_peaks if n_peaks else None,
        "probe_center_mse": sums["mse_sum"] / count if count else 0.0,
        "probe_center_mse_zero": sums["mse_zero_sum"] / count if count else 0.0,
        "probe_center_instance_share": sums["instances_from_center"] / n_inst if n_inst else None,
        "probe_instances": n_inst,
    }


def probe_metrics(
    outputs: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    center_term: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    grouping: GroupingParams,
) -> dict[str, Any]:
    """The probe's figures (module docstring) for one forward pass of the probe batch.

    Args:
        outputs: network outputs on ``batch["image"]`` at the crop size: ``"seg"`` ``(B, C+1, S, S)`` logits,
            ``"center"`` ``(B, C, S, S)``, ``"offset"`` ``(B, 2, S, S)``.
        batch: :func:`collate_probe` output (pseudo targets ``center``, ``weight``).
        center_term: the loss's center term, ``(pred, target, weight) -> scalar`` (e.g.
            :meth:`bestie.losses.BestieLoss.center_term`, so the MSE matches the training loss).
        grouping: the inference grouping (:class:`~bestie.params.GroupingParams`; its ``center_threshold``
            also sets ``probe_peak_share``).

    Returns:
        ``{"probe_peaks": int, "probe_peak_score": float | None, "probe_peak_share": float | None,
        "probe_center_mse": float, "probe_center_mse_zero": float, "probe_center_instance_share":
        float | None, "probe_instances": int}``.
    """
    return probe_figures(probe_sums(outputs, batch, center_term, grouping=grouping))


def probe_over_dataset(
    forward: Callable[[torch.Tensor], Mapping[str, torch.Tensor]],
    dataset: Any,
    keys: Sequence[tuple[int, int]],
    center_term: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    grouping: GroupingParams,
    batch_size: int = 8,
) -> dict[str, Any]:
    """The probe's figures over many crops, in batches of ``batch_size`` (exact: the totals of
    :func:`probe_sums` add up), plus ``"probe_crops"``.

    Args:
        forward: the network in eval mode, ``image (n, 3, S, S) -> outputs`` (as :func:`probe_metrics`);
            called under ``torch.no_grad``.
        dataset, keys: as :func:`collate_probe` (e.g. :func:`probe_keys` over the whole training set).
        center_term, grouping: as :func:`probe_metrics`.
        batch_size: crops per forward pass (>= 1).

    Raises:
        ConfigError: ``batch_size < 1`` or no keys.
    """
    if batch_size < 1 or not keys:
        raise ConfigError(f"learning probe: need batch_size >= 1 and at least one crop, got batch_size={batch_size}, "
                          f"{len(keys)} crops")
    total: dict[str, float] = {}
    for j in range(0, len(keys), batch_size):
        batch = collate_probe(dataset, keys[j:j + batch_size])
        with torch.no_grad():
            out = forward(batch["image"])
        for k, v in probe_sums(out, batch, center_term, grouping=grouping).items():
            total[k] = total.get(k, 0.0) + v
    return {"probe_crops": len(keys), **probe_figures(total)}
