"""How metrics are shown to a person: in percent with one decimal, everywhere.

Metrics files keep each evaluator's own unit (VOC / COCO AP and the semantic drift are fractions in
``[0, 1]``, mIoU is in percent already); every log line, terminal table and report cell formats them
with :func:`percent`, so that ``mAP50 0.2017827931458517`` is printed as ``mAP50 20.2``.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["percent"]


def percent(value: Any, *, fraction: bool = True, missing: str = "n/a") -> str:
    """A metric as a percent string with one decimal.

    Args:
        value: the metric; a fraction in ``[0, 1]`` (``fraction=True``, multiplied by 100) or a value in
            percent already (``fraction=False``, e.g. ``bestie.evaluation.semantic`` mIoU).
        fraction: whether ``value`` is a fraction.
        missing: what None, a non-number (bools included) or a non-finite value gives.

    Returns:
        e.g. ``"20.2"`` for ``0.2017827931458517``, ``"65.6"`` for ``65.63263437516986`` with
        ``fraction=False``, ``missing`` for None / NaN / inf.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return missing
    v = float(value)
    if not math.isfinite(v):
        return missing
    return f"{100.0 * v if fraction else v:.1f}"
