"""Each config field's meaning is written once, as its description, and `sftops config --explain KEY` prints it;
the code defaults agree with params.yaml, so no key has a second, different default in code."""

import shutil
from pathlib import Path

import yaml

from conftest import sftops
from sftops.config import Config, leaf_fields

ROOT = Path(__file__).resolve().parents[1]

# Keys whose value in params.yaml is this project's choice, not a default for any project (each with its reason).
PROJECT_SPECIFIC = {
    "model.gguf_file": "names a file of the project's chosen base model (model.base); another base has no such file",
    "tracking.registered_model_name": "names this project's model (SmolLM2 tuned on chatterbot) in the MLflow registry",
    "evaluate.suites": "names the project's own suite file (data/suites/general.jsonl); another project has its own",
    "train.learning_rate": "chosen for the default project: higher rates shrank its general suite's answers below half",
    "train.eval_every": "validates the default run (47 steps) often enough to choose among checkpoints with its suite",
}
# Keys without a default: every params file must give them.
REQUIRED = {"data.sources", "model.base"}


def project(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_code_defaults_agree_with_params_yaml():
    tree = yaml.safe_load((ROOT / "params.yaml").read_text())
    in_file = Config.model_validate(tree).flat()
    defaults = Config.model_validate(
        {"data": {"sources": tree["data"]["sources"]}, "model": {"base": tree["model"]["base"]}}
    ).flat()
    assert set(defaults) == set(in_file)
    differ = {k: (defaults[k], in_file[k]) for k in in_file if defaults[k] != in_file[k] and k not in REQUIRED}
    assert set(differ) <= set(PROJECT_SPECIFIC), f"code default (left) differs from params.yaml (right): {differ}"


def test_every_leaf_field_has_a_description():
    leaves = leaf_fields()
    assert {"train.lora.r", "data.sources[].weight", "evaluate.suites[].informational"} <= set(leaves)
    missing = [key for key, field in leaves.items() if not (field.description or "").strip()]
    assert not missing, f"fields without a description (the meaning `sftops config --explain` prints): {missing}"


def test_explain_a_key_prints_its_type_default_value_and_meaning(tmp_path):
    proc = sftops(
        "config", "--explain", "train.learning_rate", "--set", "train.learning_rate=1e-4", cwd=project(tmp_path)
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "train.learning_rate"
    assert "  type:     float, > 0" in lines
    assert "  default:  0.0003" in lines
    assert "  value:    0.0001   (params.yaml with --set)" in lines
    assert "The peak learning rate" in proc.stdout
    proc = sftops("config", "--explain", "data.sources[].weight", cwd=project(tmp_path))
    assert proc.returncode == 0 and "  value:    chatterbot: 1.0   (params.yaml)" in proc.stdout.splitlines()


def test_explain_a_section_prints_every_leaf_under_it(tmp_path):
    proc = sftops("config", "--explain", "train", cwd=project(tmp_path))
    assert proc.returncode == 0, proc.stderr
    keys = [line for line in proc.stdout.splitlines() if line and not line.startswith(" ")]
    assert keys == [k for k in leaf_fields() if k.startswith("train.")]
    assert "train.lora.target_modules" in keys
    for section in ("data.sources", "data.sources[]"):
        out = sftops("config", "--explain", section, cwd=project(tmp_path)).stdout
        assert "data.sources[].schema" in out and "data.sources[].ignore" in out and "data.val_fraction" not in out
    out = sftops("config", "--explain", "data.sources.weight", cwd=project(tmp_path)).stdout
    assert out.startswith("data.sources[].weight\n")


def test_explain_an_unknown_key_is_one_line_with_the_nearest_key(tmp_path):
    proc = sftops("config", "--explain", "train.learning_rat", cwd=project(tmp_path))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "sftops: unknown config key 'train.learning_rat': did you mean 'train.learning_rate'?"
    ]
