"""One strict parser for config values; dotted overrides from Snakemake and the CLI (issue 18)."""

from __future__ import annotations

import json

import pytest
import yaml

from bestie.cli import _apply_set, _parser, main
from bestie.config import (
    apply_overrides,
    coerce_by_schema,
    from_dict,
    load_schema,
    parse_bool,
    parse_float,
    parse_int,
)
from bestie.data import build_dataset
from bestie.errors import ConfigError, DataError
from bestie.stages.train_bestie import BestieConfig
from workflow_util import REPO, make_workdir, snakemake


@pytest.mark.parametrize("text, value", [("false", False), ("no", False), ("Off", False), (" FALSE ", False),
                                         ("true", True), ("yes", True), ("on", True), (False, False), (True, True)])
def test_parse_bool_reads_words_never_truthiness(text, value):
    assert parse_bool(text, "k") is value


@pytest.mark.parametrize("bad", ["maybe", "", "1", "0", 1, 0, None, "nein"])
def test_parse_bool_rejects_anything_else_naming_the_key(bad):
    with pytest.raises(ConfigError, match=r"config key 'dataset\.skip_bad_images': expected true/false"):
        parse_bool(bad, "dataset.skip_bad_images")


def test_parse_int_and_float():
    assert parse_int("10", "k") == 10 and parse_int(" -3 ", "k") == -3 and parse_int(7, "k") == 7
    for bad in ("1.5", "10x", True, 2.0, ""):
        with pytest.raises(ConfigError, match=r"config key 'bestie\.max_iters': expected an integer"):
            parse_int(bad, "bestie.max_iters")
    assert parse_float("1e-3", "k") == 0.001 and parse_float("2", "k") == 2.0 and parse_float(3, "k") == 3.0
    for bad in ("fast", "nan", False):
        with pytest.raises(ConfigError, match=r"config key 'bestie\.lr': expected a number"):
            parse_float(bad, "bestie.lr")


def test_from_dict_uses_the_same_parser_for_strings():
    cfg = from_dict(BestieConfig, {"refine": "no", "max_iters": "10", "lr": "1e-3", "val_split": "null"}, "bestie")
    assert cfg.refine is False and cfg.max_iters == 10 and cfg.lr == 0.001 and cfg.val_split is None
    with pytest.raises(ConfigError, match=r"bestie\.refine"):
        from_dict(BestieConfig, {"refine": "maybe"}, "bestie")


def test_dataset_section_booleans_are_parsed_strictly(tmp_path):
    # issue 18, item 4: "false" and "no" used to turn skip_bad_images on (bool("false") is True)
    sets = tmp_path / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (tmp_path / "JPEGImages").mkdir()
    (sets / "train.txt").write_text("missing_one\n")
    for text in ("false", "no", "off"):
        with pytest.raises(DataError, match=r"have no image file: missing_one"):  # not skipped
            build_dataset({"format": "voc", "root": str(tmp_path), "skip_bad_images": text})
    assert build_dataset({"format": "voc", "root": str(tmp_path), "skip_bad_images": "yes"}).ids == []
    with pytest.raises(ConfigError, match=r"dataset\.skip_bad_images.*'maybe'"):
        build_dataset({"format": "voc", "root": str(tmp_path), "skip_bad_images": "maybe"})


def test_apply_overrides_typed_by_the_schema():
    schema = load_schema()
    cfg = {"bestie": {"lr": 0.1}}
    done = apply_overrides(cfg, "bestie.refine=false bestie.max_iters=10,wsss.bg_threshold=auto "
                                "classifier_pam.lr_steps=[5,7] bestie.val_split=null wsss.bg_threshold=0.5", schema)
    assert done == ["bestie.refine", "bestie.max_iters", "wsss.bg_threshold", "classifier_pam.lr_steps",
                    "bestie.val_split", "wsss.bg_threshold"]
    assert cfg == {"bestie": {"lr": 0.1, "refine": False, "max_iters": 10, "val_split": None},
                   "wsss": {"bg_threshold": 0.5}, "classifier_pam": {"lr_steps": [5, 7]}}
    with pytest.raises(ConfigError, match=r"unknown config key 'bestie\.refin'.*valid keys of bestie: .*refine"):
        apply_overrides({}, ["bestie.refin=false"], schema)
    with pytest.raises(ConfigError, match=r"unknown config key 'bestiex\.lr'.*valid keys of the top level"):
        apply_overrides({}, ["bestiex.lr=1"], schema)
    with pytest.raises(ConfigError, match=r"config key 'bestie\.max_iters': expected an integer, got '1\.5'"):
        apply_overrides({}, ["bestie.max_iters=1.5"], schema)
    with pytest.raises(ConfigError, match=r"expected dotted\.key=value"):
        apply_overrides({}, ["bestie.refine"], schema)


def test_nested_command_line_strings_are_typed_before_validation():
    # `snakemake --config bestie='{max_iters: 10, refine: false}'` hands these strings to the workflow
    got = coerce_by_schema({"gpus": "2", "bestie": {"max_iters": "10", "refine": "false"},
                            "dataset": {"skip_bad_images": "no", "root": "r"}}, load_schema())
    assert got == {"gpus": 2, "bestie": {"max_iters": 10, "refine": False},
                   "dataset": {"skip_bad_images": False, "root": "r"}}


def test_cli_set_types_stage_and_dataset_keys(tmp_path, capsys):
    args = _parser().parse_args([
        "train-bestie", "--params", '{"lr": 0.01}', "--dataset", '{"format": "voc", "root": "r"}',
        "--wsss", "w.h5", "--out-checkpoint", "m.pt", "--out-log", "l.jsonl",
        "--set", "bestie.refine=false", "--set", "bestie.max_iters=10", "--set", "dataset.skip_bad_images=no"])
    _apply_set(args)
    assert args.params == {"lr": 0.01, "refine": False, "max_iters": 10}
    assert args.dataset == {"format": "voc", "root": "r", "skip_bad_images": False}
    args = _parser().parse_args(["train-classifier", "--dataset", '{"format": "voc", "root": "r"}',
                                 "--out-checkpoint", "c.pt", "--out-log", "l.jsonl", "--set", "classifier.epochs=3"])
    _apply_set(args)
    assert args.params == {"epochs": 3}
    code = main(["train-classifier", "--dataset", '{"format": "voc", "root": "r"}', "--out-checkpoint",
                 str(tmp_path / "c.pt"), "--out-log", str(tmp_path / "l.jsonl"), "--set", "classifier.epochz=3"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown config key 'classifier.epochz'" in err and "Traceback" not in err
    code = main(["train-classifier", "--dataset", '{"format": "voc", "root": "r"}', "--out-checkpoint",
                 str(tmp_path / "c.pt"), "--out-log", str(tmp_path / "l.jsonl"), "--set", "bestie.lr=3"])
    assert code == 2 and "takes keys of: classifier, classifier_dense, classifier_pam, dataset" in capsys.readouterr().err
    assert not (tmp_path / "l.jsonl").exists()


@pytest.fixture()
def workdir(tmp_path):
    return make_workdir(tmp_path)


def _bestie_params(stdout: str) -> dict:
    line = next(l for l in stdout.splitlines() if " train-bestie --params " in l)
    return json.loads(line.split("--params '", 1)[1].split("'", 1)[0])


def test_snakemake_dotted_and_nested_overrides(workdir):
    proc = snakemake(workdir, "-n", "-p", "--config", "set=bestie.refine=false bestie.max_iters=10",
                     "maskrcnn={epochs: 3}", "bestie={lr: 1e-3}")
    p = _bestie_params(proc.stdout)
    assert p["refine"] is False and p["max_iters"] == 10 and p["lr"] == 0.001
    assert p["warmup_iters"] == yaml.safe_load((REPO / "config.yaml").read_text())["bestie"]["warmup_iters"]
    assert '"epochs":3' in next(l for l in proc.stdout.splitlines() if " train-maskrcnn --params " in l)
    for args, key in ((["set=bestie.refin=false"], "bestie.refin"), (["bestie={refine: maybe}"], "bestie.refine")):
        proc = snakemake(workdir, "-n", "--config", *args, check=False)
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0 and f"'{key}'" in text and "Job stats" not in text


# ------------------------------------------------------------------ renamed sections (issue 19)
@pytest.fixture()
def fresh_warnings(monkeypatch):
    """Each test sees the once-per-process deprecation warning of every old section name afresh."""
    import bestie.config as config

    monkeypatch.setattr(config, "_warned_sections", set())


def test_old_section_names_are_renamed_with_one_warning(fresh_warnings, caplog):
    from bestie.config import RENAMED_SECTIONS, rename_old_sections

    assert RENAMED_SECTIONS == {"inference": "instances", "export": "pseudo_labels"}
    cfg = {"run": "r", "inference": {"flip": False}, "export": {"min_area": 3}, "bestie": {"lr": 1.0}}
    with caplog.at_level("WARNING", logger="bestie"):
        assert rename_old_sections(cfg) == ["inference", "export"]
        assert rename_old_sections({"inference": {}}) == ["inference"]  # a second config: no second warning
    assert cfg == {"run": "r", "instances": {"flip": False}, "pseudo_labels": {"min_area": 3}, "bestie": {"lr": 1.0}}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "'inference' is now called 'instances'" in warnings[0] and "DeprecationWarning" in warnings[0]
    assert "'export' is now called 'pseudo_labels'" in warnings[1]
    assert rename_old_sections({"instances": {}}) == []


def test_old_and_new_section_together_is_an_error(fresh_warnings):
    from bestie.config import rename_old_sections

    with pytest.raises(ConfigError, match="'export' and 'pseudo_labels' are both given in my.yaml"):
        rename_old_sections({"export": {}, "pseudo_labels": {"min_area": 2}}, "my.yaml")


def test_overrides_and_cli_set_accept_old_section_names(fresh_warnings):
    cfg: dict = {}
    assert apply_overrides(cfg, ["inference.flip=no", "export.min_area=7"], load_schema()) == \
        ["instances.flip", "pseudo_labels.min_area"]
    assert cfg == {"instances": {"flip": False}, "pseudo_labels": {"min_area": 7}}
    args = _parser().parse_args(["predict-instances", "--dataset", '{"format": "voc", "root": "r"}', "--split", "val",
                                 "--checkpoint", "m.pt", "--out-instances", "i.h5", "--out-metrics", "m.json",
                                 "--set", "inference.resize=64", "--set", "instances.flip=false"])
    _apply_set(args)
    assert args.params == {"resize": 64, "flip": False}


def test_snakemake_reads_old_section_names_and_refuses_both(workdir, tmp_path, fresh_warnings, caplog):
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["inference"] = {"min_area": 33}
    cfg["export"] = cfg.pop("pseudo_labels")
    del cfg["instances"]
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(cfg))
    proc = snakemake(workdir, "-n", "-p", "--configfile", str(old), "--config", "set=inference.flip=false")
    line = next(l for l in proc.stdout.splitlines() if " predict-instances --params " in l)
    assert json.loads(line.split("--params '", 1)[1].split("'", 1)[0])["min_area"] == 33
    assert '"flip":false' in line
    # (a real run prints it on stderr: the logger has no handler there; in this process pytest captures it)
    assert any("config section 'inference' is now called 'instances'" in r.getMessage() for r in caplog.records)
    cfg["instances"] = {}
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump(cfg))
    proc = snakemake(workdir, "-n", "--configfile", str(both), check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "'inference' and 'instances' are both given" in text and "Job stats" not in text
