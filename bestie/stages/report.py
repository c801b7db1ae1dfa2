"""The run's final report: one metrics table for every stage, and a self-contained HTML page.

Stages and what the table shows of them (all in **percent**):

=============  ==========================================  =====================================
key            stage (metrics file)                         columns
=============  ==========================================  =====================================
cams_pam       CAMs of the PAM classifier (diagnostics)     mIoU (``best_mIoU`` over thresholds)
cams_dense     CAMs of the dense classifier (diagnostics)   mIoU (``best_mIoU``)
wsss           WSSS maps (diagnostics)                      mIoU
baseline       pseudo labels by semantic transfer only      mAP25 / 50 / 70 / 75
bestie         BESTIE instances = pseudo labels (train)     mAP25 / 50 / 70 / 75
maskrcnn       Mask R-CNN on the held-out split             mAP25 / 50 / 70 / 75, COCO AP / AP50 / AP75
=============  ==========================================  =====================================

Units: ``bestie.evaluation.semantic`` reports mIoU in percent and is shown as is; the VOC and COCO
evaluators report AP as fractions in ``[0, 1]``, shown multiplied by 100. Missing stages (not run, or
not part of this setting) are listed as missing; other keys become extra rows with the same columns.

The HTML page (written atomically, nothing external: images are base64 PNG ``data:`` URIs) holds the
table, the per-class APs of the Mask R-CNN, the training loss curves, the precision-recall curve of the
Mask R-CNN evaluation and overlays of predictions next to the GT for a few images.
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from bestie.errors import ArtifactError

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
#: Table columns (all in percent).
COLUMNS: tuple[str, ...] = ("mIoU", "mAP25", "mAP50", "mAP70", "mAP75", "AP", "AP50", "AP75")
_FRACTION_KEYS = ("mAP25", "mAP50", "mAP70", "mAP75", "AP", "AP50", "AP75")


@dataclass
class OverlaySample:
    """One overlay of the report.

    Attributes:
        title: caption (e.g. the image id).
        image: ``(H, W, 3)`` uint8 RGB.
        pred: predicted instances ``{"masks": (N, H, W) bool, "labels": (N,) int 0-based, "scores": (N,)}``.
        gt: GT instances ``{"masks", "labels"}`` or None.
        class_names: names per class index.
    """

    title: str
    image: np.ndarray
    pred: Mapping[str, Any] | None
    gt: Mapping[str, Any] | None
    class_names: Sequence[str]


OverlayItem = Union[OverlaySample, tuple, str, os.PathLike]


# ------------------------------------------------------------------------------------------ metrics
def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(float(v)) else None


def summarize_metrics(data: Mapping[str, Any]) -> dict[str, Any]:
    """The table columns of one stage's metrics JSON, in percent.

    ``mIoU`` is taken from ``mIoU`` (else ``best_mIoU``), already in percent; ``mAP25..75`` and COCO
    ``AP``, ``AP50``, ``AP75`` are fractions and are multiplied by 100. Absent or non-numeric values are
    None. ``split`` and ``num_images`` are copied when present.
    """
    out: dict[str, Any] = {}
    miou = _num(data.get("mIoU"))
    out["mIoU"] = miou if miou is not None else _num(data.get("best_mIoU"))
    for key in _FRACTION_KEYS:
        v = _num(data.get(key))
        out[key] = None if v is None else 100.0 * v
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
    return "-" if v is None else f"{v:.1f}"


def metrics_table(metrics: Mapping[str, Any]) -> str:
    """Plain-text table of the stage metrics (what ``bestie show-metrics`` / ``make demo`` print).

    Args:
        metrics: the combined metrics written by :func:`run` / :func:`run_workflow_report` (a dict with
            ``"stages"``), or a mapping stage key -> metrics dict / JSON path (summarised here).

    Returns:
        Lines ``stage | split | mIoU mAP25 mAP50 mAP70 mAP75 AP AP50 AP75`` (percent, one decimal,
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
    title = "metrics in percent (mIoU: semantic; mAP: VOC instance AP at IoU 0.25/0.5/0.7/0.75; AP: COCO mask AP)"
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


# ------------------------------------------------------------------------------------------ overlays
def _filter(inst: Mapping[str, Any], score_threshold: float) -> dict[str, np.ndarray]:
    scores = np.asarray(inst["scores"], dtype=np.float32)
    keep = scores >= score_threshold
    return {"masks": np.asarray(inst["masks"])[keep], "labels": np.asarray(inst["labels"])[keep],
            "scores": scores[keep]}


def _pick_ids(dataset: Any, candidates: Sequence[str], num: int) -> list[str]:
    """The first ``num`` ids (dataset order) among ``candidates`` that have GT instances."""
    picked = []
    wanted = set(candidates)
    for image_id in dataset.ids:
        if len(picked) >= num:
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


def overlays_from_predictions(
    dataset: Any, predictions_json: str | os.PathLike, num: int = 4, score_threshold: float = 0.5
) -> list[OverlaySample]:
    """Overlays of COCO results with an ``image_key`` field (the predictions JSON of ``bestie evaluate``).

    The first ``num`` images of the dataset that have GT and at least one record are used; results with a
    score below ``score_threshold`` are not drawn. Category ids map back to classes by the dataset's
    category ids (:func:`bestie.stages.export_pseudo_labels.category_ids`).

    Raises:
        ArtifactError: an unreadable JSON file, or records without ``image_key``.
    """
    from bestie.io.coco_json import decode_rle
    from bestie.stages.export_pseudo_labels import category_ids

    results = _read_json(predictions_json)
    if not isinstance(results, list):
        raise ArtifactError(f"{predictions_json}: expected a COCO results list")
    cat_to_label = {cid: i for i, cid in enumerate(category_ids(dataset))}
    per_image: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        if "image_key" not in r:
            raise ArtifactError(f"{predictions_json}: result records lack 'image_key' (not written by bestie evaluate)")
        per_image[str(r["image_key"])].append(r)
    out = []
    for image_id in _pick_ids(dataset, list(per_image), num):
        recs = [r for r in per_image[image_id] if float(r["score"]) >= score_threshold]
        image = dataset.image(image_id)
        h, w = image.shape[:2]
        masks = np.stack([decode_rle(r["segmentation"]) for r in recs]) if recs else np.zeros((0, h, w), bool)
        pred = {"masks": masks,
                "labels": np.asarray([cat_to_label.get(int(r["category_id"]), -1) for r in recs], dtype=np.int64),
                "scores": np.asarray([float(r["score"]) for r in recs], dtype=np.float32)}
        out.append(OverlaySample(image_id, image, pred, _gt(dataset, image_id), list(dataset.class_names)))
    return out


def overlays_from_instances(
    dataset: Any, instances_h5: str | os.PathLike, num: int = 4, score_threshold: float = 0.5
) -> list[OverlaySample]:
    """Overlays of an instances HDF5 of ``bestie predict-instances`` (arrays ``masks``, ``labels``,
    ``scores`` per image id), first ``num`` images with GT, instances with ``score >= score_threshold``.

    Raises:
        ArtifactError: a missing or corrupt HDF5 file.
    """
    from bestie.io.h5store import H5Reader

    out = []
    with H5Reader(instances_h5) as reader:
        for image_id in _pick_ids(dataset, reader.ids(), num):
            inst = _filter(reader.read(image_id), score_threshold)
            out.append(OverlaySample(image_id, dataset.image(image_id), inst, _gt(dataset, image_id),
                                     list(dataset.class_names)))
    return out


# ---------------------------------------------------------------------------------------------- HTML
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; } .missing { color: #999; font-style: italic; } .note { color: #555; font-size: .9em; }
figure { display: inline-block; margin: .4em; vertical-align: top; } figcaption { font-size: .85em; color: #444; }
img { max-width: 100%; }
"""


def _img_tag(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


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
                cells.append(f'<td class="num">{_fmt(None if _num(v) is None else 100 * float(v))}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _overlay_html(item: OverlayItem) -> str:
    from bestie.report.figures import overlay_panel, png_bytes

    if isinstance(item, (str, os.PathLike)):
        p = Path(item)
        if not p.is_file():
            raise ArtifactError(f"overlay image {p} does not exist")
        return f"<figure>{_img_tag(p.read_bytes(), p.name)}<figcaption>{html.escape(p.name)}</figcaption></figure>"
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
    cap = f"{html.escape(item.title)} ({sides}, {n_pred} predicted)"
    return f"<figure>{_img_tag(png_bytes(panel), item.title)}<figcaption>{cap}</figcaption></figure>"


def run(
    metrics: Mapping[str, str | os.PathLike | Mapping[str, Any] | None],
    logs: Mapping[str, str | os.PathLike],
    overlays: Sequence[OverlayItem] | Mapping[str, Sequence[OverlayItem]],
    out_html: str | os.PathLike,
    *,
    title: str = "BESTIE weakly-supervised instance segmentation: report",
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the HTML report and return the combined metrics.

    Args:
        metrics: stage key -> metrics JSON path or dict (:data:`STAGES`; missing stages allowed).
        logs: curve title -> JSON-lines training log (missing / empty logs are noted, not fatal).
        overlays: :class:`OverlaySample` s, tuples ``(image, pred, gt)`` / ``(title, image, pred, gt
            [, class_names])``, or paths of ready PNG/JPEG images; or a mapping section title -> such a
            list.
        out_html: output page, written atomically (UTF-8, self-contained).
        title: page title.
        info: extra key/value lines for the page header (run name, dataset, ...).

    Returns:
        ``{"stages": collect_metrics(metrics), "units": "percent", **info}`` (JSON-serialisable).

    Raises:
        ArtifactError: a metrics file that is not valid JSON, a missing overlay image file, or the page
            cannot be written.
    """
    from bestie.io.atomic import atomic_write
    from bestie.report.figures import loss_curve_png, pr_curve_png

    rows = collect_metrics(metrics)
    raw: dict[str, Any] = {}
    for key, src in metrics.items():
        if isinstance(src, Mapping):
            raw[key] = src
        elif src is not None and Path(src).is_file():
            raw[key] = _read_json(src)
    parts = [f"<h1>{html.escape(title)}</h1>"]
    info = dict(info or {})
    meta = {**info, "generated": datetime.datetime.now().isoformat(timespec="seconds")}
    parts.append("<p class='note'>" + "<br>".join(
        f"<b>{html.escape(str(k))}</b>: {html.escape(str(v))}" for k, v in meta.items()) + "</p>")

    parts.append("<h2>Metrics</h2>")
    parts.append(_metrics_html(rows))
    parts.append(
        "<p class='note'>All values in percent. mIoU: semantic segmentation against SegmentationClass (best "
        "background threshold for CAMs). mAP25/50/70/75: VOC instance-mask AP at IoU 0.25/0.5/0.7/0.75 "
        "(METHOD.md evaluation protocol); pseudo labels and BESTIE are scored on the training images, the "
        "Mask R-CNN on the held-out split. AP/AP50/AP75: COCO mask AP (pycocotools).</p>"
    )
    for key, data in raw.items():
        per_class = data.get("per_class") if isinstance(data, Mapping) else None
        if isinstance(per_class, list) and per_class and isinstance(per_class[0], Mapping):
            parts.append(f"<h2>Per class: {html.escape(STAGES.get(key, key))}</h2>")
            parts.append(_per_class_html(per_class))

    parts.append("<h2>Training losses</h2>")
    for name, path in logs.items():
        png = loss_curve_png(read_jsonl(path), name)
        if png is None:
            parts.append(f"<p class='missing'>{html.escape(name)}: no loss records in {html.escape(os.fspath(path))}</p>")
        else:
            parts.append(f"<figure>{_img_tag(png, name)}<figcaption>{html.escape(name)}</figcaption></figure>")

    parts.append("<h2>Precision-recall</h2>")
    n_pr = 0
    for key, data in raw.items():
        curve = data.get("pr_curve") if isinstance(data, Mapping) else None
        png = pr_curve_png(curve, STAGES.get(key, key)) if isinstance(curve, Mapping) else None
        if png is not None:
            n_pr += 1
            parts.append(f"<figure>{_img_tag(png, 'precision-recall')}<figcaption>"
                         f"{html.escape(STAGES.get(key, key))}: {html.escape(str(curve.get('source', '')))}"
                         "</figcaption></figure>")
    if not n_pr:
        parts.append("<p class='missing'>no precision-recall data</p>")

    sections = overlays if isinstance(overlays, Mapping) else {"Predictions": overlays}
    for section, items in sections.items():
        parts.append(f"<h2>Overlays: {html.escape(section)}</h2>")
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


def run_workflow_report(
    run_name: str,
    dataset_cfg: Mapping[str, Any],
    inputs: Mapping[str, str | os.PathLike],
    out_html: str | os.PathLike,
    out_metrics: str | os.PathLike,
    *,
    num_overlays: int = 4,
    overlay_score_threshold: float = 0.5,
) -> dict[str, Any]:
    """The workflow's ``report`` rule: combined metrics JSON + HTML page of one run.

    Args:
        run_name: the config's ``run``.
        dataset_cfg: the dataset section (``train_split`` / ``eval_split`` select the overlay images).
        inputs: name -> path; metrics of the stages of :data:`STAGES` under their keys, training logs under
            ``bestie_log`` / ``maskrcnn_log`` (and any other ``*_log``), the BESTIE instances HDF5 of the
            training split under ``instances`` and the Mask R-CNN predictions JSON under ``predictions``.
        out_html: the page.
        out_metrics: the combined metrics JSON (what :func:`metrics_table` prints), written atomically.
        num_overlays: images per overlay section.
        overlay_score_threshold: instances scoring below this are not drawn.

    Returns:
        The combined metrics (also written to ``out_metrics``).
    """
    from bestie.data import build_dataset
    from bestie.io.atomic import write_json_atomic
    from bestie.stages.evaluate import eval_dataset_cfg

    metrics = {k: v for k, v in inputs.items() if k in STAGES}
    logs = {k[: -len("_log")].replace("_", " ") + " training": v for k, v in inputs.items() if k.endswith("_log")}
    train_split = dataset_cfg.get("train_split", "train")
    eval_split = dataset_cfg.get("eval_split", "val")
    overlays: dict[str, list[OverlaySample]] = {}
    if inputs.get("predictions") and Path(inputs["predictions"]).is_file():
        ds = build_dataset(eval_dataset_cfg(dataset_cfg, eval_split), split=eval_split)
        overlays[f"Mask R-CNN on {eval_split} (score >= {overlay_score_threshold:g})"] = overlays_from_predictions(
            ds, inputs["predictions"], num_overlays, overlay_score_threshold)
    if inputs.get("instances") and Path(inputs["instances"]).is_file():
        ds = build_dataset(dataset_cfg, split=train_split)
        overlays[f"BESTIE pseudo labels on {train_split} (score >= {overlay_score_threshold:g})"] = (
            overlays_from_instances(ds, inputs["instances"], num_overlays, overlay_score_threshold))
    info = {
        "run": run_name,
        "dataset": f"{dataset_cfg.get('format')} {dataset_cfg.get('root') or dataset_cfg.get('ann_file')}",
        "splits": f"train {train_split}, held-out {eval_split}",
    }
    combined = run(metrics, logs, overlays, out_html, info=info)
    write_json_atomic(out_metrics, combined)
    print(metrics_table(combined))
    return combined
