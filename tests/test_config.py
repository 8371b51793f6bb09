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
        load_config(ROOT / "params.yaml", ["train.eval_every=null", "train.early_stopping_patience=2"])
    with pytest.raises(ConfigError, match="merge_adapter applies to adapters"):
        load_config(ROOT / "params.yaml", ["train.method=full", "train.merge_adapter=true"])


CPU_ONLY = pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the refusals on a machine without a CUDA GPU"
)
# (overrides, what the message must say: the key and the fix)
REFUSED = [
    (["train.learning_rat=0.1"], "train.learning_rat: unknown key"),
    (["train.micro_batch_size=eight"], "train.micro_batch_size: Input should be a valid integer"),
    (["train.method=qlora-magic"], "'lora', 'dora', 'qlora' or 'full'"),
    (["model.attn_implementation=flash_attention_9"], "'sdpa', 'eager', 'flex_attention' or 'flash_attention_2'"),
    (["train.method=qlora", "train.param_dtype=bfloat16"], "param_dtype bfloat16 does not apply to qlora"),
    (["train.eval_every=null", "train.early_stopping_patience=2"], "early_stopping_patience needs eval_every"),
    (["train.method=full", "train.merge_adapter=true"], "merge_adapter applies to adapters"),
    (["data.val_fraction=0.5", "data.test_fraction=0.5"], "val_fraction + test_fraction must be below 1"),
    (["data.sources=[{name: x, hub: a/b, path: c}]"], "a hub source takes no 'path'"),
    (["data.sources=[{name: x, path: ../../elsewhere.jsonl}]"], "write it as an absolute path"),
    (["paths.raw=../outside"], "paths: Value error, '../outside' leads out of the project folder"),
    (["model.gguf_file=../../model.gguf"], "leads out of model.base"),
    (["data.max_row_bytes=10"], "data.max_row_bytes: Input should be greater than or equal to 1024"),
    (["train.learning_rate"], "must look like key=value"),
]


@pytest.mark.reliability
@CPU_ONLY
def test_impossible_and_unsafe_settings_are_refused_at_load_time_with_the_fix(figures):
    from sftops.errors import SftopsError

    for overrides, phrase in REFUSED:
        with pytest.raises(SftopsError) as err:
            load_config(ROOT / "params.yaml", overrides)
        assert phrase in str(err.value), (overrides, str(err.value))
        figures["config errors refused with the fix named"] += 1


@CPU_ONLY
def test_gpu_settings_are_checked_by_the_stages_that_need_a_gpu_not_by_data_preparation():
    from sftops.errors import ModelError
    from sftops.machine import require_hardware

    for overrides, phrase in (
        (["train.method=qlora"], "use train.method=lora"),
        (["model.attn_implementation=flash_attention_2"], "use model.attn_implementation=sdpa"),
        (["model.attn_implementation=flex_attention"], "flex_attention trains only on a CUDA GPU"),
    ):
        cfg = load_config(ROOT / "params.yaml", overrides)  # ingest and format load this and go on
        with pytest.raises(ModelError, match=phrase):
            require_hardware(cfg.train.method, cfg.model.attn_implementation)  # what train and evaluate call first


def test_remote_code_and_pickles_are_off_unless_set():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.model.trust_remote_code is False and cfg.model.allow_pickle is False


def test_a_misspelt_key_names_the_nearest_allowed_one_first_and_no_dict_dump():
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "params.yaml", ["data.sources=[{name: x, path: a.jsonl, feilds: {output: response}}]"])
    lines = str(err.value).splitlines()
    assert lines[1] == (
        "  data.sources.0.feilds: unknown key: did you mean 'fields'? (params.yaml lists the allowed keys) "
        "[from --set data.sources, not params.yaml]"
    )
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "params.yaml", ["data.sources=[{name: x, hub: a/b, path: c}]"])
    assert "{" not in str(err.value)  # the message, not the section's dict cut at 200 characters


def test_a_yaml_error_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  sources: []\nmodel:\n  base: x\n   max_length: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}:5:14: mapping values are not allowed here"


def test_a_bad_set_key_or_value_is_named_as_the_override_not_as_a_line_of_params_yaml():
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "params.yaml", ["train.learnin_rate=1e-4"])
    header, line = str(err.value).splitlines()
    assert header.endswith("params.yaml with its --set overrides:")
    assert line == (
        "  train.learnin_rate: unknown key: did you mean 'learning_rate'? (params.yaml lists the allowed keys) "
        "[from --set train.learnin_rate, not params.yaml]"
    )
    with pytest.raises(ConfigError, match=r"^--set train.learning_rate=\[1,: the value is not valid YAML"):
        load_config(ROOT / "params.yaml", ["train.learning_rate=[1,"])
