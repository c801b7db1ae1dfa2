"""Rerun granularity (issue 19): changing any key of any config section reruns exactly the rules whose stage
reads that key, and no other.

Snakemake reruns a job whose recorded params differ from its current ones (the ``params`` rerun trigger; it
compares the job's params that are not derived from its input or output). So the test holds each job's
params to the keys its stage reads (:data:`READS`, the truth written down here from the stage code: the
command of each rule builds its section's dataclass from ``--params``):

1. :func:`test_every_key_of_every_section_changes_exactly_the_params_of_its_readers`: the DAG is built in
   this process once per branch of the workflow (:data:`BRANCHES`: the default demo with a ``predict``
   job, a dense-classifier ensemble, imported WSSS maps); then each key of each section is changed in
   the workflow's config, one at a time, and the params of every job are evaluated again through
   Snakemake's own ``Rule.expand_params`` (about 0.1 ms a job, instead of a 1.5 CPU-s dry run per key).
2. That shortcut sees only params that are functions of the config: a param computed when the Snakefile is
   parsed would keep its value. :func:`test_no_rule_param_reads_a_section_at_parse_time` parses the
   workflow a second time with every key of every section changed and checks that no such param changed.
3. :func:`test_snakemake_dry_runs_rerun_the_same_rules`: real dry runs after a ``--touch`` run (which
   records the params of every job) list the same rules under "params have changed" as (1) computes.

Keys that also change the jobs or their inputs (``classifier_*.ensemble_seeds``, ``wsss.import_png_dir``,
``predict.images`` / ``model``, ``bestie.setting``, ``demo.generate``) rerun through those as well; their
DAGs are tested in tests/test_workflow_dag.py.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from workflow_util import REPO, make_workdir, snakemake, write_config

#: every key of these sections is changed (the top-level keys `run`, `gpus`, `tensorboard` are no sections)
SECTIONS = ("dataset", "demo", "classifier_pam", "classifier_dense", "cams", "wsss", "bestie", "instances",
            "pseudo_labels", "maskrcnn", "evaluate", "predict")


class AllBut(tuple):
    """Every key of a section but these."""


ALL = AllBut()
_GROUPING = ("center_threshold", "nms_kernel", "beta", "min_area", "min_center_support")

#: rule -> {section: the keys its stage reads}; "classifier_{kind}" is the job's own classifier section.
#: The `check` rule reads its stage keys (bestie.check.CHECKED_KEYS) from its command line, not its params,
#: on purpose: a learning rate or a threshold reruns no check (workflow/rules/check.smk).
READS: dict[str, dict[str, tuple[str, ...]]] = {
    "check": {"dataset": ALL, "demo": ("generate",)},  # generated data has no file fingerprint
    "demo_data": {"dataset": ("root",), "demo": AllBut(("generate",))},
    "train_classifier": {"dataset": ALL, "classifier_{kind}": AllBut(("ensemble_seeds",))},
    "train_classifier_member": {"dataset": ALL, "classifier_{kind}": AllBut(("ensemble_seeds", "seed"))},
    "make_cams": {"dataset": ALL, "cams": ALL},
    "make_wsss": {"dataset": ALL, "wsss": AllBut(("import_png_dir",))},
    "import_wsss": {"dataset": ALL, "wsss": ("import_png_dir",)},
    "train_bestie": {"dataset": ALL, "bestie": ALL, "instances": _GROUPING},
    "predict_instances": {"dataset": ALL, "instances": ALL},
    "score_baseline": {"dataset": ALL, "bestie": ("setting", "min_area", "point_threshold", "split_components")},
    "export_pseudo_labels": {"dataset": ALL, "pseudo_labels": ALL},
    "train_maskrcnn": {"dataset": ALL, "maskrcnn": ALL},
    "evaluate": {"dataset": ALL, "evaluate": ALL},
    "predict": {"predict": AllBut(("model",))},  # `model` picks the job's input checkpoint
    "report": {"dataset": ALL},
    "all": {},
}

#: the demo config plus these changes: together their DAGs hold a job of every rule
BRANCHES: dict[str, dict[str, dict[str, Any]]] = {
    "default": {"predict": {"images": "photos"}},
    "ensemble": {"classifier_dense": {"ensemble_seeds": [7, 11]}},
    "imported": {"wsss": {"import_png_dir": "maps"}},
}


def _reads(rule: str, wildcards: dict[str, str], section: str, key: str) -> bool:
    """Whether the stage of a job of ``rule`` reads ``section.key`` (:data:`READS`)."""
    for name, keys in READS[rule].items():
        if name.format(**wildcards) == section:
            return key not in keys if isinstance(keys, AllBut) else key in keys
    return False


def _changed(value: Any, prop: dict[str, Any]) -> Any:
    """A value of the schema property ``prop`` that differs from ``value``."""
    types = prop.get("type")
    types = [types] if isinstance(types, str) else list(types or [])
    if isinstance(value, bool):
        return not value
    if value is None:
        kind = next(t for t in types if t != "null")
        return {"integer": 1, "number": 0.5, "boolean": True, "array": [], "object": {}}.get(
            kind, (prop.get("enum") or ["changed"])[0])
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.25
    if isinstance(value, str):
        others = [e for e in prop.get("enum") or [] if e != value]
        return others[0] if others else value + "_changed"
    if isinstance(value, list):
        item = prop.get("items") or {}
        if value:
            return [_changed(value[0], item), *value[1:]]
        return [_changed(None, {**item, "type": [item.get("type", "integer"), "null"]})]
    raise AssertionError(f"no changed value for {value!r}")


@contextlib.contextmanager
def _workflow(workdir: Path, config: dict, dag: bool = True) -> Iterator[Any]:
    """The parsed workflow (Snakemake's ``Workflow``) of ``config``, with its DAG built if ``dag``, in this process.

    Snakemake's API and two of its internals (``_workflow``, ``_prepare_dag`` / ``_build_dag``, the steps of
    ``snakemake -n``) at the pinned version; the working directory, ``sys.path`` and the environment (which
    the workflow changes) are put back afterwards."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.enums import Quietness
    from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings

    path = write_config(workdir / "config.test.yaml", config)
    cwd, sys_path, env = os.getcwd(), list(sys.path), dict(os.environ)
    try:
        with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
            wf_api = api.workflow(resource_settings=ResourceSettings(cores=2),
                                  config_settings=ConfigSettings(configfiles=[path]),
                                  snakefile=REPO / "Snakefile", workdir=workdir)
            wf_api.dag(DAGSettings())
            wf = wf_api._workflow
            if dag:
                wf._prepare_dag(forceall=False, ignore_incomplete=False, lock_warn_only=True, nolock=True)
                wf._build_dag()
            yield wf
    finally:
        os.chdir(cwd)
        sys.path[:] = sys_path
        os.environ.clear()
        os.environ.update(env)


def _params(job: Any) -> list[str]:
    """The params of ``job`` that Snakemake's params trigger compares (those not derived from files)."""
    _, non_derived = job.rule.expand_params(job.wildcards_dict, job.input, job.output, job)
    return [str(p) for p in non_derived]


def _schema_props() -> dict[str, Any]:
    from bestie.config import load_schema

    return load_schema()["properties"]


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    return make_workdir(tmp_path)


def _demo_config(changes: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    for section, values in (changes or {}).items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def test_every_key_of_every_section_changes_exactly_the_params_of_its_readers(workdir: Path):
    props = _schema_props()
    assert set(SECTIONS) == {name for name, prop in props.items() if prop.get("type") == "object"}  # every section
    faults: list[str] = []
    keys_done: set[tuple[str, str]] = set()
    rules_seen: set[str] = set()
    for branch, changes in BRANCHES.items():
        with _workflow(workdir, _demo_config(changes)) as wf:
            config = wf.config  # the dict the rules' param functions read (defaults filled by validation)
            jobs = sorted(wf.dag.jobs, key=lambda j: (j.rule.name, sorted(j.wildcards_dict.items())))
            rules_seen |= {j.rule.name for j in jobs}
            before = [_params(j) for j in jobs]
            for section in SECTIONS:
                assert set(config[section]) == set(props[section]["properties"]), section  # every key, defaults filled
                for key, value in config[section].items():
                    config[section][key] = _changed(copy.deepcopy(value), props[section]["properties"][key])
                    try:
                        for job, old in zip(jobs, before):
                            changed = _params(job) != old
                            expected = _reads(job.rule.name, dict(job.wildcards_dict), section, key)
                            if changed != expected:
                                name = job.rule.name + "".join(f"[{v}]" for v in job.wildcards_dict.values())
                                faults.append(f"{branch}: {section}.{key} {'changes' if changed else 'leaves'} the "
                                              f"params of {name}, whose stage {'reads' if expected else 'ignores'} it")
                    finally:
                        config[section][key] = value
                    keys_done.add((section, key))
    assert not faults, "\n".join(faults)
    assert rules_seen == set(READS)  # every rule had a job in some branch
    expected_keys = {(s, k) for s in SECTIONS for k in props[s]["properties"]}
    assert keys_done == expected_keys


def test_no_rule_param_reads_a_section_at_parse_time(workdir: Path):
    """A param computed at parse time from a section would escape the test above: with every key of every
    section changed, each rule's parse-time params must be the same."""
    props = _schema_props()
    base = _demo_config()

    def constant_params(config: dict) -> dict[str, dict[str, str]]:
        with _workflow(workdir, config, dag=False) as wf:
            return {r.name: {k: repr(v) for k, v in r.params.items() if not callable(v)} for r in wf.rules}

    with _workflow(workdir, base, dag=False) as wf:  # every key, defaults filled
        full = copy.deepcopy(wf.config)
    before = constant_params(base)
    changed = copy.deepcopy(base)
    for section in SECTIONS:
        changed[section] = {k: _changed(v, props[section]["properties"][k]) for k, v in full[section].items()}
    changed["dataset"]["format"] = "voc"  # the demo data is VOC; its other keys still change
    after = constant_params(changed)
    assert set(before) == set(after) == set(READS)
    differ = {rule: {k: (v, after[rule].get(k)) for k, v in params.items() if after[rule].get(k) != v}
              for rule, params in before.items()}
    assert not {r: d for r, d in differ.items() if d}, "params computed at parse time from the config"


@pytest.fixture(scope="module")
def touched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work folder where `snakemake --touch` has recorded the params of every job of the demo config."""
    work = tmp_path_factory.mktemp("touched")
    for name in ("config.yaml", "workflow"):
        (work / name).symlink_to(REPO / name)
    snakemake(work, "--touch", "--cores", "1")
    return work


def _params_changed(stdout: str) -> set[str]:
    """The rules under "params have changed since last execution:" in the Reasons of a dry run."""
    lines = stdout.split("params have changed since last execution:", 1)
    return {r.strip() for r in lines[1].splitlines()[1].split(",")} if len(lines) == 2 else set()


@pytest.mark.parametrize("override, listed, masked", [
    ("bestie.lr=0.5", {"train_bestie"}, set()),
    ("bestie.min_area=21", {"train_bestie", "score_baseline"}, set()),
    ("instances.flip=false", {"predict_instances"}, set()),
    # predict_instances reads it too, but reruns anyway after train_bestie: Snakemake names the first reason only
    ("instances.beta=2.5", {"train_bestie"}, {"predict_instances"}),
    ("cams.overlays=1", {"make_cams"}, set()),
    ("classifier_dense.ensemble_seeds=[1,2]", set(), set()),  # new member jobs instead; pam stays
])
def test_snakemake_dry_runs_rerun_the_same_rules(touched: Path, override: str, listed: set[str], masked: set[str]):
    proc = snakemake(touched, "-n", "--config", f"set={override}")
    assert _params_changed(proc.stdout) == listed
    section, key = override.split("=", 1)[0].split(".")
    readers = {r for r in READS if r != "train_classifier_member" and _reads(r, {"kind": "dense"}, section, key)}
    assert listed | masked == readers  # the table that the in-process test holds every key to
