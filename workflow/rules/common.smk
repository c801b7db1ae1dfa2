# Helpers shared by the rule files. No rule is defined here.

import json
import os
import sys
from pathlib import Path

from snakemake.utils import validate

# The package of this checkout, whatever is installed: the config helpers below come from it.
sys.path.insert(0, os.path.dirname(os.path.abspath(workflow.main_snakefile)))
from bestie.config import OVERRIDE_KEY, apply_overrides, coerce_by_schema, load_schema, rename_old_sections
from bestie.errors import ConfigError
from bestie.sections import GROUPING_KEYS, WORKFLOW_KEYS

# Command-line values, typed by the schema before it validates them (bestie.config's one strict parser):
# `--config bestie='{max_iters: 10}'` arrives as {"max_iters": "10"}, and
# `--config set="bestie.refine=false bestie.max_iters=10"` sets dotted keys (Snakemake itself refuses a
# dot in a --config key). An unknown key or a value of the wrong type stops here, naming the key.
_SCHEMA = load_schema(os.path.join(workflow.basedir, "workflow", "schemas", "config.schema.yaml"))
# Sections under their old names (bestie.config.RENAMED_SECTIONS: `inference`, `export`) are renamed here,
# with a deprecation warning; an old name in an override sets the new section's key.
_overrides = config.pop(OVERRIDE_KEY, None)
try:
    rename_old_sections(config, ", ".join(map(str, workflow.overwrite_configfiles or ["config.yaml"])))
    config.update(coerce_by_schema(config, _SCHEMA))
    if _overrides:
        apply_overrides(config, _overrides if isinstance(_overrides, str) else [str(o) for o in _overrides], _SCHEMA)
except ConfigError as _exc:
    sys.exit(f"config error: {_exc}")

# A violation ends the run with a few lines that start and end with the bad key (Snakemake's own
# validate error is followed by a dump of the whole section); validate then fills the defaults.
from bestie.schema import config_error

_config_problem = config_error(
    config,
    Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml",
    ", ".join(map(str, workflow.overwrite_configfiles or ["config.yaml"])),
)
if _config_problem:
    sys.exit(_config_problem)

validate(config, schema="../schemas/config.schema.yaml")

RUN = config["run"]
OUT = f"results/{RUN}"
LOGS = f"{OUT}/logs"
BENCH = f"{OUT}/benchmarks"
GPUS = int(config["gpus"])
# The training logs' TensorBoard mirror (bestie.tensorboard_log): jobs inherit the environment, and
# switching it does not rerun anything (the event files are a by-product, not outputs).
os.environ["BESTIE_TENSORBOARD"] = "1" if config.get("tensorboard") else "0"


wildcard_constraints:
    kind="pam|dense",
    seed="[0-9]+",
    split="[A-Za-z0-9_.-]+",


def stage_params(section, keys=None, **overrides):
    """The keys of a config section that one stage reads, as compact JSON: a rule's params, so that
    changing a key reruns exactly the stages that read it (and, through their outputs, what follows) and
    nothing before them (tests/test_rerun_granularity.py checks every key).
    Without `keys`: the whole section but the keys only the workflow reads (bestie.sections.WORKFLOW_KEYS,
    e.g. `classifier_dense.ensemble_seeds`, `wsss.import_png_dir`); `keys`: only these keys (a rule that
    reads a few keys of another stage's section); `overrides` replace keys (an ensemble member's `seed`)."""
    if keys is None:
        keys = [k for k in config[section] if k not in WORKFLOW_KEYS.get(section, ())]
    values = {k: config[section][k] for k in keys if k in config[section]}
    return json.dumps({**values, **overrides}, sort_keys=True, separators=(",", ":"))


def classifier_checkpoints(kind):
    """The checkpoints whose CAMs make_cams averages: `<kind>.pt`, or one `<kind>_seed<S>.pt` per seed
    of `classifier_<kind>.ensemble_seeds`."""
    seeds = config[f"classifier_{kind}"].get("ensemble_seeds") or []
    if not seeds:
        return [f"{OUT}/classifier/{kind}.pt"]
    return [f"{OUT}/classifier/{kind}_seed{int(s)}.pt" for s in seeds]


def dataset_params():
    """The dataset section as JSON, resolved to absolute paths so jobs may run in any directory."""
    ds = dict(config["dataset"])
    for key in ("root", "list_file", "ann_file", "image_dir"):
        if ds.get(key):
            ds[key] = os.path.abspath(ds[key])
    return json.dumps(ds, sort_keys=True, separators=(",", ":"))


def demo_marker():
    """A file whose presence means the dataset is readable; the demo data rule makes it for the demo."""
    if config["demo"]["generate"]:
        return os.path.join(config["dataset"]["root"], "demo.json")
    return []


CHECK_REPORT = f"{OUT}/check.json"


def dataset_marker():
    """What every stage waits for: the demo data (when generated) and the check report (rule check).

    The report is a plain input: the check reruns only when the data changes (check_params()), and then
    every stage is stale anyway. (An ancient() input would spare that, but Snakemake 9 then drops a
    downstream job that must run in the same invocation: snakemake/snakemake#4166.)"""
    return [*([demo_marker()] if demo_marker() else []), CHECK_REPORT]


def check_params():
    """The check rule's rerun trigger: what every stage depends on anyway (the dataset section, paths
    absolute, and the GPU count) plus dataset_fingerprint(). Stage keys are not in it, so changing a
    learning rate, or a weights file, reruns no check and nothing upstream of that stage."""
    return json.dumps({"dataset": json.loads(dataset_params()), "gpus": GPUS, "data": dataset_fingerprint()},
                      sort_keys=True, separators=(",", ":"))


def check_config():
    """The config the check reads (bestie.check.CHECKED_KEYS), as JSON: given to the job's command line,
    not its params, so it is checked with the current values but triggers no rerun (see check_params)."""
    from bestie.check import checked_config

    cfg = checked_config({**config, "dataset": json.loads(dataset_params())})
    return json.dumps(cfg, sort_keys=True, separators=(",", ":"))


CHECK_CONFIG = check_config()


def dataset_fingerprint():
    """Size and mtime of the dataset's list / annotation files and of its folders (whose mtime changes
    when a file is added or removed): a params entry of the check rule, so that it reruns when the data
    changes. os.stat calls only: no list is read here, so the DAG build stays fast. Generated demo data
    has none: the demo marker, an input of the check, stands for it."""
    if config["demo"]["generate"]:
        return ""
    ds = config["dataset"]
    splits = {ds.get("train_split") or "train", ds.get("eval_split") or "val"}
    paths = []
    if ds["format"] == "voc":
        root = ds["root"]
        paths += [os.path.join(root, d) for d in ("JPEGImages", "Annotations", "SegmentationClass",
                                                   "SegmentationObject", "ImageSets/Segmentation")]
        paths += [os.path.join(root, "ImageSets", "Segmentation", f"{s}.txt") for s in sorted(splits)]
        if ds.get("list_file"):
            paths += sorted({str(ds["list_file"]).replace("{split}", s) for s in splits})
    else:
        for key in ("ann_file", "image_dir"):
            if ds.get(key):
                paths += sorted({str(ds[key]).replace("{split}", s) for s in splits})
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append(f"{p}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            out.append(f"{p}:missing")
    return ";".join(out)


def point_setting():
    return config["bestie"].get("setting", "image") == "point"


# The interpreter running Snakemake (the project's environment), so jobs need no activated venv.
PY = sys.executable


def launcher(gpus):
    """`python -m bestie` for one process; torchrun (`torch.distributed.run`) with N processes for N > 1 GPUs.

    `3>&2` keeps Snakemake's stderr open as descriptor 3 before the rule sends 1 and 2 to its log, so the
    stage's progress lines (bestie.progress, prefixed with BESTIE_RULE, which every rule's shell sets)
    reach the terminal a few times a minute."""
    if gpus > 1:
        return f"3>&2 {PY} -m torch.distributed.run --standalone --nproc_per_node={gpus} -m bestie"
    return f"3>&2 {PY} -m bestie"


def device_flag(gpus):
    return "--device cuda" if gpus > 0 else "--device cpu"


def classifier_threads():
    """Threads of the classifier and CAM jobs: half the cores, so that the PAM and dense classifiers (and
    ensemble members) run side by side. On CPU that beats one job on all cores: on 2 cores two 30-epoch
    dense classifiers took 535 s side by side against 2 x 347 s one after the other (coco128-voc)."""
    return max(1, workflow.cores // 2)


def train_gpus():
    return GPUS


def infer_gpus():
    return min(GPUS, 1)


def wsss_h5():
    if config["wsss"].get("import_png_dir"):
        return f"{OUT}/wsss/imported.h5"
    return f"{OUT}/wsss/wsss.h5"


def points_h5():
    """Peak points (image setting) feed BESTIE; the point setting derives points from GT centers."""
    if point_setting():
        return []
    return f"{OUT}/cams/pam_points.h5"


def final_outputs():
    outs = [f"{OUT}/report.html", f"{OUT}/metrics.json"]
    if config["predict"].get("images"):
        outs.append(f"{OUT}/predict/predictions.json")
    return outs
