"""Command line: ``bestie <stage> ...`` (also ``python -m bestie``; under ``torchrun -m bestie``).

Each subcommand is a thin wrapper around one stage's ``run`` function (``bestie.stages.*``): the
Snakemake rules call these, passing the stage's config section as JSON (``--params``) and the dataset
section as JSON (``--dataset``), plus the exact input and output paths. Errors of this package
(:class:`~bestie.errors.BestieError`) end the process with exit status 2 and a one-line message naming
the file or key at fault, without a traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

from bestie.errors import BestieError, ConfigError

__all__ = ["main"]

log = logging.getLogger("bestie")


def _json_arg(text: str) -> Any:
    """Parse a JSON argument, or the contents of a file when the text names one."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        path = Path(text)
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        raise ConfigError(f"not valid JSON and not a file: {text[:80]!r}") from None


def _cmd_demo_data(a: argparse.Namespace) -> None:
    from bestie.data.demo import generate_demo_dataset

    p = a.params or {}
    p = {k: v for k, v in p.items() if k != "generate"}
    if "image_size" in p:
        p["image_size"] = tuple(p["image_size"])
    generate_demo_dataset(a.root, **p)


def _cmd_train_classifier(a: argparse.Namespace) -> None:
    from bestie.config import from_dict
    from bestie.stages import train_classifier as st

    cfg = from_dict(st.ClassifierConfig, a.params, "classifier")
    st.run(cfg, a.dataset, Path(a.out_checkpoint), Path(a.out_log), device=a.device)


def _cmd_make_cams(a: argparse.Namespace) -> None:
    from bestie.config import from_dict
    from bestie.stages import make_cams as st

    cfg = from_dict(st.CamConfig, a.params, "cams")
    st.run(
        cfg,
        a.dataset,
        [Path(c) for c in a.checkpoint],
        Path(a.out_cams),
        Path(a.out_points) if a.out_points else None,
        Path(a.out_diagnostics),
        Path(a.overlay_dir) if a.overlay_dir else None,
        device=a.device,
    )


def _cmd_make_wsss(a: argparse.Namespace) -> None:
    from bestie.config import from_dict
    from bestie.stages import make_wsss as st

    cfg = from_dict(st.WsssConfig, a.params, "wsss")
    st.run(
        cfg,
        a.dataset,
        Path(a.cams),
        Path(a.out_wsss),
        Path(a.out_diagnostics),
        Path(a.png_dir) if a.png_dir else None,
        device=a.device,
        cam_diagnostics=Path(a.cam_diagnostics) if a.cam_diagnostics else None,
    )


def _cmd_import_wsss(a: argparse.Namespace) -> None:
    from bestie.data import build_dataset
    from bestie.stages import import_wsss as st

    st.run(Path(a.png_dir), build_dataset(a.dataset), Path(a.out_wsss))


def _cmd_train_bestie(a: argparse.Namespace) -> None:
    from bestie.config import from_dict
    from bestie.params import GroupingParams
    from bestie.stages import train_bestie as st

    cfg = from_dict(st.BestieConfig, a.params, "bestie")
    grouping = from_dict(GroupingParams, a.grouping, "instances")
    st.run(
        cfg,
        a.dataset,
        Path(a.wsss),
        Path(a.points) if a.points else None,
        Path(a.out_checkpoint),
        Path(a.out_log),
        device=a.device,
        grouping=grouping,
    )


def _cmd_predict_instances(a: argparse.Namespace) -> None:
    from bestie.config import from_dict
    from bestie.stages import predict_instances as st

    cfg = from_dict(st.InferenceConfig, a.params, "instances")
    st.run(cfg, a.dataset, a.split, Path(a.checkpoint), Path(a.out_instances), Path(a.out_metrics), device=a.device)


def _cmd_score_baseline(a: argparse.Namespace) -> None:
    from bestie.config import from_dict
    from bestie.stages import score_baseline as st
    from bestie.sections import BestieConfig

    cfg = from_dict(BestieConfig, a.params, "bestie")
    st.run(cfg, a.dataset, a.split, Path(a.wsss), Path(a.points) if a.points else None, Path(a.out_metrics))


def _cmd_export(a: argparse.Namespace) -> None:
    from bestie.config import from_dict
    from bestie.stages import export_pseudo_labels as st

    cfg = from_dict(st.ExportConfig, a.params, "pseudo_labels")
    if a.from_gt:
        from bestie.data import build_dataset

        dataset = build_dataset(a.dataset, split=a.split)
        st.run(cfg, a.dataset, a.split, st.gt_instances(dataset), Path(a.out_json), dataset=dataset)
    else:
        st.run(cfg, a.dataset, a.split, Path(a.instances), Path(a.out_json))


def _cmd_train_maskrcnn(a: argparse.Namespace) -> None:
    from bestie.config import from_dict
    from bestie.stages import train_maskrcnn as st

    cfg = from_dict(st.MaskRCNNConfig, a.params, "maskrcnn")
    st.run(cfg, a.dataset, Path(a.pseudo_json), Path(a.out_checkpoint), Path(a.out_log), device=a.device)


def _cmd_evaluate(a: argparse.Namespace) -> None:
    from bestie.config import from_dict
    from bestie.stages import evaluate as st

    cfg = from_dict(st.EvalConfig, a.params, "evaluate")
    st.run(cfg, a.dataset, a.split, Path(a.checkpoint), Path(a.out_metrics), Path(a.out_predictions), device=a.device)


def _cmd_predict(a: argparse.Namespace) -> None:
    from dataclasses import replace

    from bestie.config import from_dict
    from bestie.stages import predict as st

    cfg = from_dict(st.PredictConfig, a.params, "predict")
    flags = {"score_threshold": a.score_threshold, "flip": a.flip, "max_side": a.max_side,
             "batch_size": a.batch_size, "ids_from": a.ids_from, "overlay_threshold": a.overlay_threshold}
    cfg = replace(cfg, **{k: v for k, v in flags.items() if v is not None})
    if a.no_overlays:
        cfg = replace(cfg, overlays=False)
    summary = st.run(cfg, Path(a.model), a.images, Path(a.out), device=a.device)
    print(f"{summary['num_images']} images, {summary['num_instances']} instances, {summary['num_skipped']} "
          f"file(s) skipped -> {a.out}")


def _add_predict(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("predict", _cmd_predict, "instance masks for new images from a BESTIE or Mask R-CNN checkpoint",
            dataset=False, device=True)
    p.add_argument("model", help="checkpoint: results/<run>/bestie/model.pt (or model.best.pt) or "
                   "results/<run>/maskrcnn/model.pt")
    p.add_argument("images", nargs="+", help="image files, folders and glob patterns")
    p.add_argument("--out", required=True, help="output folder: predictions.json, images.json, overlays/, summary.json")
    p.add_argument("--score-threshold", type=float, help="drop instances below this score (default: the checkpoint's)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="flip test-time augmentation (default: the checkpoint's)")
    p.add_argument("--max-side", type=int, help="downscale images whose longer side exceeds this many pixels "
                   "before the network, masks mapped back (default 1333)")
    p.add_argument("--batch-size", type=int, help="images per forward pass (Mask R-CNN)")
    p.add_argument("--ids-from", help="COCO dataset JSON whose image ids (matched by file name) the results use")
    p.add_argument("--overlay-threshold", type=float, help="overlays draw instances scoring at least this (default 0.3)")
    p.add_argument("--no-overlays", action="store_true", help="write no overlay PNGs")


def _cmd_report(a: argparse.Namespace) -> None:
    from bestie.stages import report as st

    st.run_workflow_report(a.run, a.dataset, a.inputs, Path(a.out_html), Path(a.out_metrics))


def _cmd_show_metrics(a: argparse.Namespace) -> None:
    from bestie.stages import report as st

    path = Path(a.metrics)
    if not path.is_file():
        raise BestieError(f"{path}: no metrics file (has the workflow finished?)")
    print(st.metrics_table(json.loads(path.read_text())))


# ------------------------------------------------------------------ `bestie check` and `--set` overrides
#: subcommand -> the config section its --params holds (the schema section that types its --set keys)
_SET_SECTIONS: dict[str, str] = {
    "demo-data": "demo",
    "train-classifier": "classifier_pam",
    "make-cams": "cams",
    "make-wsss": "wsss",
    "train-bestie": "bestie",
    "predict-instances": "instances",
    "score-baseline": "bestie",
    "export-pseudo-labels": "pseudo_labels",
    "train-maskrcnn": "maskrcnn",
    "evaluate": "evaluate",
}
#: other names a --set key may use for a command's section (both classifiers share ClassifierConfig)
_SET_ALIASES: dict[str, tuple[str, ...]] = {"classifier_pam": ("classifier", "classifier_dense")}


def _add_set_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key, typed by the schema (bestie.refine=false); repeatable")


def _config_arg(text: str) -> Any:
    """A whole workflow config: JSON text, or a YAML / JSON file."""
    import yaml

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"not valid JSON and not a file: {text[:80]!r}") from None
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config sections")
        return data


def _apply_set(a: argparse.Namespace) -> None:
    """Apply ``--set`` items to ``a.params`` / ``a.dataset`` (stage commands) or ``a.config`` (check)."""
    items = getattr(a, "set", None) or []
    if not items:
        return
    from bestie.config import apply_overrides, current_section, load_schema, rename_old_sections, split_override

    schema = load_schema()
    if a.command == "check":
        rename_old_sections(a.config, "--config")
        apply_overrides(a.config, items, schema)
        return
    section = _SET_SECTIONS.get(a.command)
    names = {section, *_SET_ALIASES.get(section or "", ())} - {None}
    holder: dict[str, Any] = {}
    if getattr(a, "params", None) is not None and section:
        holder[section] = dict(a.params or {})
    if getattr(a, "dataset", None) is not None:
        holder["dataset"] = dict(a.dataset)
    for item in items:
        key, value = split_override(item)
        head, _, rest = key.partition(".")
        head = current_section(head)  # an old section name (bestie.config.RENAMED_SECTIONS) still works
        if head in names and section in holder:
            head = section
        if head not in holder or not rest:
            valid = ", ".join(sorted(n for n in (names | {"dataset"}) if n == "dataset" and "dataset" in holder
                                     or n != "dataset" and section in holder))
            raise ConfigError(f"--set {item!r}: bestie {a.command} takes keys of: {valid or 'none'}")
        try:
            apply_overrides(holder, [f"{head}.{rest}={value}"], schema)
        except ConfigError as exc:  # name the key as the user wrote it
            raise ConfigError(str(exc).replace(f"{head}.{rest}", key)) from None
    if section in holder:
        a.params = holder[section]
    if "dataset" in holder:
        a.dataset = holder["dataset"]


def _cmd_check(a: argparse.Namespace) -> None:
    from bestie.config import coerce_by_schema, load_schema, rename_old_sections
    from bestie.stages import check as st

    rename_old_sections(a.config, "--config")
    config = coerce_by_schema(a.config, load_schema())
    st.run(config, Path(a.out) if a.out else None, Path(a.out_dir) if a.out_dir else None,
           weights=not a.skip_weights)
    print(f"bestie check: no fault found ({a.out or 'no report written'})")


def _add_check_command(sub: Any) -> None:
    p = sub.add_parser("check", help="check the config and the data of a run before any training",
                       description="check the config and the data of a run before any training: every fault "
                                   "(missing splits / images / masks, size mismatches, unknown classes, weights, "
                                   "disk room, GPUs) is listed at once, with its file and line")
    p.set_defaults(func=_cmd_check)
    p.add_argument("--config", type=_config_arg, required=True, help="the workflow config (YAML/JSON file or JSON)")
    p.add_argument("--out", help="write the JSON report here when no fault is found")
    p.add_argument("--out-dir", help="the run's output folder for the disk check (default results/<run>)")
    p.add_argument("--skip-weights", action="store_true", help="do not load configured weights files")
    _add_set_option(p)


def _add_command(sub, name: str, fn: Callable[[argparse.Namespace], None], help: str, params: bool = True,
                 dataset: bool = True, device: bool = False) -> argparse.ArgumentParser:
    """One subcommand with the options every stage shares (``--params``, ``--dataset``, ``--device``, ``--set``)."""
    p = sub.add_parser(name, help=help, description=help)
    p.set_defaults(func=fn)
    if params:
        p.add_argument("--params", type=_json_arg, default={}, help="the stage's config section (JSON or file)")
    if dataset:
        p.add_argument("--dataset", type=_json_arg, required=True, help="the dataset config section (JSON or file)")
    if device:
        p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    if params or dataset:
        _add_set_option(p)
    return p


def _add_data_and_semantic_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """The demo data and stages 1-3 (classifier, CAMs, WSSS maps)."""
    p = add("demo-data", _cmd_demo_data, "generate the synthetic demo dataset", dataset=False)
    p.add_argument("--root", required=True)

    p = add("train-classifier", _cmd_train_classifier, "stage 1: train the PAM or dense CAM classifier", device=True)
    p.add_argument("--out-checkpoint", required=True)
    p.add_argument("--out-log", required=True)

    p = add("make-cams", _cmd_make_cams, "stage 2: CAMs, peak points and their diagnostics", device=True)
    p.add_argument("--checkpoint", required=True, nargs="+",
                   help="classifier checkpoint; several = an ensemble whose CAMs are averaged")
    p.add_argument("--out-cams", required=True)
    p.add_argument("--out-points")
    p.add_argument("--out-diagnostics", required=True)
    p.add_argument("--overlay-dir")

    p = add("make-wsss", _cmd_make_wsss, "stage 3: WSSS maps from dense CAMs", device=True)
    p.add_argument("--cams", required=True)
    p.add_argument("--cam-diagnostics")
    p.add_argument("--out-wsss", required=True)
    p.add_argument("--out-diagnostics", required=True)
    p.add_argument("--png-dir", help="also export palette PNGs WSSS_maps/<id>.png here")

    p = add("import-wsss", _cmd_import_wsss, "import existing WSSS maps (palette PNGs) instead of stage 3", params=False)
    p.add_argument("--png-dir", required=True)
    p.add_argument("--out-wsss", required=True)


def _add_instance_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Stages 4-5 (BESTIE, its baseline, the pseudo-label export)."""
    p = add("train-bestie", _cmd_train_bestie, "stage 4: train the BESTIE instance model", device=True)
    p.add_argument("--grouping", type=_json_arg, default={},
                   help="instance grouping of validation and the learning probe: keys of the instances section "
                        "(center_threshold, nms_kernel, beta, min_area; JSON or file; default: its defaults)")
    p.add_argument("--wsss", required=True)
    p.add_argument("--points")
    p.add_argument("--out-checkpoint", required=True)
    p.add_argument("--out-log", required=True)

    p = add("predict-instances", _cmd_predict_instances, "stage 4: BESTIE predictions of a split (+ metrics)", device=True)
    p.add_argument("--split", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out-instances", required=True)
    p.add_argument("--out-metrics", required=True)

    p = add("score-baseline", _cmd_score_baseline, "pseudo-label baseline: WSSS components holding one point")
    p.add_argument("--split", required=True)
    p.add_argument("--wsss", required=True)
    p.add_argument("--points")
    p.add_argument("--out-metrics", required=True)

    p = add("export-pseudo-labels", _cmd_export, "stage 5: BESTIE instances -> COCO pseudo-label JSON")
    p.add_argument("--split", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--instances", help="instances HDF5 of predict-instances")
    src.add_argument("--from-gt", action="store_true",
                     help="export the GT instances instead (the Mask R-CNN upper bound; not weakly supervised)")
    p.add_argument("--out-json", required=True)


def _add_maskrcnn_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Stage 6 (Mask R-CNN training and evaluation)."""
    p = add("train-maskrcnn", _cmd_train_maskrcnn, "stage 6: train Mask R-CNN on the pseudo labels", device=True)
    p.add_argument("--pseudo-json", required=True)
    p.add_argument("--out-checkpoint", required=True)
    p.add_argument("--out-log", required=True)

    p = add("evaluate", _cmd_evaluate, "stage 6: evaluate Mask R-CNN on the held-out split", device=True)
    p.add_argument("--split", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out-metrics", required=True)
    p.add_argument("--out-predictions", required=True)


def _add_report_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """The HTML report and the metrics table of a finished run."""
    p = add("report", _cmd_report, "metrics table of every stage + HTML report", params=False)
    p.add_argument("--run", required=True)
    p.add_argument("--inputs", type=_json_arg, required=True, help="JSON: name -> input path")
    p.add_argument("--out-html", required=True)
    p.add_argument("--out-metrics", required=True)

    p = add("show-metrics", _cmd_show_metrics, "print the metrics table of a finished run", params=False, dataset=False)
    p.add_argument("metrics")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bestie", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    add = functools.partial(_add_command, sub)
    _add_check_command(sub)
    _add_data_and_semantic_commands(add)
    _add_instance_commands(add)
    _add_maskrcnn_commands(add)
    _add_predict(add)
    _add_report_commands(add)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bestie`` console script. Returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        _apply_set(args)
        args.func(args)
    except BestieError as exc:
        print(f"bestie {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
