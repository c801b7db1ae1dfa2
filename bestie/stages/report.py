"""The run's final report: one metrics table for every stage, and a self-contained HTML page.

Stages and what the table shows of them (all in **percent**):

=============  ==========================================  =====================================
key            stage (metrics file)                         columns
=============  ==========================================  =====================================
cams_pam       CAMs of the PAM classifier (diagnostics)     mIoU (``best_mIoU`` over thresholds)
cams_dense     CAMs of the dense classifier (diagnostics)   mIoU (``best_mIoU``)
wsss           WSSS maps (diagnostics)                      mIoU
baseline       pseudo labels by semantic transfer only      mAP25 / 50 / 70 / 75
bestie         BESTIE instances = pseudo labels (train)     mAP25 / 50 / 70 / 75, semantic drift
maskrcnn       Mask R-CNN on the held-out split             mAP25 / 50 / 70 / 75, COCO AP / AP50 / AP75
=============  ==========================================  =====================================

Units: ``bestie.evaluation.semantic`` reports mIoU in percent and is shown as is; the VOC and COCO
evaluators report AP as fractions in ``[0, 1]``, and the semantic drift (share of GT-instance pixels the
BESTIE semantic branch calls background) is a fraction too: both are shown multiplied by 100, one decimal
(:func:`bestie.report.units.percent`). Missing stages (not run, or not part of this setting) are listed as
missing; other keys become extra rows with the same columns.

The HTML page (written atomically, nothing external: images are base64 PNG ``data:`` URIs) holds, in
this order: the header (run, dataset, splits), the table, the stage wall and CPU times of the
workflow's benchmark files, per-class APs (BESTIE and Mask R-CNN), the training loss curves (classifiers,
BESTIE, Mask R-CNN), precision-recall curves (BESTIE and Mask R-CNN) and overlays: CAMs, WSSS maps, BESTIE
pseudo labels and Mask R-CNN predictions next to the GT. Instance overlays are drawn at a score threshold
chosen from the data (:func:`best_f1_threshold`), stated in each section's caption.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from bestie.errors import ArtifactError
from bestie.report.units import percent

__all__ = [
    "STAGES",
    "COLUMNS",
    "OverlaySample",
    "summarize_metrics",
    "collect_metrics",
    "metrics_table",
    "read_jsonl",
    "overlays_from_predictions",
    "overlays_from_instances",
    "overlays_from_wsss",
    "ImagePanel",
    "best_f1_threshold",
    "read_benchmarks",
    "per_class_rows",
    "pr_curve_from_instances",
    "prediction_threshold",
    "instances_threshold",
    "run",
    "run_workflow_report",
]

log = logging.getLogger(__name__)

#: Known stages in table order: key -> row label.
STAGES: dict[str, str] = {
    "cams_pam": "CAMs (PAM classifier)",
    "cams_dense": "CAMs (dense classifier)",
    "wsss": "WSSS maps",
    "baseline": "Pseudo labels, semantic transfer only",
    "bestie": "BESTIE instances (pseudo labels)",
    "maskrcnn": "Mask R-CNN",
}
#: Table columns (all in percent); ``drift`` is the semantic drift of the BESTIE predictions.
COLUMNS: tuple[str, ...] = ("mIoU", "mAP25", "mAP50", "mAP70", "mAP75", "AP", "AP50", "AP75", "drift")
_FRACTION_KEYS = ("mAP25", "mAP50", "mAP70", "mAP75", "AP", "AP50", "AP75")
#: loss keys drawn per training log of the workflow (None: every key containing "loss")
LOSS_KEYS: dict[str, tuple[str, ...] | None] = {"bestie_log": ("total", "seg", "center", "offset")}
#: at most this many instances are drawn per overlay image (highest scores first)
MAX_DRAWN = 12
#: images per overlay section
NUM_OVERLAYS = 4
#: overlays draw the instances scoring at least this when no F1-best threshold is given
OVERLAY_SCORE = 0.5
#: mask IoU at which detections match GT for the F1-best threshold and the precision-recall curve
MATCH_IOU = 0.5
#: images with GT scored for the F1-best threshold / for the report's own precision-recall curve
F1_MAX_IMAGES = 200
PR_MAX_IMAGES = 500


@dataclass
class OverlaySample:
    """One overlay of the report.

    Attributes:
        title: caption (e.g. the image id).
        image: ``(H, W, 3)`` uint8 RGB.
        pred: predicted instances ``{"masks": (N, H, W) bool, "labels": (N,) int 0-based, "scores": (N,)}``.
        gt: GT instances ``{"masks", "labels"}`` or None.
        class_names: names per class index.
        drawn: how the drawn predictions were chosen (e.g. ``score >= 0.133``), for the caption.
    """

    title: str
    image: np.ndarray
    pred: Mapping[str, Any] | None
    gt: Mapping[str, Any] | None
    class_names: Sequence[str]
    drawn: str = ""


@dataclass
class ImagePanel:
    """A ready panel of the report (e.g. image | WSSS map | GT).

    Attributes:
        title: caption.
        image: ``(H, W, 3)`` uint8 RGB.
    """

    title: str
    image: np.ndarray


OverlayItem = Union[OverlaySample, ImagePanel, tuple, str, os.PathLike]


# ------------------------------------------------------------------------------------------ metrics
def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(float(v)) else None


def summarize_metrics(data: Mapping[str, Any]) -> dict[str, Any]:
    """The table columns of one stage's metrics JSON, in percent.

    ``mIoU`` is taken from ``mIoU`` (else ``best_mIoU``), already in percent; ``mAP25..75`` and COCO
    ``AP``, ``AP50``, ``AP75`` and ``drift`` (from ``semantic_drift``) are fractions and are multiplied by
    100. Absent or non-numeric values are None. ``split`` and ``num_images`` are copied when present.
    """
    out: dict[str, Any] = {}
    miou = _num(data.get("mIoU"))
    out["mIoU"] = miou if miou is not None else _num(data.get("best_mIoU"))
    for key in _FRACTION_KEYS:
        v = _num(data.get(key))
        out[key] = None if v is None else 100.0 * v
    drift = _num(data.get("semantic_drift"))
    out["drift"] = None if drift is None else 100.0 * drift
    for key in ("split", "num_images"):
        if key in data:
            out[key] = data[key]
    return out


def _read_json(path: str | os.PathLike) -> Any:
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{p}: not a readable JSON file ({exc})") from exc


def collect_metrics(metrics: Mapping[str, str | os.PathLike | Mapping[str, Any] | None]) -> dict[str, dict[str, Any]]:
    """Table rows of the given stages: key -> ``{"label", "source", "missing", columns...}``.

    Args:
        metrics: stage key -> metrics JSON path (or the already parsed dict; None or a missing file
            gives a row marked ``missing``). Known keys (:data:`STAGES`) come first in their order.

    Raises:
        ArtifactError: a file that exists but is not valid JSON (names it).
    """
    keys = [k for k in STAGES if k in metrics] + [k for k in metrics if k not in STAGES]
    rows: dict[str, dict[str, Any]] = {}
    for key in keys:
        src = metrics[key]
        row: dict[str, Any] = {"label": STAGES.get(key, key), "source": None, "missing": False}
        data: Any = None
        if isinstance(src, Mapping):
            data = src
        elif src is not None:
            row["source"] = os.fspath(src)
            try:
                data = _read_json(src)
            except FileNotFoundError:
                data = None
        if not isinstance(data, Mapping):
            row["missing"] = True
            row.update({c: None for c in COLUMNS})
        else:
            row.update(summarize_metrics(data))
        rows[key] = row
    return rows


def _fmt(v: Any) -> str:
    return percent(v, fraction=False, missing="-")


def metrics_table(metrics: Mapping[str, Any]) -> str:
    """Plain-text table of the stage metrics (what ``bestie show-metrics`` / ``make demo`` print).

    Args:
        metrics: the combined metrics written by :func:`run` / :func:`run_workflow_report` (a dict with
            ``"stages"``), or a mapping stage key -> metrics dict / JSON path (summarised here).

    Returns:
        Lines ``stage | split | mIoU mAP25 mAP50 mAP70 mAP75 AP AP50 AP75 drift`` (percent, one decimal,
        ``-`` where a stage has no such value, ``(missing)`` for a stage without metrics).
    """
    rows = metrics["stages"] if isinstance(metrics.get("stages"), Mapping) else collect_metrics(metrics)
    head = ["stage", "split", *COLUMNS]
    body = []
    for row in rows.values():
        if row.get("missing"):
            body.append([row.get("label", "?"), "", "(missing)"] + [""] * (len(COLUMNS) - 1))
        else:
            body.append([row.get("label", "?"), str(row.get("split") or "")] + [_fmt(row.get(c)) for c in COLUMNS])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        left = [cells[i].ljust(widths[i]) for i in range(2)]
        right = [cells[i].rjust(widths[i]) for i in range(2, len(cells))]
        return "  ".join(left + right).rstrip()

    rule = "-" * len(line(head))
    title = ("metrics in percent (mIoU: semantic; mAP: VOC instance AP at IoU 0.25/0.5/0.7/0.75; AP: COCO mask AP; "
             "drift: semantic drift, GT-instance pixels predicted background)")
    return "\n".join([title, line(head), rule, *(line(r) for r in body)])


# ---------------------------------------------------------------------------------------------- logs
def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSON-lines log; blank and unparsable lines are skipped (a killed run may leave a
    truncated last line). A missing file gives an empty list."""
    p = Path(path)
    if not p.is_file():
        return []
    records = []
    for lineno, text in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError:
            log.warning("%s, line %d: not JSON, skipped", p, lineno)
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def read_benchmarks(bench_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Wall and CPU time of each job from Snakemake's benchmark files (``<bench_dir>/<job>.tsv``).

    Args:
        bench_dir: the run's ``benchmarks`` folder (a missing folder gives an empty list).

    Returns:
        ``[{"job": file stem, "s": wall seconds, "cpu_time": CPU seconds (user + system), "max_rss":
        MB}]`` in the order the jobs finished (file modification time); a value that is ``NA`` or not
        a number is None; with several rows (``--benchmark-repeats``) the last one counts. Files without
        a data row are skipped with a warning.
    """
    d = Path(bench_dir)
    if not d.is_dir():
        return []
    rows = []
    for f in sorted(d.glob("*.tsv"), key=lambda p: (p.stat().st_mtime, p.name)):
        lines = [ln.split("\t") for ln in f.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        if len(lines) < 2:
            log.warning("%s: no benchmark row, skipped", f)
            continue
        rec = dict(zip(lines[0], lines[-1]))

        def num(key: str) -> float | None:
            try:
                v = float(rec.get(key, "NA"))
            except ValueError:
                return None
            return v if math.isfinite(v) else None

        rows.append({"job": f.stem, "s": num("s"), "cpu_time": num("cpu_time"), "max_rss": num("max_rss")})
    return rows


# ------------------------------------------------------------------------------------------ per class
_AP_KEYS = (("0.25", "AP25"), ("0.5", "AP50"), ("0.7", "AP70"), ("0.75", "AP75"))


def per_class_rows(data: Mapping[str, Any], class_names: Sequence[str] | None = None) -> list[dict[str, Any]] | None:
    """Per-class AP rows of one stage's metrics: ``[{"class", "num_gt", "AP25", ..., "AP75"[, "coco_AP"]}]``.

    Takes ``per_class`` (the list of ``bestie evaluate``) when present, else builds the rows from the VOC
    evaluator's result under ``voc`` (``per_class`` by IoU threshold, ``num_gt``), as
    ``bestie predict-instances`` writes it; class names from ``class_names``, else the metrics'
    ``class_names``, else the index. APs stay fractions. None when neither is there.
    """
    pc = data.get("per_class")
    if isinstance(pc, list) and pc and isinstance(pc[0], Mapping):
        return [dict(r) for r in pc]
    voc = data.get("voc")
    if not isinstance(voc, Mapping) or not isinstance(voc.get("per_class"), Mapping) or not voc["per_class"]:
        return None
    per = voc["per_class"]
    names = list(class_names or data.get("class_names") or [])
    num_gt = list(voc.get("num_gt") or [])
    rows = []
    for c in range(max(len(v) for v in per.values())):
        row: dict[str, Any] = {"class": names[c] if c < len(names) else str(c),
                               "num_gt": num_gt[c] if c < len(num_gt) else None}
        for t, key in _AP_KEYS:
            if t in per and c < len(per[t]):
                row[key] = per[t][c]
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ overlays
def _keep(inst: Mapping[str, Any], score_threshold: float | None, max_drawn: int) -> dict[str, np.ndarray]:
    """Instances with ``score >= score_threshold`` (None: the 3 best), at most ``max_drawn``, best first."""
    scores = np.asarray(inst["scores"], dtype=np.float32)
    order = np.argsort(-scores, kind="stable")
    if score_threshold is None:
        order = order[:3]
    else:
        order = order[scores[order] >= score_threshold]
    order = order[:max_drawn]
    return {"masks": np.asarray(inst["masks"])[order], "labels": np.asarray(inst["labels"])[order],
            "scores": scores[order]}


def _drawn(score_threshold: float | None) -> str:
    return "the 3 best" if score_threshold is None else f"score >= {score_threshold:.3f}"


def _pick_ids(dataset: Any, candidates: Sequence[str], num: int | None) -> list[str]:
    """The first ``num`` ids (dataset order; None: all) among ``candidates`` that have GT instances."""
    picked = []
    wanted = set(candidates)
    for image_id in dataset.ids:
        if num is not None and len(picked) >= num:
            break
        if image_id in wanted and dataset.has_gt(image_id):
            picked.append(image_id)
    return picked


def _gt(dataset: Any, image_id: str) -> dict[str, np.ndarray] | None:
    gt = dataset.instances_gt(image_id)
    if gt is not None and "iscrowd" in gt:
        keep = ~np.asarray(gt["iscrowd"], dtype=bool)
        gt = {"masks": gt["masks"][keep], "labels": gt["labels"][keep]}
    return gt


def best_f1_threshold(
    pairs: Iterable[tuple[Mapping[str, Any], Mapping[str, Any]]], num_classes: int, iou: float = MATCH_IOU
) -> tuple[float | None, dict[str, Any]]:
    """The score threshold of the best F1 over a set of images, at mask IoU ``>= iou``.

    Detections are matched to GT as the VOC evaluator does (:class:`bestie.evaluation.voc.
    VOCInstanceEvaluator`: class-aware, highest score first, each GT matched once); over all images and
    classes, sorted by descending score, ``F1(k) = 2 TP(k) / (k + num_gt)`` for the top ``k``; the
    threshold is the score of the detection at the best ``k``.

    Args:
        pairs: ``(pred, gt)`` per image: ``pred`` ``{"masks": (N, H, W) bool, "labels": (N,) int 0-based,
            "scores": (N,)}``, ``gt`` ``{"masks": (M, H, W) bool, "labels": (M,)}``.
        num_classes: ``C``.
        iou: match threshold.

    Returns:
        ``(threshold or None when no detection matches any GT, {"f1", "precision", "recall", "num_images",
        "num_detections", "num_gt", "iou"})`` (fractions).

    Raises:
        DataError: inconsistent instance dicts (from the evaluator).
    """
    from bestie.evaluation.voc import VOCInstanceEvaluator

    ev = VOCInstanceEvaluator(num_classes, (iou,))
    for pred, gt in pairs:
        ev.update(pred, gt)
    scores, _, tp = ev._class_tp()
    num_gt = int(sum(ev.evaluate()["num_gt"]))
    info: dict[str, Any] = {"f1": None, "precision": None, "recall": None, "num_images": ev.num_images,
                            "num_detections": int(scores.size), "num_gt": num_gt, "iou": float(iou)}
    if scores.size == 0 or num_gt == 0:
        return None, info
    order = np.argsort(-scores, kind="stable")
    ctp = np.cumsum(tp[order, 0].astype(np.float64))
    k = np.arange(1, scores.size + 1, dtype=np.float64)
    f1 = 2.0 * ctp / (k + num_gt)
    best = int(np.argmax(f1))
    if f1[best] <= 0:
        return None, info
    info.update(f1=float(f1[best]), precision=float(ctp[best] / k[best]), recall=float(ctp[best] / num_gt))
    return float(scores[order][best]), info


def _prediction_records(dataset: Any, predictions_json: str | os.PathLike) -> dict[str, list[dict]]:
    results = _read_json(predictions_json)
    if not isinstance(results, list):
        raise ArtifactError(f"{predictions_json}: expected a COCO results list")
    per_image: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        if "image_key" not in r:
            raise ArtifactError(f"{predictions_json}: result records lack 'image_key' (not written by bestie evaluate)")
        per_image[str(r["image_key"])].append(r)
    return per_image


def _decode_records(recs: Sequence[Mapping[str, Any]], shape: tuple[int, int],
                    cat_to_label: Mapping[int, int]) -> dict[str, np.ndarray]:
    from bestie.io.coco_json import decode_rle

    recs = [r for r in recs if int(r["category_id"]) in cat_to_label]
    masks = np.stack([decode_rle(r["segmentation"]) for r in recs]) if recs else np.zeros((0, *shape), bool)
    return {"masks": masks.astype(bool),
            "labels": np.asarray([cat_to_label[int(r["category_id"])] for r in recs], dtype=np.int64),
            "scores": np.asarray([float(r["score"]) for r in recs], dtype=np.float32)}


def _image_shape(dataset: Any, image_id: str, gt: Mapping[str, Any] | None) -> tuple[int, int]:
    if gt is not None and np.asarray(gt["masks"]).ndim == 3:
        return tuple(np.asarray(gt["masks"]).shape[1:])  # type: ignore[return-value]
    return tuple(dataset.image(image_id).shape[:2])  # type: ignore[return-value]


def prediction_threshold(dataset: Any, predictions_json: str | os.PathLike, max_images: int = F1_MAX_IMAGES,
                         iou: float = MATCH_IOU) -> tuple[float | None, dict[str, Any]]:
    """:func:`best_f1_threshold` of a COCO results file of ``bestie evaluate`` over the first ``max_images``
    images with GT (dataset order)."""
    from bestie.io.coco_json import category_ids

    per_image = _prediction_records(dataset, predictions_json)
    cat_to_label = {cid: i for i, cid in enumerate(category_ids(dataset))}

    def pairs():
        for image_id in _pick_ids(dataset, list(per_image), max_images):
            gt = _gt(dataset, image_id)
            yield _decode_records(per_image[image_id], _image_shape(dataset, image_id, gt), cat_to_label), gt

    return best_f1_threshold(pairs(), dataset.num_classes, iou)


def instances_threshold(dataset: Any, instances_h5: str | os.PathLike, max_images: int = F1_MAX_IMAGES,
                        iou: float = MATCH_IOU) -> tuple[float | None, dict[str, Any]]:
    """:func:`best_f1_threshold` of an instances HDF5 of ``bestie predict-instances`` over the first
    ``max_images`` images with GT (dataset order)."""
    from bestie.io.h5store import H5Reader

    with H5Reader(instances_h5) as reader:
        pairs = ((reader.read(i), _gt(dataset, i)) for i in _pick_ids(dataset, reader.ids(), max_images))
        return best_f1_threshold(pairs, dataset.num_classes, iou)


def overlays_from_predictions(
    dataset: Any, predictions_json: str | os.PathLike, num: int = NUM_OVERLAYS,
    score_threshold: float | None = OVERLAY_SCORE, max_drawn: int = MAX_DRAWN,
) -> list[OverlaySample]:
    """Overlays of COCO results with an ``image_key`` field (the predictions JSON of ``bestie evaluate``).

    The first ``num`` images of the dataset that have GT and at least one record are used; results with a
    score below ``score_threshold`` are not drawn (None: the 3 best of each image), nor more than
    ``max_drawn`` per image (the best ones). Category ids map back to classes by the dataset's category
    ids (:func:`bestie.io.coco_json.category_ids`).

    Raises:
        ArtifactError: an unreadable JSON file, or records without ``image_key``.
    """
    from bestie.io.coco_json import category_ids

    per_image = _prediction_records(dataset, predictions_json)
    cat_to_label = {cid: i for i, cid in enumerate(category_ids(dataset))}
    out = []
    for image_id in _pick_ids(dataset, list(per_image), num):
        image = dataset.image(image_id)
        pred = _decode_records(per_image[image_id], image.shape[:2], cat_to_label)
        out.append(OverlaySample(image_id, image, _keep(pred, score_threshold, max_drawn), _gt(dataset, image_id),
                                 list(dataset.class_names), _drawn(score_threshold)))
    return out


def overlays_from_instances(
    dataset: Any, instances_h5: str | os.PathLike, num: int = NUM_OVERLAYS,
    score_threshold: float | None = OVERLAY_SCORE, max_drawn: int = MAX_DRAWN,
) -> list[OverlaySample]:
    """Overlays of an instances HDF5 of ``bestie predict-instances`` (arrays ``masks``, ``labels``,
    ``scores`` per image id), first ``num`` images with GT, instances with ``score >= score_threshold``
    (None: the 3 best), at most ``max_drawn`` per image.

    Raises:
        ArtifactError: a missing or corrupt HDF5 file.
    """
    from bestie.io.h5store import H5Reader

    out = []
    with H5Reader(instances_h5) as reader:
        for image_id in _pick_ids(dataset, reader.ids(), num):
            inst = _keep(reader.read(image_id), score_threshold, max_drawn)
            out.append(OverlaySample(image_id, dataset.image(image_id), inst, _gt(dataset, image_id),
                                     list(dataset.class_names), _drawn(score_threshold)))
    return out


def overlays_from_wsss(dataset: Any, wsss_h5: str | os.PathLike, num: int = NUM_OVERLAYS) -> list[ImagePanel]:
    """``image | WSSS map | GT semantic map`` panels of the first ``num`` images of a WSSS store
    (``wsss`` arrays, 0 background, ``c + 1`` class ``c``, 255 uncertain), in the VOC colour map; the GT
    part is left out where the dataset has no semantic GT (COCO).

    Raises:
        ArtifactError: a missing or corrupt HDF5 file.
    """
    from bestie.io.h5store import H5Reader
    from bestie.report.figures import semantic_panel
    from bestie.io.palette import voc_palette

    palette = voc_palette()
    out = []
    with H5Reader(wsss_h5) as reader:
        stored = set(reader.ids())
        for image_id in [i for i in dataset.ids if i in stored][:num]:
            image = dataset.image(image_id)
            gt = dataset.semantic_gt(image_id)
            out.append(ImagePanel(image_id, semantic_panel(image, [reader.read(image_id)["wsss"], gt], palette)))
    return out


def pr_curve_from_instances(dataset: Any, instances_h5: str | os.PathLike, iou: float = MATCH_IOU,
                            max_images: int | None = PR_MAX_IMAGES) -> dict[str, Any] | None:
    """Precision-recall curve of an instances HDF5 against the dataset's GT, as ``bestie evaluate``
    computes it for the Mask R-CNN (:func:`bestie.stages.evaluate.pr_curves`, COCOeval segm), over the
    first ``max_images`` images with GT (None: all). None without such images.

    Raises:
        ArtifactError: a missing or corrupt HDF5 file.
    """
    from bestie.io.coco_json import instances_to_coco_results
    from bestie.io.h5store import H5Reader
    from bestie.evaluation.coco import build_coco_gt, pr_curves
    from bestie.io.coco_json import category_ids

    cat_ids = category_ids(dataset)
    gts, coco_ids, results = [], [], []
    with H5Reader(instances_h5) as reader:
        for k, image_id in enumerate(_pick_ids(dataset, reader.ids(), max_images), start=1):
            gts.append(_gt(dataset, image_id))
            coco_ids.append(k)
            results += instances_to_coco_results(k, reader.read(image_id), lambda c: cat_ids[c])
    if not gts:
        return None
    curve = pr_curves(build_coco_gt(gts, coco_ids, cat_ids, dataset.class_names), results, iou)
    curve["source"] = f"{curve.get('source', '')}; {len(gts)} images, computed by the report"
    return curve


# ---------------------------------------------------------------------------------------------- HTML
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; } .missing { color: #999; font-style: italic; } .note { color: #555; font-size: .9em; }
figure { display: inline-block; margin: .4em; vertical-align: top; } figcaption { font-size: .85em; color: #444; }
img { max-width: 100%; } img.small { width: 240px; image-rendering: pixelated; } img.panel { width: 540px; }
"""


def _img_tag(png: bytes, alt: str, cls: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    klass = f' class="{cls}"' if cls else ""
    return f'<img{klass} src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _metrics_html(rows: Mapping[str, Mapping[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ("stage", "split", *COLUMNS))
    body = []
    for row in rows.values():
        label = html.escape(str(row.get("label")))
        if row.get("missing"):
            src = html.escape(str(row.get("source") or ""))
            body.append(f'<tr><td>{label}</td><td colspan="{len(COLUMNS) + 1}" class="missing">missing {src}</td></tr>')
            continue
        cells = "".join(f'<td class="num">{_fmt(row.get(c))}</td>' for c in COLUMNS)
        body.append(f"<tr><td>{label}</td><td>{html.escape(str(row.get('split') or ''))}</td>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _per_class_html(per_class: Sequence[Mapping[str, Any]]) -> str:
    cols = [k for k in ("class", "num_gt", "AP25", "AP50", "AP70", "AP75", "coco_AP") if any(k in r for r in per_class)]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for r in per_class:
        cells = []
        for c in cols:
            v = r.get(c)
            if c in ("class",):
                cells.append(f"<td>{html.escape(str(v))}</td>")
            elif c == "num_gt":
                cells.append(f'<td class="num">{"-" if v is None else int(v)}</td>')
            else:
                cells.append(f'<td class="num">{percent(v, missing="-")}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _seconds(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f} s" if v < 120 else f"{v / 60:.1f} min"


def _benchmarks_html(rows: Sequence[Mapping[str, Any]]) -> str:
    head = "".join(f"<th>{c}</th>" for c in ("job", "wall", "CPU", "CPU / wall", "max RSS (MB)"))
    body = []
    for r in rows:
        ratio = f"{r['cpu_time'] / r['s']:.2f}" if r.get("cpu_time") is not None and r.get("s") else "-"
        rss = "-" if r.get("max_rss") is None else f"{r['max_rss']:.0f}"
        body.append(f"<tr><td>{html.escape(str(r['job']))}</td><td class='num'>{_seconds(r.get('s'))}</td>"
                    f"<td class='num'>{_seconds(r.get('cpu_time'))}</td><td class='num'>{ratio}</td>"
                    f"<td class='num'>{rss}</td></tr>")
    wall = sum(r["s"] or 0.0 for r in rows)
    cpu = sum(r["cpu_time"] or 0.0 for r in rows)
    body.append(f"<tr><th>sum</th><th class='num'>{_seconds(wall)}</th><th class='num'>{_seconds(cpu)}</th>"
                "<th></th><th></th></tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _overlay_html(item: OverlayItem) -> str:
    from bestie.report.figures import overlay_panel, png_bytes

    if isinstance(item, (str, os.PathLike)):
        p = Path(item)
        if not p.is_file():
            raise ArtifactError(f"overlay image {p} does not exist")
        return (f"<figure>{_img_tag(p.read_bytes(), p.name, 'small')}<figcaption>{html.escape(p.name)}"
                "</figcaption></figure>")
    if isinstance(item, ImagePanel):
        return (f"<figure>{_img_tag(png_bytes(item.image), item.title, 'panel')}<figcaption>{html.escape(item.title)}"
                "</figcaption></figure>")
    if isinstance(item, tuple):
        if len(item) == 3:
            item = OverlaySample("", item[0], item[1], item[2], [])
        elif len(item) in (4, 5):
            item = OverlaySample(str(item[0]), item[1], item[2], item[3], list(item[4]) if len(item) == 5 else [])
        else:
            raise ValueError(f"overlay tuple must be (image, pred, gt) or (title, image, pred, gt[, class_names]), "
                             f"got {len(item)} items")
    panel = overlay_panel(item.image, item.pred, item.gt, item.class_names)
    n_pred = 0 if not item.pred else len(item.pred.get("labels", []))
    sides = "GT | prediction" if item.gt is not None else "prediction"
    how = f" at {item.drawn}" if item.drawn else ""
    cap = f"{html.escape(item.title)} ({sides}, {n_pred} drawn{html.escape(how)})"
    return f"<figure>{_img_tag(png_bytes(panel), item.title, 'panel')}<figcaption>{cap}</figcaption></figure>"


LogSpec = Union[str, os.PathLike, tuple]


def run(
    metrics: Mapping[str, str | os.PathLike | Mapping[str, Any] | None],
    logs: Mapping[str, LogSpec],
    overlays: Sequence[OverlayItem] | Mapping[str, Sequence[OverlayItem]],
    out_html: str | os.PathLike,
    *,
    title: str = "BESTIE weakly-supervised instance segmentation: report",
    info: Mapping[str, Any] | None = None,
    benchmarks: Sequence[Mapping[str, Any]] | None = None,
    pr_curves: Mapping[str, Mapping[str, Any] | None] | None = None,
    notes: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write the HTML report and return the combined metrics.

    Args:
        metrics: stage key -> metrics JSON path or dict (:data:`STAGES`; missing stages allowed).
        logs: curve title -> JSON-lines training log, or ``(log, keys)`` with the keys to draw
            (:func:`bestie.report.figures.loss_curve_png`); missing / empty logs are noted, not fatal.
        overlays: :class:`OverlaySample` s, :class:`ImagePanel` s, tuples ``(image, pred, gt)`` /
            ``(title, image, pred, gt[, class_names])``, or paths of ready PNG images; or a mapping
            section title -> such a list.
        out_html: output page, written atomically (UTF-8, self-contained).
        title: page title.
        info: extra key/value lines for the page header (run name, dataset, ...).
        benchmarks: rows of :func:`read_benchmarks` (None or empty: the section says so).
        pr_curves: stage key -> precision-recall curve for stages whose metrics hold none (``pr_curve``).
        notes: section title -> a note printed under that heading (e.g. how overlays were chosen).

    Returns:
        ``{"stages": collect_metrics(metrics), "units": "percent", **info}`` (JSON-serialisable).

    Raises:
        ArtifactError: a metrics file that is not valid JSON, a missing overlay image file, or the page
            cannot be written.
    """
    from bestie.io.atomic import atomic_write

    notes = dict(notes or {})
    rows = collect_metrics(metrics)
    raw = _raw_metrics(metrics, rows)

    def heading(text: str) -> None:
        parts.append(f"<h2>{html.escape(text)}</h2>")
        if text in notes:
            parts.append(f"<p class='note'>{html.escape(notes[text])}</p>")

    parts = [f"<h1>{html.escape(title)}</h1>"]
    info = dict(info or {})
    meta = {**info, "generated": datetime.datetime.now().isoformat(timespec="seconds")}
    parts.append("<p class='note'>" + "<br>".join(
        f"<b>{html.escape(str(k))}</b>: {html.escape(str(v))}" for k, v in meta.items()) + "</p>")

    heading("Metrics")
    parts.append(_metrics_html(rows))
    parts.append(
        "<p class='note'>All values in percent. mIoU: semantic segmentation against SegmentationClass (best "
        "background threshold for CAMs). mAP25/50/70/75: VOC instance-mask AP at IoU 0.25/0.5/0.7/0.75 "
        "(METHOD.md evaluation protocol); pseudo labels and BESTIE are scored on the training images, the "
        "Mask R-CNN on the held-out split. AP/AP50/AP75: COCO mask AP (pycocotools). drift: semantic drift, "
        "the share of GT-instance pixels that the BESTIE semantic branch labels background.</p>"
    )

    heading("Stage times")
    if benchmarks:
        parts.append(_benchmarks_html(benchmarks))
        parts.append("<p class='note'>From Snakemake's benchmark files (results/&lt;run&gt;/benchmarks/*.tsv), in "
                     "the order the jobs finished. CPU = user + system time of the job's processes; jobs may "
                     "have run side by side, so the sum of wall times can exceed the workflow's wall time.</p>")
    else:
        parts.append("<p class='missing'>no benchmark files</p>")

    for key, data in raw.items():
        per_class = per_class_rows(data) if isinstance(data, Mapping) else None
        if per_class:
            heading(f"Per class: {STAGES.get(key, key)}")
            parts.append(_per_class_html(per_class))

    heading("Training losses")
    parts.extend(_loss_curves_html(logs))

    heading("Precision-recall")
    parts.extend(_pr_curves_html(raw, pr_curves))

    sections = overlays if isinstance(overlays, Mapping) else {"Predictions": overlays}
    for section, items in sections.items():
        heading(f"Overlays: {section}")
        if not items:
            parts.append("<p class='missing'>no images</p>")
        parts.extend(_overlay_html(item) for item in items)

    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )
    with atomic_write(out_html, "w", encoding="utf-8") as fh:
        fh.write(page)
    log.info("report -> %s", out_html)
    return {**info, "units": "percent", "stages": rows}


def _raw_metrics(metrics: Mapping[str, Any], rows: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics dicts of the stages of ``rows`` (table order): given dicts as they are, existing files read."""
    raw: dict[str, Any] = {}
    for key in rows:  # table order
        src = metrics[key]
        if isinstance(src, Mapping):
            raw[key] = src
        elif src is not None and Path(src).is_file():
            raw[key] = _read_json(src)
    return raw


def _loss_curves_html(logs: Mapping[str, LogSpec]) -> list[str]:
    """One loss-curve figure per training log (a note for a log without loss records)."""
    from bestie.report.figures import loss_curve_png

    out: list[str] = []
    for name, spec in logs.items():
        path, keys = spec if isinstance(spec, tuple) else (spec, None)
        png = loss_curve_png(read_jsonl(path), name, keys)
        if png is None:
            out.append(f"<p class='missing'>{html.escape(name)}: no loss records in {html.escape(os.fspath(path))}</p>")
        else:
            out.append(f"<figure>{_img_tag(png, name)}<figcaption>{html.escape(name)}</figcaption></figure>")
    return out


def _pr_curves_html(raw: Mapping[str, Any], pr_curves: Mapping[str, Mapping[str, Any] | None] | None) -> list[str]:
    """One precision-recall figure per stage whose metrics (or ``pr_curves``) hold a curve; a note when none."""
    from bestie.report.figures import pr_curve_png

    out: list[str] = []
    n_pr = 0
    for key, data in raw.items():
        curve = data.get("pr_curve") if isinstance(data, Mapping) else None
        if not isinstance(curve, Mapping):
            curve = (pr_curves or {}).get(key)
        png = pr_curve_png(curve, STAGES.get(key, key)) if isinstance(curve, Mapping) else None
        if png is not None:
            n_pr += 1
            out.append(f"<figure>{_img_tag(png, 'precision-recall')}<figcaption>"
                       f"{html.escape(STAGES.get(key, key))}: {html.escape(str(curve.get('source', '')))}"
                       "</figcaption></figure>")
    if not n_pr:
        out.append("<p class='missing'>no precision-recall data</p>")
    return out


_LOG_ORDER = ("classifier_", "bestie", "maskrcnn")  # pipeline order of the training logs
_LOG_NAMES = {"bestie": "BESTIE", "maskrcnn": "Mask R-CNN"}


def _log_title(key: str) -> str:
    """``classifier_pam_log`` -> ``classifier pam training``; ``bestie_log`` -> ``BESTIE training``."""
    name = key[: -len("_log")]
    return f"{_LOG_NAMES.get(name, name.replace('_', ' '))} training"


def _threshold_note(what: str, threshold: float | None, info: Mapping[str, Any]) -> str:
    if threshold is None:
        return (f"{what}: no detection matches a GT instance at mask IoU {info['iou']:g} on the "
                f"{info['num_images']} images scored, so each image shows its 3 highest-scoring instances.")
    return (f"{what}: instances with score >= {threshold:.3f} (at most {MAX_DRAWN} per image), the threshold of the "
            f"best F1 at mask IoU {info['iou']:g} over {info['num_images']} images with GT "
            f"({info['num_detections']} detections, {info['num_gt']} GT instances): F1 {percent(info['f1'])}, "
            f"precision {percent(info['precision'])}, recall {percent(info['recall'])}. Left: GT, right: prediction.")


def run_workflow_report(
    run_name: str,
    dataset_cfg: Mapping[str, Any],
    inputs: Mapping[str, str | os.PathLike],
    out_html: str | os.PathLike,
    out_metrics: str | os.PathLike,
    *,
    num_overlays: int = NUM_OVERLAYS,
) -> dict[str, Any]:
    """The workflow's ``report`` rule: combined metrics JSON + HTML page of one run.

    Args:
        run_name: the config's ``run``.
        dataset_cfg: the dataset section (``train_split`` / ``eval_split`` select the overlay images).
        inputs: name -> path; metrics of the stages of :data:`STAGES` under their keys, training logs under
            ``*_log`` (``classifier_pam_log``, ``classifier_dense_log``, ``bestie_log``, ``maskrcnn_log``;
            drawn keys from :data:`LOSS_KEYS`), the BESTIE instances HDF5 of the training split under
            ``instances``, the Mask R-CNN predictions JSON under ``predictions``, the WSSS maps HDF5 under
            ``wsss_maps``, the CAM overlay folders under ``cam_overlays_<kind>`` and the benchmark folder
            under ``benchmarks``. Every one may be absent.
        out_html: the page.
        out_metrics: the combined metrics JSON (what :func:`metrics_table` prints), written atomically.
        num_overlays: images per overlay section.

    Returns:
        The combined metrics (also written to ``out_metrics``).
    """
    from bestie.data import build_dataset
    from bestie.io.atomic import write_json_atomic
    from bestie.data import eval_dataset_cfg

    def have(key: str) -> bool:
        return bool(inputs.get(key)) and Path(inputs[key]).exists()

    metrics = {k: v for k, v in inputs.items() if k in STAGES}
    log_keys = sorted((k for k in inputs if k.endswith("_log")),
                      key=lambda k: (next((i for i, p in enumerate(_LOG_ORDER) if k.startswith(p)), len(_LOG_ORDER)), k))
    logs = {_log_title(k): (inputs[k], LOSS_KEYS.get(k)) for k in log_keys}
    train_split = dataset_cfg.get("train_split", "train")
    eval_split = dataset_cfg.get("eval_split", "val")
    overlays: dict[str, list[OverlayItem]] = {}
    notes: dict[str, str] = {}
    pr: dict[str, Any] = {}
    train_ds = None
    for kind in ("pam", "dense"):
        key = f"cam_overlays_{kind}"
        if have(key):
            section = f"CAMs, {kind} classifier"
            overlays[section] = sorted(Path(inputs[key]).glob("*.png"))[:num_overlays]
            notes[f"Overlays: {section}"] = (f"PNGs of make_cams ({inputs[key]}): CAMs of the classes present "
                                             "over the image, peak points with their class and confidence.")
    if have("wsss_maps"):
        train_ds = train_ds or build_dataset(dataset_cfg, split=train_split)
        section = f"WSSS maps on {train_split}"
        overlays[section] = overlays_from_wsss(train_ds, inputs["wsss_maps"], num_overlays)
        notes[f"Overlays: {section}"] = ("image | WSSS map | GT SegmentationClass, VOC colour map; cream = "
                                         "uncertain / ignore (255), left as the image = background.")
    if have("instances"):
        train_ds = train_ds or build_dataset(dataset_cfg, split=train_split)
        section = f"BESTIE pseudo labels on {train_split}"
        thr, tinfo = instances_threshold(train_ds, inputs["instances"])
        overlays[section] = overlays_from_instances(train_ds, inputs["instances"], num_overlays, thr)
        notes[f"Overlays: {section}"] = _threshold_note("BESTIE instances", thr, tinfo)
        bestie_src = metrics.get("bestie")
        bestie_data = _read_json(bestie_src) if bestie_src and Path(bestie_src).is_file() else {}
        if not isinstance(bestie_data, Mapping) or "pr_curve" not in bestie_data:
            pr["bestie"] = pr_curve_from_instances(train_ds, inputs["instances"])
    if have("predictions"):
        ds = build_dataset(eval_dataset_cfg(dataset_cfg, eval_split), split=eval_split)
        section = f"Mask R-CNN on {eval_split}"
        thr, tinfo = prediction_threshold(ds, inputs["predictions"])
        overlays[section] = overlays_from_predictions(ds, inputs["predictions"], num_overlays, thr)
        notes[f"Overlays: {section}"] = _threshold_note("Mask R-CNN predictions", thr, tinfo)
    info = {
        "run": run_name,
        "dataset": f"{dataset_cfg.get('format')} {dataset_cfg.get('root') or dataset_cfg.get('ann_file')}",
        "splits": f"{train_split}, held-out {eval_split}",
    }
    benchmarks = read_benchmarks(inputs["benchmarks"]) if inputs.get("benchmarks") else None
    combined = run(metrics, logs, overlays, out_html, info=info, benchmarks=benchmarks, pr_curves=pr, notes=notes)
    write_json_atomic(out_metrics, combined)
    print(metrics_table(combined))
    return combined
