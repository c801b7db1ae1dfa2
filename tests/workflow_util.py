"""Helpers for the workflow tests: run Snakemake on this repository's Snakefile in a scratch folder."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


#: options that make a Snakemake run a dry run (run in this process by :func:`snakemake`)
DRY_RUN = frozenset({"-n", "--dry-run", "--dryrun"})


def make_workdir(tmp_path: Path) -> Path:
    """A Snakemake working directory ``tmp_path/work`` with ``config.yaml`` and ``workflow/`` linked from the
    repository (presets name ``../shared/data`` relative to the repository root, so run where that resolves)."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("config.yaml", "workflow"):
        (work / name).symlink_to(REPO / name)
    return work


def snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run Snakemake with the repo's Snakefile and ``--directory workdir``; output captured as text.

    A dry run goes through Snakemake's command line in this process (:func:`_dry_run_in_process`: the
    same ``snakemake.cli.main`` as ``python -m snakemake``, without an interpreter start and Snakemake's
    imports, about 1.5 CPU-s, each time); a run that executes jobs is a subprocess."""
    cmd = [*SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
    if DRY_RUN & set(args):
        proc = _dry_run_in_process(cmd)
    else:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def _dry_run_in_process(cmd: list[str]) -> subprocess.CompletedProcess:
    """``snakemake.cli.main(cmd[3:])`` with stdout / stderr captured; the exit status as a process's.

    What a Snakefile or Snakemake changes in the process is put back afterwards: the working directory
    (``--directory``), ``sys.path`` and the environment (common.smk adds to both). ``sys.exit(message)``
    (common.smk's config error) gives status 1 with the message on stderr, as the interpreter would."""
    from snakemake.cli import main

    out, err = io.StringIO(), io.StringIO()
    cwd, path, env = os.getcwd(), list(sys.path), dict(os.environ)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(cmd[len(SNAKEMAKE):])
                code = 0
            except SystemExit as exc:
                code = exc.code
        if isinstance(code, str):
            err.write(code + "\n")
            code = 1
    finally:
        os.chdir(cwd)
        sys.path[:] = path
        os.environ.clear()
        os.environ.update(env)
    return subprocess.CompletedProcess(cmd, int(code or 0), out.getvalue(), err.getvalue())


def planned_jobs(output: str) -> dict[str, int]:
    """The ``Job stats`` table of a Snakemake run or dry run as ``{rule: count}`` (without ``total``)."""
    jobs: dict[str, int] = {}
    block = output.split("Job stats:", 1)
    if len(block) < 2:
        return jobs
    for line in block[1].splitlines()[3:]:
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s+(\d+)\s*$", line)
        if not m:
            break
        if m.group(1) != "total":
            jobs[m.group(1)] = int(m.group(2))
    return jobs


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def make_voc_subset(root: Path, source: Path, train_ids: list[str], val_ids: list[str]) -> Path:
    """A VOC-layout folder whose ImageSets list a few ids and whose data folders link to ``source``
    (nothing is copied)."""
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("".join(f"{i}\n" for i in train_ids))
    (sets / "val.txt").write_text("".join(f"{i}\n" for i in val_ids))
    for name in ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationObject"):
        (root / name).symlink_to(source / name)
    return root


def tiny_config(run: str, dataset: dict) -> dict:
    """A configuration that runs every stage in about a minute on 2 CPU cores."""
    cls = {"epochs": 2, "lr_steps": [1], "batch_size": 4, "resize": 128, "crop_size": 128, "checkpoint_every": 4}
    return {
        "run": run,
        "gpus": 0,
        "dataset": dataset,
        "demo": {"generate": False},
        "classifier_pam": {"use_pam": True, **cls},
        "classifier_dense": {"use_pam": False, **cls},
        "cams": {"out_stride": 4, "overlays": 2},
        # the CRF at half resolution: a quarter of the time, the same code path
        "wsss": {"method": "crf", "crf_scale": 0.5},
        # 40 iterations at crop 96 are the fewest that reliably leave foreground in the predictions
        # (8 or 12 at crop 128 predicted background everywhere, so Mask R-CNN had nothing to learn).
        "bestie": {
            "max_iters": 40, "warmup_iters": 5, "lr": 0.003, "batch_size": 4, "crop_size": 96,
            "resize": 128, "num_workers": 0, "checkpoint_every": 20, "val_every": 0, "val_split": None,
            "refine_iter": 20,
        },
        # the 40-iteration model's center peaks stay far below the default threshold 0.1 (about 0.01 on
        # the demo), so a low threshold keeps some instances for the export and Mask R-CNN stages
        "instances": {"resize": 256, "min_area": 10, "center_threshold": 0.002},
        # keep every instance of the few-iteration model, so that Mask R-CNN has labels to train on
        "pseudo_labels": {"score_threshold": 0.0, "min_area": 1, "filter_by_image_labels": False},
        "maskrcnn": {
            "min_size": 128, "max_size": 160, "max_iters": 4, "batch_size": 2, "warmup_iters": 2,
            "checkpoint_every": 2, "num_workers": 0,
        },
        "evaluate": {},
    }
