"""The export stage for real on the tiny model: after train registers a version, `run_export` writes one GGUF file
and Ollama Modelfile per export.gguf quantisation, reads each back and compares it with the evaluated model on
export.rows test rows (F32: the same answers and NLL within 1e-4; Q8_0: smaller, at an NLL cost), checks the
adapter against vLLM's rules, and logs it all on the training run and the registered version, whose description
then lists the exports with their figures. Run again, it writes the same files (the doors must agree in dvc.lock)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
from mlflow import MlflowClient

from conftest import trained_qa
from sftops.stages.export import run_export
from sftops.tracking.registry import _exports_line


@pytest.fixture
def trained(project_folder, tiny_model):
    return trained_qa(
        tiny_model,
        evaluate={"max_new_tokens": 8},
        export={"gguf": ["F32", "Q8_0"], "rows": 4},
    )


def test_each_gguf_is_written_checked_against_the_evaluated_model_and_logged_on_the_version(trained):
    cfg, report = trained
    result = run_export(cfg)
    out = Path(cfg.paths.exports)
    parity = json.loads((out / "parity.json").read_text())
    f32, q8 = parity["gguf"]["F32"], parity["gguf"]["Q8_0"]
    assert len(parity["rows"]) == f32["rows"] == 4
    assert f32["passed"] and f32["answers_equal"] == 4 and f32["max_nll_gap"] < 1e-4, f32
    assert q8["max_nll_gap"] > f32["max_nll_gap"] and q8["bytes"] < f32["bytes"], (q8, f32)
    for quant in ("F32", "Q8_0"):  # what each file holds, read with the gguf package itself
        reader = gguf.GGUFReader(out / f"model-{quant}.gguf")
        types = {t.tensor_type.name for t in reader.tensors}
        assert quant in types and (out / f"model-{quant}.gguf").stat().st_size == parity["gguf"][quant]["bytes"]
        assert (out / f"Modelfile-{quant}").read_text().startswith(f"FROM ./model-{quant}.gguf\n")
    served = json.loads((out / "vllm.json").read_text())
    adapter = json.loads((Path(cfg.paths.model) / "model/adapter_config.json").read_text())
    assert served["loads"] and served["rank"] == adapter["r"] and "--enable-lora" in served["serve"]

    client = MlflowClient(report.tracking_uri)
    run = client.get_run(report.run_id)
    assert run.data.metrics["export/Q8_0/max_nll_gap"] == pytest.approx(q8["max_nll_gap"])
    assert run.data.metrics["export/F32/answers_equal"] == 4
    logged = {a.path for a in client.list_artifacts(report.run_id, "export")}
    assert {f"export/{Path(f).name}" for f in result.files} == logged
    tags = client.get_model_version("tiny", report.version).tags
    assert tags["export.gguf.F32"].startswith("passed: 4/4 greedy answers equal")
    assert tags["export.vllm"].startswith(f"the adapter loads (rank {adapter['r']}")
    line = _exports_line(tags)
    assert all(f"`{name}`" in line for name in ("gguf.F32", "gguf.Q8_0", "vllm")), line

    # Run again (as another door, dvc repro or the flow, would): the same files, byte for byte, as DVC compares them.
    first = {f.name: f.read_bytes() for f in out.iterdir()}
    run_export(cfg)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == first


def test_a_model_the_gguf_writer_does_not_know_is_said_not_exported_and_the_stage_goes_on(tiny_model, tmp_path):
    """A tokenizer that is not byte-level BPE (a word-level one): no file, the reason, and the line on the version."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from sftops.config import load_config
    from sftops.stages.export import export_gguf
    from sftops.tracking.exports import gguf_line

    words = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", eos_token="<unk>")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    cfg = load_config(Path(__file__).resolve().parents[1] / "params.yaml")
    block = export_gguf(cfg, model, tokenizer, tmp_path, "F16", [], [], "x")
    assert not block["checked"] and not block["passed"] and not list(tmp_path.iterdir())
    assert (
        gguf_line(block)
        == "not checked (not exported: only byte-level BPE tokenizers (GPT-2 style) are exported to GGUF here)"
    )
