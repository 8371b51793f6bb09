"""`sftops reproduce`: a registered model's manifest re-runs the recorded commit with the recorded config (an
override included) in a fresh worktree, and the data, tokenizer, chat template and weights come back the same."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from sftops.cli import main
from sftops.errors import ConfigError
from sftops.provenance.reproduce import REQUIRED, reproduce
from sftops.tracking import registry, runs

ROOT = Path(__file__).resolve().parents[1]


def git(*args: str, cwd: Path) -> None:
    subprocess.run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd, check=True, capture_output=True
    )


def test_reproduce_reruns_the_recorded_commit_and_config_with_identical_results(tmp_path, tiny_model, monkeypatch):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    (repo / "data/sources").mkdir(parents=True)
    rows = [{"prompt": f"what is two plus two? ({i})", "completion": "two plus two is four."} for i in range(40)]
    (repo / "data/sources/qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = {
        "data": {
            "sources": [{"name": "qa", "path": "data/sources/qa.jsonl"}],
            "test_fraction": 0.2,
            "val_fraction": 0.1,
        },
        "model": {"base": str(tiny_model), "max_length": 64},
        "train": {"method": "full", "max_steps": 3, "micro_batch_size": 8, "learning_rate": 0.001},
        "evaluate": {"num_generations": 1, "max_new_tokens": 2, "bootstrap_resamples": 100},
        "tracking": {"registered_model_name": "tiny"},
    }
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    git("init", "-q", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "pipeline", cwd=repo)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
    monkeypatch.setenv("SFTOPS_CACHE_DIR", str(tmp_path / "cache"))

    assert main(["run", "--set", "train.learning_rate=0.02"]) == 0  # an experiment: the override must be recorded
    assert main(["reproduce", "models:/tiny/1", "--into", str(tmp_path / "again")]) == 0

    result = json.loads((tmp_path / "again/reproduction.json").read_text())
    assert result["reproduced"] and not result["failed"]
    assert all(result["checks"][name]["match"] for name in REQUIRED)
    # Same machine, same libraries, same seeds: the weights come back bit for bit.
    assert result["checks"]["model_files"]["match"] and result["checks"]["curated_files"]["match"]
    assert yaml.safe_load((tmp_path / "again/params.yaml").read_text())["train"]["learning_rate"] == 0.02

    # A run made from uncommitted code cannot be reproduced exactly, and says so.
    manifest = runs.load_manifest(registry.resolve_run_id("models:/tiny/1"))
    manifest["git"]["dirty"] = True
    with pytest.raises(ConfigError, match="uncommitted changes"):
        reproduce(manifest, "0" * 32, tmp_path / "never")
    assert not (tmp_path / "never").exists()
