"""A model.base that cannot be loaded here (an unreachable hub, a model not in the local cache, a GGUF file left
over from another base) ends in one line naming the setting and the fix, without a minute of download retries."""

import os

import pytest

from conftest import arithmetic_rows, error_lines, sftops, write_jsonl, write_project
from sftops.config import ModelConfig
from sftops.errors import ModelError
from sftops.modeling import check_base

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


def test_a_gguf_file_left_over_from_another_base_is_named(tiny_model):
    with pytest.raises(
        ModelError,
        match=r"model.gguf_file 'SmolLM2-135M-Instruct.Q4_1.gguf' is not in model.base .*set model.gguf_file",
    ):
        check_base(ModelConfig(base=str(tiny_model), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    check_base(ModelConfig(base=str(tiny_model)))  # the folder's own weights: fine


def test_the_format_stage_names_a_gguf_file_left_over_from_another_base_in_one_line(tmp_path, tiny_model):
    """`model.base` changed to a folder, `model.gguf_file` left as params.yaml ships it: the stage that first reads
    the tokenizer says so in one line naming both (was: a FileNotFoundError traceback)."""
    write_jsonl(tmp_path / "qa.jsonl", arithmetic_rows(20))
    write_project(tiny_model, [{"name": "qa", "path": "qa.jsonl"}], tmp_path)
    assert sftops("ingest", cwd=tmp_path).returncode == 0
    done = sftops("format", "--set", "model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    [line] = error_lines(done.stderr)
    assert f"model.gguf_file 'SmolLM2-135M-Instruct.Q4_1.gguf' is not in model.base '{tiny_model}'" in line


def test_a_path_that_is_no_folder_and_no_hub_id_is_named(tmp_path):
    with pytest.raises(ModelError, match="is not a folder here, nor a hub id"):
        check_base(ModelConfig(base=str(tmp_path / "no-such-model")))


@pytest.mark.reliability
def test_an_uncached_hub_model_offline_is_one_line_with_exit_code_2(tmp_path, tiny_model, figures):
    write_jsonl(tmp_path / "qa.jsonl", arithmetic_rows(20))
    write_project("sftops-tests/not-a-cached-model", [{"name": "qa", "path": "qa.jsonl"}], tmp_path)
    env = {**os.environ, "HF_ENDPOINT": UNREACHABLE, "HF_HOME": str(tmp_path / "hf")}  # an empty cache
    ingest = sftops("ingest", cwd=tmp_path, env=env)
    assert ingest.returncode == 0, ingest.stderr[-2000:]
    for offline in ("0", "1"):  # no network, and HF_HUB_OFFLINE set
        done = sftops("format", cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": offline})
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        lines = error_lines(done.stderr)
        assert len(lines) == 1 and "model.base 'sftops-tests/not-a-cached-model'" in lines[0], lines
        assert ("HF_HUB_OFFLINE is set" if offline == "1" else "cannot be reached") in lines[0]
        figures["unloadable models ending in one line"] += 1
