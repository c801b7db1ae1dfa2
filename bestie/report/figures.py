"""Figures of the HTML report: loss curves, precision-recall curves and instance overlays, as PNG bytes.

Plots use matplotlib's object API with the Agg canvas (``matplotlib.figure.Figure`` +
``FigureCanvasAgg``), so no global pyplot state or backend switch is involved and nothing needs a display.
Overlays are drawn with numpy/OpenCV: each instance mask is alpha-blended in its own colour, outlined,
and tagged with its class name (and score for predictions).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

__all__ = [
    "png_bytes",
    "figure_png",
    "loss_curve_png",
    "pr_curve_png",
    "draw_instances",
    "overlay_panel",
    "instance_colors",
    "label_map_overlay",
    "semantic_panel",
]

_LOSS_X_KEYS = ("iteration", "iter", "step", "epoch")
#: longer side (pixels) of an image panel: larger images are shrunk, smaller ones enlarged by an integer factor
MAX_SIDE = 720


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of an ``(H, W, 3)`` uint8 RGB image (lossless, via OpenCV).

    Raises:
        ValueError: not an (H, W, 3) uint8 array, or encoding failed.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"png_bytes: expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[:, :, ::-1]))
    if not ok:
        raise ValueError("png_bytes: OpenCV could not encode the image")
    return buf.tobytes()


def figure_png(fig: Any, dpi: int = 100) -> bytes:
    """Render a ``matplotlib.figure.Figure`` to PNG bytes with the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def _numeric(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


#: records of these events (or without an ``event`` key) are per-iteration training records
_TRAIN_EVENTS = (None, "train")


def loss_curve_png(records: Sequence[Mapping[str, Any]], title: str,
                   keys: Sequence[str] | None = None) -> bytes | None:
    """Loss curves of a JSON-lines training log.

    Args:
        records: log records; only per-iteration ones are drawn (no ``event`` key, or ``event ==
            "train"``: the classifier's ``epoch_end`` means and every ``start`` / ``end`` record are left
            out). The x axis is the first of ``iteration`` / ``iter`` / ``step`` / ``epoch`` present (else
            the record index). Non-finite values (logged as strings) are skipped.
        title: plot title.
        keys: the keys drawn, one curve each, the first one thicker (e.g. BESTIE's ``total``, ``seg``,
            ``center``, ``offset``); None: every key containing ``"loss"`` (``loss`` itself thicker).

    Returns:
        PNG bytes, or None when no record has a value of those keys.
    """
    from matplotlib.figure import Figure

    series: dict[str, tuple[list[float], list[float]]] = {}
    for i, rec in enumerate(records):
        if rec.get("event") not in _TRAIN_EVENTS:
            continue
        x = next((_numeric(rec.get(k)) for k in _LOSS_X_KEYS if _numeric(rec.get(k)) is not None), float(i))
        for key, value in rec.items():
            y = _numeric(value)
            wanted = key in keys if keys is not None else "loss" in key.lower()
            if wanted and y is not None:
                xs, ys = series.setdefault(key, ([], []))
                xs.append(x)
                ys.append(y)
    if not series:
        return None
    main = keys[0] if keys else "loss"
    order = [k for k in keys if k in series] if keys is not None else sorted(series, key=lambda k: (k != "loss", k))
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    positive = all(y > 0 for _, ys in series.values() for y in ys)
    for key in order:
        xs, ys = series[key]
        ax.plot(xs, ys, label=key, linewidth=2.0 if key == main else 1.0, marker="." if len(xs) < 30 else None)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel(next((k for k in _LOSS_X_KEYS if any(k in r for r in records)), "record"))
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return figure_png(fig)


def pr_curve_png(curve: Mapping[str, Any], title: str) -> bytes | None:
    """Precision-recall plot of a ``pr_curve`` entry of the evaluation metrics.

    Args:
        curve: ``{"recall": [R], "precision": [R] (mean over classes, None where undefined), "iou",
            "per_class": [{"name", "precision": [R] or None}]}`` (as :func:`bestie.stages.evaluate.pr_curves`).

    Returns:
        PNG bytes (mean curve thick, one thin line per class with GT), or None without data.
    """
    from matplotlib.figure import Figure

    recall = curve.get("recall") or []
    mean = curve.get("precision") or []
    if not recall or not any(p is not None for p in mean):
        return None
    fig = Figure(figsize=(5.2, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    for entry in curve.get("per_class") or []:
        p = entry.get("precision")
        if p:
            ax.plot(recall, p, linewidth=0.8, alpha=0.6, label=str(entry.get("name", "")))
    ax.plot(recall, [np.nan if p is None else p for p in mean], color="black", linewidth=2.2, label="mean")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"{title} (IoU {curve.get('iou', 0.5):g})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)  # outside the axes
    return figure_png(fig)


def instance_colors(n: int) -> np.ndarray:
    """``(n, 3)`` uint8 RGB colours, well apart in hue (golden-ratio steps), full saturation/value."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    hsv = np.stack([hues * 179.0, np.full(n, 220.0), np.full(n, 255.0)], axis=1).astype(np.uint8)
    return cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0] if n else np.zeros((0, 3), np.uint8)


def draw_instances(
    image: np.ndarray,
    instances: Mapping[str, Any] | None,
    class_names: Sequence[str],
    alpha: float = 0.45,
) -> np.ndarray:
    """Draw instances on a copy of ``image``.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        instances: ``{"masks": (N, H, W) bool, "labels": (N,) int 0-based[, "scores": (N,)]}`` or None.
        class_names: names per class index (an index outside the list is printed as a number).
        alpha: mask opacity.

    Returns:
        ``(H, W, 3)`` uint8 RGB: masks blended in per-instance colours, 1-px outlines, and a tag
        ``name`` / ``name score`` at the top-left of each mask.

    Raises:
        ValueError: masks whose size differs from the image.
    """
    out = image.astype(np.float32).copy()
    if not instances or len(instances.get("labels", [])) == 0:
        return image.copy()
    masks = np.asarray(instances["masks"]).astype(bool)
    if masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"draw_instances: masks {masks.shape[1:]} do not match the image {image.shape[:2]}")
    labels = np.asarray(instances["labels"])
    scores = instances.get("scores")
    colors = instance_colors(len(masks))
    # Paint low scores first so the best instances end on top.
    order = np.argsort(np.asarray(scores)) if scores is not None else np.arange(len(masks))
    for k in order:
        out[masks[k]] = out[masks[k]] * (1 - alpha) + colors[k].astype(np.float32) * alpha
    canvas = np.clip(out, 0, 255).astype(np.uint8)
    font = max(0.35, min(image.shape[:2]) / 600.0)
    tags: list[tuple[int, str, int, tuple[int, int], tuple[int, int]]] = []  # k, text, baseline, anchor x/y, w/h
    for k in order:
        contours, _ = cv2.findContours(masks[k].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, tuple(int(c) for c in colors[k]), 1)
        ys, xs = np.nonzero(masks[k])
        if ys.size == 0:
            continue
        c = int(labels[k])
        text = class_names[c] if 0 <= c < len(class_names) else str(c)
        if scores is not None:
            text = f"{text} {score_text(float(np.asarray(scores)[k]))}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font, 1)
        tags.append((int(k), text, base, (int(xs.min()), int(ys.min())), (tw + 4, th + base + 4)))
    # the best instance first claims its place; the others move down off the tags already placed
    tags = tags[::-1]
    boxes = tag_boxes([t[3] for t in tags], [t[4] for t in tags], image.shape[:2])
    for (k, text, baseline, _, _), (x, y, w, h) in zip(tags, boxes):
        # white text on a dark box of the instance's colour (readable on any background)
        cv2.rectangle(canvas, (x, y), (x + w - 1, y + h - 1), tuple(int(c) // 2 for c in colors[k]), cv2.FILLED)
        cv2.putText(canvas, text, (x + 2, y + h - 2 - baseline), cv2.FONT_HERSHEY_SIMPLEX, font, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return canvas


def score_text(score: float) -> str:
    """A score as printed in a tag: two decimals from 0.1 up, two significant digits below (``0.0023``, ``0.000087``:
    never in exponent form), so that the scores of a weak model are not all shown as ``0.00``."""
    if score >= 0.1 or score <= 0.0:
        return f"{score:.2f}"
    return np.format_float_positional(score, precision=2, unique=False, fractional=False, trim="k")


def tag_boxes(anchors: Sequence[tuple[int, int]], sizes: Sequence[tuple[int, int]],
              image_hw: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Places for text tags that stay inside the image and do not cover each other.

    Tag ``i`` wants its box (``sizes[i]`` = width, height in pixels) just above ``anchors[i]`` (x, y:
    the top-left corner of its mask), is shifted left / down to fit inside the image, and then moves
    down, one tag height at a time, while it overlaps a tag placed before it (earlier tags win: pass the
    most important first). A tag that finds no free place before the bottom edge stays at its last
    place there.

    Returns:
        Per tag ``(x, y, w, h)``: top-left corner and size in pixels (x = column, y = row).
    """
    h_img, w_img = image_hw
    placed: list[tuple[int, int, int, int]] = []
    for (ax, ay), (w, h) in zip(anchors, sizes):
        x = min(max(0, int(ax)), max(0, w_img - w))
        y = min(max(0, int(ay) - h), max(0, h_img - h))
        while any(x < px + pw and px < x + w and y < py + ph and py < y + h for px, py, pw, ph in placed):
            if y + h + h > h_img:
                break
            y += h
        placed.append((x, y, int(w), int(h)))
    return placed


def label_map_overlay(image: np.ndarray, label_map: np.ndarray, palette: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """A semantic label map blended over its image.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        label_map: ``(H, W)`` uint8, 0 = background (left as the image), ``1..C`` = classes, 255 =
            uncertain / ignore (blended like a class, in its palette colour).
        palette: ``(256, 3)`` uint8 RGB colour per label (e.g. the VOC colour map).
        alpha: opacity of the label colours.

    Returns:
        ``(H, W, 3)`` uint8 RGB.

    Raises:
        ValueError: a label map whose size differs from the image.
    """
    label_map = np.asarray(label_map)
    if label_map.shape != image.shape[:2]:
        raise ValueError(f"label_map_overlay: label map {label_map.shape} does not match the image {image.shape[:2]}")
    out = image.astype(np.float32)
    fg = label_map != 0
    out[fg] = out[fg] * (1 - alpha) + palette[label_map[fg]].astype(np.float32) * alpha
    return np.clip(out, 0, 255).astype(np.uint8)


def semantic_panel(image: np.ndarray, label_maps: Sequence[np.ndarray | None], palette: np.ndarray,
                   max_side: int = MAX_SIDE) -> np.ndarray:
    """``[image | map 1 | map 2 ...]`` panel of semantic label maps (a None map is skipped).

    Small images are enlarged by an integer factor (nearest neighbour) as in :func:`overlay_panel`, the
    panel is at most ``max_side`` px wide; 4-px white gaps separate the parts.

    Returns:
        ``(h, w, 3)`` uint8 RGB.
    """
    parts = [image] + [label_map_overlay(image, m, palette) for m in label_maps if m is not None]
    h, w = image.shape[:2]
    up = max(1, min(320 // max(h, w), (max_side - 4 * (len(parts) - 1)) // (len(parts) * w)))
    if up > 1:
        parts = [np.repeat(np.repeat(p, up, axis=0), up, axis=1) for p in parts]
    gap = np.full((parts[0].shape[0], 4, 3), 255, dtype=np.uint8)
    panel = np.concatenate([x for p in parts for x in (p, gap)][:-1], axis=1)
    f = max_side / max(panel.shape[:2])
    if f < 1:
        panel = cv2.resize(panel, (max(1, round(panel.shape[1] * f)), max(1, round(panel.shape[0] * f))),
                           interpolation=cv2.INTER_AREA)
    return panel


def _upscale(inst: Mapping[str, Any] | None, f: int) -> Mapping[str, Any] | None:
    if not inst or len(inst.get("labels", [])) == 0:
        return inst
    masks = np.asarray(inst["masks"])
    return {**inst, "masks": np.repeat(np.repeat(masks, f, axis=1), f, axis=2)}


def overlay_panel(
    image: np.ndarray,
    pred: Mapping[str, Any] | None,
    gt: Mapping[str, Any] | None,
    class_names: Sequence[str],
    max_side: int = MAX_SIDE,
) -> np.ndarray:
    """Side-by-side ``[GT | prediction]`` panel (the GT half is omitted when ``gt`` is None).

    Args:
        image: ``(H, W, 3)`` uint8 RGB; pred / gt: instance dicts (see :func:`draw_instances`).
        max_side: the panel is downscaled (area interpolation) so that its longer side is at most this;
            small images (longer side under 160 px) are first enlarged by the largest integer factor
            (nearest neighbour, image and masks alike) that keeps their longer side at most 320 px and
            the panel within ``max_side``, so that outlines and tags stay legible.

    Returns:
        ``(h, w, 3)`` uint8 RGB panel with a 4-px white gap between the halves.
    """
    h, w = image.shape[:2]
    halves = 2 if gt is not None else 1
    up = max(1, min(320 // max(h, w), (max_side - 4 * (halves - 1)) // (halves * w), max_side // h))
    if up > 1:
        image = np.repeat(np.repeat(image, up, axis=0), up, axis=1)
        pred, gt = (_upscale(inst, up) for inst in (pred, gt))
    parts = []
    if gt is not None:
        parts.append(draw_instances(image, gt, class_names))
    parts.append(draw_instances(image, pred, class_names))
    if len(parts) == 2:
        gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
        panel = np.concatenate([parts[0], gap, parts[1]], axis=1)
    else:
        panel = parts[0]
    f = max_side / max(panel.shape[:2])
    if f < 1:
        panel = cv2.resize(panel, (max(1, round(panel.shape[1] * f)), max(1, round(panel.shape[0] * f))),
                           interpolation=cv2.INTER_AREA)
    return panel
