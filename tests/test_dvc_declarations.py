"""dvc.yaml says exactly what each stage reads: each stage is run for real (the tiny model, a small source) by
tests/stage_reads.py, which records the params keys it reads and the project modules it imports, and both must be
declared in the stage's `params` and `deps`; every file it opens in the project folder must be one of its deps or
outputs (or the places that are not pipeline data: the MLflow store, the caches, train's checkpoints). params.yaml
carries every key of the typed config, so no default that lives only in code escapes DVC's params tracking."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import arithmetic_rows, empty_mlflow_store, write_jsonl, write_project
from sftops.config import _flatten, load_config

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "format", "train", "evaluate", "export")
STAGE_MODULE = {stage: f"stages/{stage}" for stage in STAGES}


def declared(stage: str) -> tuple[list[str], list[str]]:
    entry = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    return entry["params"], [d for d in entry["deps"] if d.startswith("src/")]


def declared_files(stage: str, paths: dict[str, str]) -> list[str]:
    """The stage's deps and outputs (metrics included) with ${paths.*} filled in."""
    entry = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    items = entry["deps"] + [
        next(iter(o)) if isinstance(o, dict) else o for o in entry.get("outs", []) + entry.get("metrics", [])
    ]
    for key, value in paths.items():
        items = [i.replace(f"${{paths.{key}}}", value) for i in items]
    return items


def written_aside(path: str, outputs: list[str]) -> bool:
    """A file in the folder an output is written in before it is swapped into place (.NAME.tmp, .NAME.old)."""
    return any(f"/.{Path(o).name}." in f"/{path}" for o in outputs)


def covered(item: str, declarations: list[str], sep: str) -> bool:
    return any(item == d or item.startswith(d.rstrip(sep) + sep) for d in declarations)


def test_params_yaml_carries_every_config_key_with_its_value():
    in_file = _flatten(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert set(in_file) == set(load_config(ROOT / "params.yaml").flat())


@pytest.fixture(scope="module")
def reads(tmp_path_factory, tiny_model) -> dict[str, dict]:
    """What each stage read, run in order in one project folder."""
    folder = tmp_path_factory.mktemp("reads")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        (folder / "data/sources").mkdir(parents=True)
        write_jsonl("data/sources/qa.jsonl", arithmetic_rows(60))  # where dvc.yaml's ingest looks
        write_project(
            tiny_model,
            [{"name": "qa", "path": "data/sources/qa.jsonl"}],
            train={"method": "lora", "max_steps": 2, "micro_batch_size": 8},
            evaluate={"num_generations": 2, "max_new_tokens": 4, "bootstrap_resamples": 50},
            tracking={"registered_model_name": "reads"},
        )
    finally:
        os.chdir(cwd)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": empty_mlflow_store(folder / "mlflow.db"),
        "SFTOPS_CACHE_DIR": str(folder / "cache"),
    }
    found = {}
    for stage in STAGES:
        done = subprocess.run(
            [sys.executable, str(ROOT / "tests/stage_reads.py"), stage],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        found[stage] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_reads_only_the_params_its_dvc_entry_declares(reads, stage):
    params, _ = declared(stage)
    assert reads[stage]["params"], "the recorder saw no reads at all: it is broken"
    undeclared = [k for k in reads[stage]["params"] if not covered(k, params, ".")]
    assert not undeclared, f"dvc.yaml stage {stage!r} reads params it does not declare: {undeclared}"


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_imports_only_the_project_code_its_dvc_entry_declares(reads, stage):
    _, deps = declared(stage)
    assert f"src/sftops/{STAGE_MODULE[stage]}.py" in reads[stage]["modules"]
    undeclared = [m for m in reads[stage]["modules"] if not covered(m, deps, "/")]
    assert not undeclared, f"dvc.yaml stage {stage!r} imports code it does not declare as deps: {undeclared}"


NOT_PIPELINE_DATA = ("params.yaml", "mlflow.db", "mlruns/", "cache/", "checkpoints/")


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_opens_only_files_its_dvc_entry_declares(reads, stage):
    paths = load_config(ROOT / "params.yaml").paths.model_dump()
    files = declared_files(stage, paths)
    opened = [f for f in reads[stage]["opened"] if not f.startswith(NOT_PIPELINE_DATA)]
    assert opened, "the recorder saw no files opened: it is broken"
    undeclared = [f for f in opened if not covered(f, files, "/") and not written_aside(f, files)]
    assert not undeclared, f"dvc.yaml stage {stage!r} opens files it does not declare: {undeclared}"


def test_the_recorder_sees_the_reads_that_dvc_yaml_once_missed(reads):
    """The check can fail: ingest reads data.max_row_bytes (once undeclared), evaluate imports
    evaluate/base_cache.py."""
    assert "data.max_row_bytes" in reads["ingest"]["params"] and not covered(
        "data.max_row_bytes", ["data.sources"], "."
    )
    assert "src/sftops/evaluate/base_cache.py" in reads["evaluate"]["modules"]
    assert (
        "data/curated/ingest_report.json" in reads["train"]["opened"]
    )  # not data/raw's, which train does not depend on
