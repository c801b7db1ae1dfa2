"""The Snakemake profiles in workflow/profiles/ resolve to the options the SLURM and local runs need.

Cheap checks only (no cluster): the profiles are parsed by the installed Snakemake exactly as
`snakemake --profile ...` parses them, the SLURM plugin builds its settings from them, the plugin
turns the rules' `gpu` resource into a GPU request only when it is > 0, and the real workflow plans
under the SLURM profile with a `gpu` resource on every job. The end-to-end run on a real (single-node)
SLURM cluster is `make test-slurm` (tests/slurm/run_slurm_test.sh).
"""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

snakemake_cli = pytest.importorskip("snakemake.cli")
pytest.importorskip("snakemake_executor_plugin_slurm")

from snakemake_executor_plugin_slurm.submit_string import get_submit_command  # noqa: E402
from snakemake_executor_plugin_slurm.utils import set_gres_string  # noqa: E402
from snakemake_interface_executor_plugins.registry import ExecutorPluginRegistry  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SLURM_PROFILE = REPO / "workflow" / "profiles" / "slurm"
LOCAL_PROFILE = REPO / "workflow" / "profiles" / "local"
ENV_VARS = ("BESTIE_SLURM_PARTITION", "BESTIE_SLURM_MAX_THREADS")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    # parse_args looks for a workflow profile relative to the current directory
    monkeypatch.chdir(tmp_path)


def parse_profile(profile, *extra):
    """Snakemake's own parsing of `snakemake --profile PROFILE *extra` -> (parser, argparse.Namespace)."""
    return snakemake_cli.parse_args(["--profile", str(profile), "--workflow-profile", "none", *extra])


def profile_keys(profile):
    data = yaml.safe_load((profile / "config.yaml").read_text())
    return [k for k in data if not k.startswith("__")]


@pytest.mark.parametrize("profile", [SLURM_PROFILE, LOCAL_PROFILE], ids=["slurm", "local"])
def test_every_profile_key_is_an_option_of_the_installed_snakemake(profile):
    parser, _ = parse_profile(profile)
    options = set(parser._option_string_actions)
    unknown = [k for k in profile_keys(profile) if f"--{k}" not in options]
    assert not unknown, f"{profile}/config.yaml: keys that are no option of this Snakemake/plugin: {unknown}"


def test_slurm_profile_resolves_to_the_slurm_executor_settings():
    _, args = parse_profile(SLURM_PROFILE)
    assert args.executor == "slurm"
    assert isinstance(args.jobs, int) and args.jobs >= 1
    # rules with `threads: workflow.cores` need a core total; max-threads is their CPUs per job
    assert args.cores == 512 and args.max_threads == 8
    assert args.rerun_incomplete is True and args.keep_going is False and args.printshellcmds is True
    # no global gpu cap under SLURM: the cluster schedules GPUs, Snakemake must not lower requests
    assert "gpu" not in (args.resources or {})

    defaults = args.default_resources
    assert defaults["mem_mb"].value == 8000
    assert defaults["runtime"].value == 240
    # unset BESTIE_SLURM_PARTITION -> '' -> the plugin falls back to the cluster's default partition
    assert ast.literal_eval(defaults["slurm_partition"].raw) == ""

    settings = ExecutorPluginRegistry().get_plugin("slurm").get_settings(args)
    assert settings.status_command == "squeue"
    assert settings.no_account is True
    assert settings.keep_successful_logs is True
    # the plugin keeps squeue only while MinJobAge >= 3 * this; SLURM's default MinJobAge is 300 s
    assert 3 * settings.init_seconds_before_status_checks <= 300
    assert settings.efficiency_report is False  # it would call sacct


def test_slurm_profile_takes_partition_and_threads_from_the_environment(monkeypatch):
    monkeypatch.setenv("BESTIE_SLURM_PARTITION", "gpu_a100")
    monkeypatch.setenv("BESTIE_SLURM_MAX_THREADS", "3")
    _, args = parse_profile(SLURM_PROFILE)
    assert ast.literal_eval(args.default_resources["slurm_partition"].raw) == "gpu_a100"
    assert args.max_threads == 3


def test_command_line_overrides_the_slurm_profile():
    _, args = parse_profile(SLURM_PROFILE, "--jobs", "7", "--slurm-status-command", "sacct")
    assert args.jobs == 7
    assert args.slurm_status_command == "sacct"


def test_local_profile():
    _, args = parse_profile(LOCAL_PROFILE)
    assert args.executor == "local"
    assert yaml.safe_load((LOCAL_PROFILE / "config.yaml").read_text())["cores"] == "all"
    assert args.cores >= 1  # "all" -> this machine's CPU count
    assert args.resources["gpu"].value == 1
    assert args.keep_going is False and args.rerun_incomplete is True and args.printshellcmds is True


class _Resources(dict):
    """Stand-in for a job's resources: dict access and attribute access, like Snakemake's."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err


def _fake_job(**resources):
    res = _Resources(mem_mb=4000, runtime=60, **resources)
    return SimpleNamespace(resources=res, threads=4, name="train_bestie", is_group=lambda: False)


def _sbatch(job):
    params = {
        "run_uuid": "uuid",
        "slurm_logfile": "/tmp/%j.log",
        "comment_str": "rule_train_bestie",
        "account": "",
        "partition": " -p bestie_test",
        "workdir": "/tmp",
    }
    return get_submit_command(job, params) + set_gres_string(job)


def test_plugin_requests_no_gpu_for_gpu_0():
    call = _sbatch(_fake_job(gpu=0))
    assert "--gpus" not in call and "--gres" not in call
    assert "--ntasks=1" in call.split()
    assert "--cpus-per-task=4" in call.split()
    assert "--mem 4000" in call and "-t 60" in call and "-p bestie_test" in call


@pytest.mark.parametrize("n", [1, 2, 4])
def test_plugin_turns_gpu_n_into_sbatch_gpus(n):
    call = _sbatch(_fake_job(gpu=n))
    assert re.findall(r"--gpus=(\d+)", call) == [str(n)]
    assert "--gres" not in call
    assert "--cpus-per-task=4" in call.split()


def _plan(workdir, *extra):
    """Dry run of the real workflow under the SLURM profile -> [(rule, resources dict, threads)]."""
    cmd = [
        sys.executable, "-m", "snakemake",
        "--profile", str(SLURM_PROFILE),
        "--snakefile", str(REPO / "Snakefile"),
        "--configfile", str(REPO / "config.yaml"),
        "--directory", str(workdir),
        "--dry-run",
        *extra,
    ]  # fmt: skip
    workdir.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env["BESTIE_SLURM_PARTITION"] = "bestie_test"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, f"dry run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    jobs, rule = [], None
    threads = 1
    for line in proc.stdout.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line)
        if m:
            rule, threads = m.group(1), 1
        elif rule and line.strip().startswith("threads:"):
            threads = int(line.split(":")[1])
        elif rule and line.strip().startswith("resources:"):
            pairs = re.findall(r"(\w+)=([^,]*)", line.split(":", 1)[1])
            jobs.append((rule, dict(pairs), threads))
            rule = None
    assert jobs, f"no job in the dry run:\n{proc.stdout[-3000:]}"
    return jobs


@pytest.mark.skipif(not (REPO / "config.yaml").is_file(), reason="config.yaml (the demo config) is absent")
def test_workflow_jobs_declare_gpu_and_fit_the_profile(tmp_path):
    jobs = _plan(tmp_path / "cpu")
    work = [(r, res, t) for r, res, t in jobs if r != "all"]
    assert work, "only rule all planned"
    missing = sorted({r for r, res, _ in work if "gpu" not in res})
    assert not missing, f"rules without a gpu resource: {missing}"
    # config gpus: 0 -> no job asks SLURM for a GPU
    assert {res["gpu"] for _, res, _ in work} == {"0"}, json.dumps(work)
    assert all(res["slurm_partition"] == "bestie_test" for _, res, _ in work)
    # max-threads of the profile bounds every job's CPUs
    assert max(t for _, _, t in work) <= 8

    jobs2 = _plan(tmp_path / "gpu", "--config", "gpus=2")
    gpus = {r: int(res["gpu"]) for r, res, _ in jobs2 if r != "all"}
    assert max(gpus.values()) == 2, gpus  # training asks for the configured GPUs
    assert min(gpus.values()) == 0, gpus  # CPU-only rules still ask for none


def test_slurm_test_script_is_valid_bash():
    script = REPO / "tests" / "slurm" / "run_slurm_test.sh"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(not (REPO / "config.yaml").is_file(), reason="config.yaml (the demo config) is absent")
def test_slurm_test_config_is_a_smaller_demo_config():
    from snakemake.utils import validate

    demo = yaml.safe_load((REPO / "config.yaml").read_text())
    tiny = yaml.safe_load((REPO / "tests" / "slurm" / "config.yaml").read_text())
    assert tiny["run"] == "slurm-test" and tiny["gpus"] == 0
    assert tiny["demo"]["generate"] is True and not Path(tiny["dataset"]["root"]).is_absolute()
    assert set(demo) == set(tiny), "tests/slurm/config.yaml should list the sections of config.yaml"
    # smaller than the demo everywhere it matters for run time
    assert tiny["demo"]["num_train"] < demo["demo"]["num_train"]
    assert tiny["demo"]["num_val"] < demo["demo"]["num_val"]
    assert tiny["bestie"]["max_iters"] < demo["bestie"]["max_iters"]
    assert tiny["maskrcnn"]["epochs"] <= demo["maskrcnn"]["epochs"]
    for section in ("classifier_pam", "classifier_dense"):
        assert tiny[section]["epochs"] <= demo[section]["epochs"]
    validate(tiny, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))  # fills the defaults


# config section -> (module of bestie.stages, config dataclass, section name in its errors), as bestie/cli.py
STAGE_CONFIGS = {
    "classifier_pam": ("train_classifier", "ClassifierConfig", "classifier"),
    "classifier_dense": ("train_classifier", "ClassifierConfig", "classifier"),
    "cams": ("make_cams", "CamConfig", "cams"),
    "wsss": ("make_wsss", "WsssConfig", "wsss"),
    "bestie": ("train_bestie", "BestieConfig", "bestie"),
    "instances": ("predict_instances", "InferenceConfig", "instances"),
    "pseudo_labels": ("export_pseudo_labels", "ExportConfig", "pseudo_labels"),
    "maskrcnn": ("train_maskrcnn", "MaskRCNNConfig", "maskrcnn"),
    "evaluate": ("evaluate", "EvalConfig", "evaluate"),
}


@pytest.mark.parametrize("section", sorted(STAGE_CONFIGS))
def test_slurm_test_config_sections_are_accepted_by_their_stage(section):
    """The tiny sizes pass the stages' own checks, so a `make test-slurm` run cannot fail on them late."""
    import importlib

    from snakemake.utils import validate

    from bestie.config import from_dict

    tiny = yaml.safe_load((REPO / "tests" / "slurm" / "config.yaml").read_text())
    validate(tiny, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))  # the rules pass these values
    module, cls, name = STAGE_CONFIGS[section]
    stage = importlib.import_module(f"bestie.stages.{module}")
    params = json.loads(json.dumps(tiny[section]))  # as the rule hands them over (JSON)
    from_dict(getattr(stage, cls), params, name)
