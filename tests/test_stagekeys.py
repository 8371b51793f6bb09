"""Stage cache keys agree with DVC: they change exactly when `dvc.yaml` says the stage must re-run."""

from __future__ import annotations

import shutil

import pytest

from realstack import ROOT
from sftops.config import isolate_outputs, load_config
from sftops.stagekeys import outputs_fresh, record_outputs, stage_inputs, stage_key

STAGES = ("ingest", "format", "train", "evaluate")


@pytest.fixture
def project(tmp_path, monkeypatch):
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "data/sources").mkdir(parents=True)
    (tmp_path / "data/sources/mine.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SFTOPS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def keys(overrides=()):
    cfg = load_config("params.yaml", list(overrides))
    return {stage: stage_key(stage, cfg) for stage in STAGES}


def test_a_train_param_changes_the_keys_of_train_and_evaluate_only(project):
    before, after = keys(), keys(["train.learning_rate=1e-5"])
    # evaluate's params are evaluate and model.max_length: it re-runs once train's output changes, as in DVC.
    assert {s for s in STAGES if before[s] != after[s]} == {"train"}


def test_data_code_and_params_each_change_the_keys_that_dvc_yaml_says(project):
    base = keys()
    (project / "data/sources/mine.jsonl").write_text('{"prompt": "a", "completion": "c"}\n')
    assert {s for s, k in keys().items() if k != base[s]} == {"ingest"}
    base = keys()
    assert {s for s, k in keys(["model.max_length=128"]).items() if k != base[s]} == {"format", "train", "evaluate"}
    assert {s for s, k in keys(["evaluate.top_p=0.5"]).items() if k != base[s]} == {"evaluate"}
    (project / "src/sftops").mkdir(parents=True)  # the working folder's code wins over the installed package
    shutil.copy(ROOT / "src/sftops/training.py", project / "src/sftops/training.py")
    assert keys()["train"] == base["train"]
    (project / "src/sftops/training.py").write_text("# changed\n")
    assert {s for s, k in keys().items() if k != base[s]} == {"train"}


def test_inputs_are_the_dvc_deps_and_params_with_the_experiment_paths(project):
    cfg = isolate_outputs(load_config("params.yaml", ["train.seed=1"]), ["train.seed=1"])
    inputs = stage_inputs("format", cfg)
    assert set(inputs["params"]) == {"data", "model"}
    assert inputs["deps"][cfg.paths.raw] is None  # not ingested yet
    assert inputs["outs"] == [cfg.paths.curated] and cfg.paths.curated.startswith("runs/")
    assert stage_key("format", cfg, root=project / "elsewhere") is None  # no dvc.yaml there: nothing to key on


def test_outputs_are_fresh_only_while_untouched_since_the_stage_made_them(project):
    cfg = load_config("params.yaml")
    key = stage_key("ingest", cfg)
    assert not outputs_fresh("ingest", cfg, key)  # never ran
    raw = project / cfg.paths.raw
    raw.mkdir(parents=True)
    (raw / "rows.jsonl").write_text("x\n")
    record_outputs("ingest", cfg, key)
    assert outputs_fresh("ingest", cfg, key)
    assert not outputs_fresh("ingest", cfg, "another-key")
    (raw / "rows.jsonl").write_text("edited by hand\n")
    assert not outputs_fresh("ingest", cfg, key)
    record_outputs("ingest", cfg, key)
    shutil.rmtree(raw)
    assert not outputs_fresh("ingest", cfg, key)
