"""A LoRA adapter that vLLM will load: real PEFT adapters on the tiny Llama, saved as training saves them, checked
against vLLM's rules (export/vllm.py: rank against --max-lora-rank's allowed values, the modules it serves LoRA
on, no modules_to_save, DoRA or resized embeddings). A plain adapter passes with the smallest --max-lora-rank that
holds it; each broken rule is named. `sftops serve-lines` prints the one `vllm serve` line that serves champion
and challenger side by side. vLLM itself is not installed here: the line is checked as text, not run."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftops.cli import main
from sftops.config import ModelConfig
from sftops.export.vllm import MAX_LORA_RANKS, check_adapter, check_model
from sftops.modeling import save_finetuned

ROOT = Path(__file__).resolve().parents[1]
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapter(tiny_model: Path, out: Path, resize: int = 0, **lora) -> Path:
    """A PEFT adapter on the tiny model, saved as the train stage saves one (an sftops model folder)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    if resize:
        tokenizer.add_tokens([f"<new{i}>" for i in range(resize)])
        model.resize_token_embeddings(len(tokenizer))
    peft_model = get_peft_model(model, LoraConfig(**{"r": 16, "lora_alpha": 32, "target_modules": LINEAR, **lora}))
    base = ModelConfig(base=str(tiny_model)).model_dump(mode="json")
    save_finetuned(peft_model, tokenizer, out, {"method": "lora", "weights": "adapter", "base": base})
    return out


def saved_modules(folder: Path) -> tuple[set[str], list[str]]:
    """Read independently of the check: the modules with LoRA factors, and the other tensors."""
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    lora = {k.split(".")[-3] for k in keys if ".lora_A." in k or ".lora_B." in k}
    return lora, [k for k in keys if ".lora_A." not in k and ".lora_B." not in k]


@pytest.mark.parametrize("rank", [16, 24])
def test_a_plain_lora_adapter_passes_with_the_smallest_max_lora_rank_that_holds_it(tiny_model, tmp_path, rank):
    folder = adapter(tiny_model, tmp_path / "a", r=rank)
    check = check_adapter(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    lora, other = saved_modules(folder)
    assert check.loads and not check.problems and not other
    assert check.rank == config["r"] == rank
    assert check.max_lora_rank == min(r for r in MAX_LORA_RANKS if r >= rank)
    assert set(check.modules) == lora == set(LINEAR)


def test_modules_to_save_is_refused(tiny_model, tmp_path):
    check = check_adapter(adapter(tiny_model, tmp_path / "a", modules_to_save=["lm_head"]))
    assert not check.loads
    assert any(p.startswith("modules_to_save ['lm_head']") for p in check.problems), check.problems


def test_dora_is_refused(tiny_model, tmp_path):
    check = check_adapter(adapter(tiny_model, tmp_path / "a", use_dora=True))
    assert not check.loads and any(p.startswith("DoRA") for p in check.problems), check.problems


def test_a_resized_vocabulary_saved_with_the_adapter_is_refused(tiny_model, tmp_path):
    folder = adapter(tiny_model, tmp_path / "a", resize=8)
    _, other = saved_modules(folder)
    assert other, "peft saved no embedding weights with the resized vocabulary: the case is not built"
    check = check_adapter(folder)
    assert not check.loads
    assert any(p.startswith("full weights saved with the adapter") for p in check.problems), check.problems


def test_lora_on_a_module_vllm_does_not_serve_is_refused(tiny_model, tmp_path):
    check = check_adapter(adapter(tiny_model, tmp_path / "a", target_modules=["q_proj", "embed_tokens"]))
    assert not check.loads
    assert any(p.startswith("LoRA on ['embed_tokens']") for p in check.problems), check.problems


def test_a_rank_above_the_largest_max_lora_rank_is_refused(tiny_model, tmp_path):
    check = check_adapter(adapter(tiny_model, tmp_path / "a", r=MAX_LORA_RANKS[-1] + 8, target_modules=["q_proj"]))
    assert not check.loads and check.max_lora_rank is None
    assert any(f"rank {MAX_LORA_RANKS[-1] + 8} is above" in p for p in check.problems), check.problems


def test_serve_lines_serves_champion_and_challenger_side_by_side(tiny_model, tmp_path, capsys):
    champion = adapter(tiny_model, tmp_path / "champ", r=16)
    challenger = adapter(tiny_model, tmp_path / "chall", r=24)
    into = tmp_path / "serving"
    argv = ["serve-lines", "--params", str(ROOT / "params.yaml"), "--into", str(into)]
    assert main([*argv, "--champion", str(champion), "--challenger", str(challenger)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    words = shlex.split(printed[-1])
    assert words[:3] == ["vllm", "serve", str(tiny_model)]
    assert words[words.index("--lora-modules") + 1 : words.index("--lora-modules") + 3] == [
        f"champion={into / 'champion'}",
        f"challenger={into / 'challenger'}",
    ]
    assert words[words.index("--max-lora-rank") + 1] == "32"  # the larger rank, 24, rounded up to an allowed value
    for role in ("champion", "challenger"):  # the folders the line names hold the adapters
        assert (into / role / "adapter_model.safetensors").read_bytes() == (
            (champion if role == "champion" else challenger) / "adapter_model.safetensors"
        ).read_bytes()


def test_serve_lines_says_why_a_refused_adapter_is_not_served_side_by_side(tiny_model, tmp_path, capsys):
    champion = adapter(tiny_model, tmp_path / "champ")
    challenger = adapter(tiny_model, tmp_path / "chall", use_dora=True)
    argv = ["serve-lines", "--params", str(ROOT / "params.yaml"), "--into", str(tmp_path / "serving")]
    assert main([*argv, "--champion", str(champion), "--challenger", str(challenger)]) == 0
    printed = capsys.readouterr().out
    assert "challenger" in printed and "DoRA" in printed
    assert "vllm serve" in printed.splitlines()[0]  # the champion alone still has its line
    assert printed.strip().splitlines()[-1].startswith("not servable side by side")


def test_a_gguf_base_is_named_as_not_the_weights_vllm_would_serve(tiny_model, tmp_path):
    folder = adapter(tiny_model, tmp_path / "a")
    manifest = json.loads((folder / "sftops_model.json").read_text())
    manifest["base"]["gguf_file"] = "base.Q4_1.gguf"
    (folder / "sftops_model.json").write_text(json.dumps(manifest))
    block = check_model(folder, "v1")
    assert block["adapter"] and not block["loads"]
    assert any("GGUF file base.Q4_1.gguf" in p for p in block["problems"]), block["problems"]
