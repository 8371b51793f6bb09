"""Loading a model runs no code the user did not opt in to: a model folder that ships its own Python code is
refused (and its code never runs) unless model.trust_remote_code is set; pickle-based weights are refused unless
model.allow_pickle is set; fine-tuned models and checkpoints are safetensors, their loop state read with
weights_only=True."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sftops.config import ModelConfig
from sftops.errors import ModelError
from sftops.modeling import load_base_model, load_finetuned, load_tokenizer

pytestmark = pytest.mark.reliability

EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("the model's own code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "evil"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


def test_a_model_shipping_its_own_code_is_refused_and_its_code_never_runs(tiny_model, tmp_path, figures):
    folder, marker = tmp_path / "remote-code", tmp_path / "RAN"
    shutil.copytree(tiny_model, folder)
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    )
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="set model.trust_remote_code: true"):
        load_base_model(ModelConfig(base=str(folder)))
    load_tokenizer(ModelConfig(base=str(folder)))  # the tokenizer has no code of its own: it loads, running nothing
    assert not marker.exists()
    figures["unsafe model loads refused"] += 1


def test_pickle_weights_are_refused_unless_allowed(tiny_model, tmp_path, figures):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model, folder)
    (folder / "model.safetensors").unlink()
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_model).state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pickle-based weights .* refused unless you set model.allow_pickle: true"):
        load_base_model(ModelConfig(base=str(folder)))
    assert load_base_model(ModelConfig(base=str(folder), allow_pickle=True)).config.num_hidden_layers == 2
    figures["unsafe model loads refused"] += 1


def test_a_fine_tuned_adapter_without_safetensors_is_refused(tiny_model, tmp_path, figures):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "sftops_model.json").write_text(
        json.dumps({"method": "lora", "weights": "adapter", "base": {"base": str(tiny_model)}})
    )
    shutil.copy(Path(tiny_model) / "tokenizer.json", folder)
    shutil.copy(Path(tiny_model) / "tokenizer_config.json", folder)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelError, match="no adapter_model.safetensors"):
        load_finetuned(folder)
    figures["unsafe model loads refused"] += 1
