"""Run the CPU benchmarks and write one JSON file (``make bench``).

Usage::

    python -m benchmarks.run --out benchmarks/results/bench.json [--quick] [--only core eval stages dag]

Benchmarks (see benchmarks/README.md for what each figure means):

- ``core``: :mod:`benchmarks.bench_core` -- per-call times of the pseudo-label generation (one 416x416
  sample, target < 2 ms), self-refinement (batch of 8, target < 100 ms) and inference grouping (one
  500x375 image, target < 30 ms), one thread, median after warm-up;
- ``eval``: :mod:`benchmarks.bench_eval` -- VOC instance AP of 1449 images' predictions, target < 30 s;
- ``stages``: :mod:`benchmarks.bench_stages` -- images/s and peak RSS of the CAM, WSSS (CRF) and
  evaluation stages on 1x and 4x the 97 coco128-voc images;
- ``dag``: :mod:`benchmarks.bench_dag` -- ``snakemake -n`` over a 10,000-image split;
- ``step``: :mod:`benchmarks.bench_step` -- per-phase times of one BESTIE training iteration (batch 8 x 416,
  C = 20) and the network-only floor; headline ``overhead_ratio`` = (step - floor) / floor, CPU time.

``--quick`` shrinks every benchmark (fewer repeats, 100 evaluation images, 2 downscaled stage images, one
DAG run) to finish in well under a minute; its figures check that the benchmarks work, they are not
the performance figures.

Output JSON::

    {"schema": 1, "quick": bool, "started": ISO time, "seconds": total,
     "machine": machine_info() (CPU model, cores, torch threads, versions, load average),
     "load_average_end": [1, 5, 15 min],
     "benchmarks": {"core": {...}, "eval": {...}, "stages": {...}, "dag": {...}},  # or {"error": text}
     "summary": [{"name", "value", "unit", "target", "meets_target"}, ...]}

A Markdown table of the summary is printed on stdout. The exit status is 1 when a benchmark failed
(its entry then holds ``"error"``), 0 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from benchmarks import load_average, machine_info

__all__ = ["BENCHMARKS", "run_all", "summary_rows", "markdown_table", "main"]

#: Benchmark names in run order.
BENCHMARKS = ("core", "eval", "stages", "dag", "step")


def _core(quick: bool) -> dict[str, Any]:
    from benchmarks import bench_core

    return bench_core.run(repeats_scale=0.05 if quick else 1.0)


def _eval(quick: bool) -> dict[str, Any]:
    from benchmarks import bench_eval

    return bench_eval.run(num_images=100, repeats=1) if quick else bench_eval.run(num_images=1449, repeats=5)


def _stages(quick: bool) -> dict[str, Any]:
    from benchmarks import bench_stages

    return bench_stages.run(quick=quick)


def _dag(quick: bool) -> dict[str, Any]:
    from benchmarks import bench_dag

    return bench_dag.run(num_ids=10_000, repeats=1, compare_ids=None, warmup=False) if quick else bench_dag.run(10_000, 3, 100)


def _step(quick: bool) -> dict[str, Any]:
    from benchmarks import bench_step

    return bench_step.run(batch=2, crop=128, iters=1, warmup=1) if quick else bench_step.run()


_RUNNERS: dict[str, Callable[[bool], dict[str, Any]]] = {"core": _core, "eval": _eval, "stages": _stages, "dag": _dag,
                                                         "step": _step}


def run_all(quick: bool = False, only: Sequence[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the selected benchmarks (all by default); returns the JSON document (module docstring).

    A benchmark that raises is recorded as ``{"error": message, "traceback": text}`` and the others
    still run.

    Raises:
        ValueError: an unknown name in ``only``.
    """
    import torch

    names = list(only) if only else list(BENCHMARKS)
    unknown = [n for n in names if n not in _RUNNERS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; valid: {', '.join(BENCHMARKS)}")
    torch.set_num_threads(1)
    doc: dict[str, Any] = {"schema": 1, "quick": bool(quick),
                           "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                           "machine": machine_info(), "benchmarks": {}}
    t_all = time.perf_counter()
    for name in BENCHMARKS:
        if name not in names:
            continue
        log(f"[bench] {name} ...")
        t0 = time.perf_counter()
        load0 = load_average()
        try:
            res = _RUNNERS[name](quick)
        except Exception as exc:  # noqa: BLE001 - recorded, the other benchmarks still run
            res = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        res["bench_seconds"] = round(time.perf_counter() - t0, 2)
        res["load_average_start"] = load0
        doc["benchmarks"][name] = res
        log(f"[bench] {name}: {'FAILED ' + res['error'] if 'error' in res else 'done'} in {res['bench_seconds']} s")
    doc["seconds"] = round(time.perf_counter() - t_all, 2)
    doc["load_average_end"] = load_average()
    doc["summary"] = summary_rows(doc)
    return doc


_STAGE_LABELS = {"cams": "CAM stage", "wsss": "WSSS stage (CRF)", "evaluate": "evaluation stage"}


def _row(name: str, value: Any, unit: str, target: float | None = None, lower_is_better: bool = True
         ) -> dict[str, Any]:
    meets = None
    if target is not None and isinstance(value, (int, float)):
        meets = bool(value < target) if lower_is_better else bool(value > target)
    return {"name": name, "value": value, "unit": unit, "target": target, "meets_target": meets}


def summary_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline figures of a result document, one row each (skips failed or absent benchmarks)."""
    b = doc.get("benchmarks", {})
    rows: list[dict[str, Any]] = []
    core = b.get("core", {})
    if "error" not in core:
        for key, label in (("pseudo_instance_components", "pseudo labels (compact), 416x416, 5 components"),
                           ("targets_batch_dense", "pseudo targets of 8 x 416x416, dense + stacked (before)"),
                           ("targets_batch_compact", "pseudo targets of 8 x 416x416, compact + rendered"),
                           ("refine_targets", "self-refinement, batch 8 x 416x416"),
                           ("get_instances", "inference grouping, 500x375, 5 instances")):
            if key in core:
                rows.append(_row(label, core[key]["median_ms"], "ms", core[key].get("target_ms")))
    ev = b.get("eval", {})
    if "total_s" in ev:
        rows.append(_row(f"VOC evaluation, {ev['images']} images", ev["total_s"], "s", ev["target_s_scaled"]))
    st = b.get("stages", {})
    for factor, stages in st.get("per_factor", {}).items():
        for stage, r in stages.items():
            label = f"{_STAGE_LABELS.get(stage, stage)}, {factor} ({r['images']} images)"
            rows.append(_row(label, r["images_per_s"], "images/s"))
            rows.append(_row(label, r.get("images_per_cpu_s"), "images/CPU-s"))
            rows.append(_row(label + ", peak RSS", r["peak_rss_mb"], "MiB"))
    dag = b.get("dag", {})
    if "median_s" in dag:
        rows.append(_row(f"snakemake -n, {dag['ids']} ids ({dag['jobs']} jobs)", dag["median_s"], "s"))
        cmp_ = dag.get("compare") or {}
        if "median_s" in cmp_:
            rows.append(_row(f"snakemake -n, {cmp_['ids']} ids ({cmp_['jobs']} jobs)", cmp_["median_s"], "s"))
    step = b.get("step", {})
    if "overhead_ratio" in step:
        c = step["config"]
        rows.append(_row(f"BESTIE step, batch {c['batch']} x {c['crop']}, network floor (fwd + bwd)",
                         step["floor"]["cpu_median_s"], "CPU-s"))
        rows.append(_row("BESTIE step, whole step", step["step"]["cpu_median_s"], "CPU-s"))
        rows.append(_row("BESTIE step, overhead above the floor / floor", step["overhead_ratio"], "ratio", 0.05))
    return rows


def markdown_table(doc: dict[str, Any]) -> str:
    """The summary as Markdown: a line on the machine and load, the per-call / per-run figures, and a
    table of the stages (images/s wall and per CPU-second, peak RSS, for each replication factor)."""
    m = doc.get("machine", {})
    load = m.get("load_average")
    head = (f"{m.get('cpu_model')}, {m.get('cpu_affinity') or m.get('cpu_count')} cores, torch "
            f"{m.get('versions', {}).get('torch')}, {m.get('torch_threads')} torch thread(s); load average "
            f"{load[0] if load else '?'} at start, {(doc.get('load_average_end') or ['?'])[0]} at end"
            + ("; QUICK MODE (not performance figures)" if doc.get("quick") else ""))
    lines = [head, "", "| benchmark | value | target |", "|---|---:|---:|"]
    for r in doc.get("summary", []):
        if r["unit"] in ("images/s", "images/CPU-s") or r["name"].endswith("peak RSS"):
            continue  # in the stage table
        v = r["value"]
        val = f"{v:.3g}" if isinstance(v, float) else str(v)
        tgt = "" if r["target"] is None else f"< {r['target']:g} {r['unit']}" + (" ✓" if r["meets_target"] else " ✗")
        lines.append(f"| {r['name']} | {val} {r['unit']} | {tgt} |")
    per = doc.get("benchmarks", {}).get("stages", {}).get("per_factor", {})
    if per:
        lines += ["", "| stage | images | images/s (wall) | images per CPU-s | peak RSS (MiB) |", "|---|---:|---:|---:|---:|"]
        for factor, stages in per.items():
            for stage, r in stages.items():
                ipc = r.get("images_per_cpu_s")
                lines.append(f"| {_STAGE_LABELS.get(stage, stage)}, {factor} | {r['images']} | {r['images_per_s']:.3g} | "
                             f"{'' if ipc is None else f'{ipc:.3g}'} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write (parent folders are made)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and repeats: a smoke run, not the figures")
    ap.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="NAME",
                    help=f"run only these ({', '.join(BENCHMARKS)})")
    args = ap.parse_args(argv)
    from bestie.io.atomic import write_json_atomic

    doc = run_all(args.quick, args.only, log=lambda s: print(s, file=sys.stderr, flush=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, doc)
    print(markdown_table(doc))
    failed = [n for n, r in doc["benchmarks"].items() if "error" in r]
    if failed:
        for n in failed:
            print(f"benchmark {n} failed: {doc['benchmarks'][n]['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
