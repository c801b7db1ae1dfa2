"""Time of the Snakemake DAG build (``snakemake -n``) for a dataset of 10,000 images.

Set-up, all in a temporary directory (the repository is not touched): a VOC-layout folder whose
``ImageSets/Segmentation/train.txt`` and ``val.txt`` list ``num_ids`` ids (no image files: the workflow's
rules work on whole splits and never enumerate images, so the DAG build must not read the list, let
alone the images), and a config file made from ``workflow/presets/coco128-voc.yaml`` with
``dataset.root`` pointing there and ``run: dagbench``. Snakemake runs with that temporary directory as
its working directory (``.snakemake/`` and ``results/`` go there) and the repository's ``Snakefile``.

Timed: the whole ``snakemake -n --cores 1 --configfile ...`` process (interpreter start, parsing,
validation, DAG, dry-run printout); a warm-up run comes first. The job count is parsed from the
"Job stats" table; it must not depend on ``num_ids``.

Usage: ``python -m benchmarks.bench_dag [--ids 10000] [--repeats 3]`` prints the JSON result.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import REPO_ROOT

__all__ = ["snakemake_executable", "prepare", "dry_run", "run"]

PRESET = REPO_ROOT / "workflow" / "presets" / "coco128-voc.yaml"


def snakemake_executable() -> str | None:
    """The ``snakemake`` next to this interpreter (the project's venv), else the one on ``PATH``, else None."""
    local = Path(sys.executable).parent / "snakemake"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("snakemake")


def prepare(tmp: Path, num_ids: int) -> Path:
    """Write the id lists and the config under ``tmp``; returns the config path.

    Raises:
        FileNotFoundError: the preset config is missing.
    """
    import yaml

    if not PRESET.is_file():
        raise FileNotFoundError(f"preset config {PRESET} does not exist")
    root = tmp / "voc"
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationObject"):
        (root / sub).mkdir()
    ids = "\n".join(f"img-{i:06d}" for i in range(num_ids)) + "\n"
    for split in ("train", "val"):
        (sets / f"{split}.txt").write_text(ids, encoding="utf-8")
    cfg = yaml.safe_load(PRESET.read_text(encoding="utf-8"))
    cfg["run"] = "dagbench"
    cfg["dataset"]["root"] = str(root)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def dry_run(exe: str, config: Path, workdir: Path, timeout: float = 300.0) -> tuple[float, int]:
    """One ``snakemake -n``: ``(wall seconds, number of jobs)``.

    Raises:
        RuntimeError: a non-zero exit (with the output's tail) or no "total" row in the job stats.
    """
    cmd = [exe, "-s", str(REPO_ROOT / "Snakefile"), "-n", "--cores", "1", "--configfile", str(config)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"snakemake -n failed (exit {proc.returncode}):\n{text[-2000:]}")
    m = re.search(r"^total\s+(\d+)\s*$", text, flags=re.MULTILINE)
    if m is None:
        raise RuntimeError(f"snakemake -n printed no job stats:\n{text[-2000:]}")
    return seconds, int(m.group(1))


def run(num_ids: int = 10_000, repeats: int = 3, compare_ids: int | None = 100, warmup: bool = True
        ) -> dict[str, Any]:
    """Median time of ``snakemake -n`` over a ``num_ids``-image split (after one warm-up run).

    Args:
        num_ids: ids in the split lists.
        repeats: timed runs.
        compare_ids: also time a split of this many ids (same repeats), to show the DAG build does not
            grow with the dataset; None skips it.

    Returns:
        ``{"ids", "median_s", "min_s", "runs_s", "jobs", "snakemake", "compare": {"ids", "median_s",
        "jobs"} | None, "warmup"}``, or ``{"skipped": reason}`` without a snakemake executable.
    """
    exe = snakemake_executable()
    if exe is None:
        return {"skipped": "no snakemake executable next to the interpreter or on PATH"}
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip() or None

    def measure(n: int, warmup: bool) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="bestie_bench_dag.") as tmp:
            tmp = Path(tmp)
            config = prepare(tmp, n)
            if warmup:
                dry_run(exe, config, tmp)
            runs = [dry_run(exe, config, tmp) for _ in range(repeats)]
        jobs = {j for _, j in runs}
        if len(jobs) != 1:
            raise RuntimeError(f"snakemake -n gave different job counts over repeats: {sorted(jobs)}")
        secs = [s for s, _ in runs]
        return {"ids": n, "median_s": round(statistics.median(secs), 3), "min_s": round(min(secs), 3),
                "runs_s": [round(s, 3) for s in secs], "jobs": jobs.pop()}

    res = measure(num_ids, warmup=warmup)
    res["snakemake"] = version
    res["warmup"] = warmup
    res["compare"] = measure(compare_ids, warmup=False) if compare_ids else None
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ids", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    print(json.dumps(run(args.ids, args.repeats), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
