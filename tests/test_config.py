from pathlib import Path

import pytest
import yaml

from sftops.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def default_tree() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_default_params_load():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.train.method == "lora"
    assert cfg.data.sources[0].package == "chatterbot_corpus"


def test_override_parses_yaml_values(tmp_path):
    cfg = load_config(ROOT / "params.yaml", ["train.learning_rate=1e-4", "train.method=full", "train.max_steps=7"])
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.train.method == "full"
    assert cfg.train.max_steps == 7


def test_unknown_key_is_named(tmp_path):
    tree = default_tree()
    tree["train"]["learning_rat"] = 0.1
    with pytest.raises(ConfigError, match=r"train\.learning_rat: unknown key"):
        load_config(write(tmp_path, tree))


def test_bad_value_names_key_and_allowed_values(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "params.yaml", ["train.method=qlora-magic"])
    assert "train.method" in str(err.value) and "'qlora' or 'full'" in str(err.value)


def test_impossible_split_fractions(tmp_path):
    with pytest.raises(ConfigError, match="val_fraction \\+ test_fraction"):
        load_config(ROOT / "params.yaml", ["data.val_fraction=0.5", "data.test_fraction=0.5"])


def test_source_needs_a_location(tmp_path):
    with pytest.raises(ConfigError, match="data.sources.0"):
        load_config(ROOT / "params.yaml", ["data.sources=[{name: x}]"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(ROOT / "params.yaml", ["train.learning_rate"])


def test_impossible_engine_combinations_are_refused_at_load_time():
    with pytest.raises(ConfigError, match="early_stopping_patience needs eval_every"):
        load_config(ROOT / "params.yaml", ["train.early_stopping_patience=2"])
    with pytest.raises(ConfigError, match="not supported with distributed=fsdp"):
        load_config(ROOT / "params.yaml", ["train.distributed=fsdp", "train.eval_every=10"])
    with pytest.raises(ConfigError, match="merge_adapter applies to adapters"):
        load_config(ROOT / "params.yaml", ["train.method=full", "train.merge_adapter=true"])
