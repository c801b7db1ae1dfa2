"""Config schema in sync with the stage dataclasses; CLI error behaviour."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys

import pytest
import yaml
from snakemake.utils import update_config, validate

from bestie import schema
from bestie.cli import main
from bestie.config import from_dict
from bestie.errors import ConfigError
from workflow_util import REPO


def test_committed_schema_equals_generated():
    assert schema.SCHEMA_PATH.read_text() == schema.render(), "run: python -m bestie.schema --write"


@pytest.mark.parametrize("section", sorted(schema.STAGE_SECTIONS))
def test_schema_defaults_build_the_stage_config(section):
    module, name = schema.STAGE_SECTIONS[section]
    cls = getattr(importlib.import_module(f"bestie.stages.{module}"), name)
    cfg = {"run": "x", "dataset": {"format": "voc", "root": "/nonexistent"}}
    validate(cfg, str(schema.SCHEMA_PATH))  # fills every default
    built = from_dict(cls, cfg[section], section)
    assert built == cls()  # schema defaults == dataclass defaults


@pytest.mark.parametrize("path", [REPO / "config.yaml", *sorted((REPO / "workflow" / "presets").glob("*.yaml"))])
def test_shipped_configs_build_every_stage(path):
    cfg = yaml.safe_load(path.read_text())
    validate(cfg, str(schema.SCHEMA_PATH))
    for section, (module, name) in schema.STAGE_SECTIONS.items():
        cls = getattr(importlib.import_module(f"bestie.stages.{module}"), name)
        from_dict(cls, cfg[section], section)


@pytest.mark.parametrize("path", sorted((REPO / "workflow" / "presets" / "overlays").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_overlays_build_every_stage_over_the_preset_they_name(path):
    """Each overlay's usage line names its preset; the two merged are a valid config of every stage."""
    import re

    text = path.read_text()
    named = re.search(r"--configfile (\S+) (\S+)", text)
    assert named and named.group(2) == f"workflow/presets/overlays/{path.name}", "usage line names the overlay"
    cfg = yaml.safe_load(text)
    assert cfg["run"] == path.stem  # its own results/<run>/, never the preset's
    overlay, cfg = cfg, yaml.safe_load((REPO / named.group(1)).read_text())
    update_config(cfg, overlay)  # as Snakemake merges --configfile files
    validate(cfg, str(schema.SCHEMA_PATH))
    for section, (module, name) in schema.STAGE_SECTIONS.items():
        cls = getattr(importlib.import_module(f"bestie.stages.{module}"), name)
        from_dict(cls, cfg[section], section)


def test_from_dict_names_unknown_and_mistyped_keys():
    @dataclasses.dataclass(frozen=True)
    class Cfg:
        lr: float = 0.1
        steps: tuple[int, ...] = (1, 2)
        name: str | None = None

    assert from_dict(Cfg, {"lr": 1, "steps": [3]}, "s") == Cfg(lr=1.0, steps=(3,))
    with pytest.raises(ConfigError, match=r"s\.lr_typo"):
        from_dict(Cfg, {"lr_typo": 1}, "s")
    with pytest.raises(ConfigError, match=r"s\.lr"):
        from_dict(Cfg, {"lr": "fast"}, "s")
    with pytest.raises(ConfigError, match=r"s\.steps\[1\]"):
        from_dict(Cfg, {"steps": [1, 2.5]}, "s")
    with pytest.raises(ConfigError, match=r"s\.lr"):
        from_dict(Cfg, {"lr": True}, "s")


def test_cli_reports_bad_input_with_exit_2_and_no_traceback(tmp_path, capsys):
    missing = tmp_path / "nope"
    ds = json.dumps({"format": "voc", "root": str(missing), "split": "train"})
    code = main(["score-baseline", "--dataset", ds, "--split", "train", "--wsss", str(tmp_path / "w.h5"),
                 "--out-metrics", str(tmp_path / "m.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert str(missing) in err and "Traceback" not in err
    assert not (tmp_path / "m.json").exists()


def test_cli_rejects_unknown_stage_key(tmp_path, capsys):
    code = main(["train-classifier", "--params", '{"epochz": 3}', "--dataset", '{"format": "voc", "root": "x"}',
                 "--out-checkpoint", str(tmp_path / "c.pt"), "--out-log", str(tmp_path / "l.jsonl")])
    assert code == 2
    assert "classifier.epochz" in capsys.readouterr().err


def test_python_dash_m_bestie_help():
    proc = subprocess.run([sys.executable, "-m", "bestie", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for command in ("train-classifier", "make-cams", "make-wsss", "train-bestie", "predict-instances",
                    "export-pseudo-labels", "train-maskrcnn", "evaluate", "report"):
        assert command in proc.stdout


def test_config_error_names_the_key_first_and_last():
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    assert schema.config_error(cfg) is None
    cfg["classifier_pam"]["epochz"] = 3
    msg = schema.config_error(cfg, source="my.yaml").splitlines()
    assert msg[0].startswith("config key classifier_pam.epochz: unknown key; did you mean 'epochs'?")
    assert msg[-1].startswith("invalid config key classifier_pam.epochz in my.yaml") and len(msg) == 2
    cfg["classifier_pam"].pop("epochz")
    cfg["demo"]["image_size"] = [16, 160]
    cfg["wsss"]["crf_iters"] = "ten"
    msg = schema.config_error(cfg).splitlines()
    assert msg[0] == "config key demo.image_size[0]: 16 is less than the minimum of 32"
    assert msg[1] == "config key wsss.crf_iters: 'ten' is not of type 'integer'"
    assert msg[-1].startswith("invalid config key demo.image_size[0] (and 1 more above)") and len(msg) == 3


def test_snakemake_schema_error_is_short_and_names_the_key(tmp_path):
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["bestie"]["warmup_iter"] = 10
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
                           str(tmp_path), "-n", "--configfile", str(path)], capture_output=True, text=True, timeout=300)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode != 0 and len(lines) <= 5, lines
    assert lines[0].startswith("config key bestie.warmup_iter: unknown key; did you mean 'warmup_iters'?"), lines
    assert lines[-1].startswith(f"invalid config key bestie.warmup_iter in {path}"), lines


def test_show_metrics_prints_percent_and_semantic_drift(tmp_path, capsys):
    from bestie.stages.report import collect_metrics

    stages = collect_metrics({"bestie": {"split": "train", "mAP25": 0.7724, "mAP50": 0.3279, "mAP70": 0.0985,
                                         "mAP75": 0.0383, "semantic_drift": 0.00216}})
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"run": "x", "units": "percent", "stages": stages}))
    assert main(["show-metrics", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[-1] == "drift"
    assert out[-1].split()[-9:] == ["-", "77.2", "32.8", "9.8", "3.8", "-", "-", "-", "0.2"]
    assert main(["show-metrics", str(tmp_path / "none.json")]) == 2
    assert "none.json" in capsys.readouterr().err


def test_field_docs_read_whole_entries_shared_names_and_stop_at_the_section_end():
    from dataclasses import dataclass

    from bestie.schema import _field_docs

    @dataclass
    class Section:
        """Summary line.

        Attributes:
            first: the first key's text,
                continued on a deeper line.
            a, b: one text for two keys.
            last (int): typed entry.

        Raises:
            ConfigError: not a field.
        """

        first: int = 0
        a: int = 0
        b: int = 0
        last: int = 0

    docs = _field_docs(Section)
    assert docs == {"first": "the first key's text, continued on a deeper line.", "a": "one text for two keys.",
                    "b": "one text for two keys.", "last": "typed entry."}


def test_stage_modules_reexport_the_section_classes_and_the_check_imports_no_torch(tmp_path):
    """Each stage module's config class is the one of bestie.sections, and `bestie check` (sections,
    data, the EfficientNet-Lite0 weights file) runs without importing torch, timm or torchvision."""
    from bestie import sections

    for section, (module, name) in schema.STAGE_SECTIONS.items():
        assert getattr(importlib.import_module(f"bestie.stages.{module}"), name) is getattr(sections, name)
        assert schema.section_class(section) is getattr(sections, name)
    code = (
        "import json, sys; from bestie.check import run_checks; "
        "r = run_checks({'run': 'x', 'dataset': {'format': 'voc', 'root': sys.argv[1]}}, out_dir=sys.argv[1]); "
        "print(json.dumps({'faults': len(r.faults), 'heavy': sorted(m for m in ('torch', 'timm', 'torchvision') "
        "if m in sys.modules)}))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["faults"] >= 1  # an empty folder: the split lists are missing (the check did run)
    assert out["heavy"] == []
