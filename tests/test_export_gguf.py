"""The GGUF export round trip: the merged model and its tokenizer written with the gguf package (llama.cpp's Llama
layout, the chat template and stop tokens training used) and read back with transformers answer as the evaluated
model on the same rows: F32 exactly (the same greedy answers, NLL within 1e-4), Q8_0 and F16 at a measured NLL
cost. An export that lost its end-of-turn token is caught. The Ollama Modelfile renders as the chat template."""

from __future__ import annotations

import copy

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from conftest import QA
from sftops.export.gguf import write_gguf
from sftops.export.modelfile import default_system, modelfile, role_affixes
from sftops.export.verify import answers, read_back, verify_gguf
from sftops.modeling import FALLBACK_CHAT_TEMPLATE

NEW = 24  # max_new_tokens: room for each answer and its end of turn
ROWS = [
    {"id": f"r{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    for i, (q, a) in enumerate(QA * 2)
]


@pytest.fixture(scope="module")
def trained(tiny_model):
    """The tiny Llama taught the QA answers (a few full fine-tuning steps), so that its answers stop."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    text = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in ROWS]
    batch = tokenizer(text, return_tensors="pt", padding=True, add_special_tokens=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02)
    torch.manual_seed(0)
    for _ in range(60):
        loss = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model, tokenizer


def test_f32_gguf_answers_and_scores_as_the_evaluated_model(trained, tmp_path):
    model, tokenizer = trained
    evaluated = answers(model, tokenizer, ROWS, NEW, 64)
    assert all(a.stopped for a in evaluated), evaluated  # the end of turn was learnt: a lost stop would show
    path = write_gguf(model, tokenizer, tmp_path / "model-F32.gguf", "F32", "tiny")
    block = verify_gguf(path, evaluated, ROWS, NEW, 64, 1e-4)
    assert block["passed"] and block["answers_equal"] == len(ROWS), block
    assert block["max_nll_gap"] < 1e-4


def test_a_tied_output_matrix_is_written_once_as_llama_cpp_expects(trained, tmp_path):
    """A model whose output matrix is its token embeddings (SmolLM2's is): the file holds the matrix once (no
    output.weight, as llama.cpp's converter writes it), and read back it answers and scores as the model."""
    model, tokenizer = trained
    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = True
    tied = LlamaForCausalLM(config)
    tied.load_state_dict({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, strict=False)
    tied.eval()
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    once = write_gguf(tied, tokenizer, tmp_path / "tied-F32.gguf", "F32", "tiny")
    twice = write_gguf(model, tokenizer, tmp_path / "untied-F32.gguf", "F32", "tiny")
    names = {path: {t.name for t in gguf.GGUFReader(path).tensors} for path in (once, twice)}
    assert names[twice] - names[once] == {"output.weight"} and names[once] < names[twice]
    matrix = tied.lm_head.weight.numel() * 4  # float32 bytes
    assert 0 < twice.stat().st_size - once.stat().st_size - matrix < 1024  # the tensor's header and alignment
    block = verify_gguf(once, answers(tied, tokenizer, ROWS, NEW, 64), ROWS, NEW, 64, 1e-4)
    assert block["passed"] and block["answers_equal"] == len(ROWS) and block["max_nll_gap"] < 1e-4, block
    assert read_back(once)[0].config.tie_word_embeddings


def test_quantised_exports_cost_little_nll(trained, tmp_path):
    model, tokenizer = trained
    evaluated = answers(model, tokenizer, ROWS, NEW, 64)
    costs = {}
    for quant in ("F16", "Q8_0"):
        path = write_gguf(model, tokenizer, tmp_path / f"m-{quant}.gguf", quant, "tiny")
        block = verify_gguf(path, evaluated, ROWS, NEW, 64, 0.05)
        costs[quant] = (block["mean_nll_cost"], block["max_nll_gap"], block["answers_equal"], block["bytes"])
        assert block["max_nll_gap"] < 0.05, (quant, block)
    print(costs)


def test_an_export_that_lost_its_end_of_turn_token_is_caught(trained, tmp_path):
    model, tokenizer = trained
    evaluated = answers(model, tokenizer, ROWS, NEW, 64)
    broken = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    broken.chat_template = FALLBACK_CHAT_TEMPLATE
    broken.eos_token = "<pad>"  # the export names another token as EOS: generation runs past the end of turn
    path = write_gguf(model, broken, tmp_path / "lost-stop.gguf", "F32", "tiny")
    block = verify_gguf(path, evaluated, ROWS, NEW, 64, 1e-4)
    assert not block["passed"] and block["stops_honoured"] < len(ROWS), block


def test_the_modelfile_template_renders_as_the_chat_template(trained):
    _, tokenizer = trained
    a = role_affixes(tokenizer)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    by_parts = a["start"][0] + "".join(a[m["role"]][0] + m["content"] + a[m["role"]][1] for m in messages)
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert by_parts + a["generation"][0] == expected
    text = modelfile(tokenizer, "model-Q8_0.gguf")
    assert text.startswith("FROM ./model-Q8_0.gguf\n") and 'PARAMETER stop "</s>"' in text


# SmolLM2's template, in short: ChatML turns, <|im_start|> as BOS, and a system turn of its own when none is given;
# and the same without that default system turn.
TURNS = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEFAULT_SYSTEM = "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are SmolLM.<|im_end|>\n{% endif %}"


@pytest.mark.parametrize("with_system", [True, False])
@pytest.mark.parametrize("template, system", [(DEFAULT_SYSTEM + TURNS, "You are SmolLM."), (TURNS, None)])
def test_a_chatml_template_whose_turns_open_with_bos_gets_no_extra_bos_and_keeps_its_default_system(
    tiny_model, template, system, with_system
):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = template
    tokenizer.bos_token = "<|im_start|>"
    a = role_affixes(tokenizer)
    messages = [{"role": "system", "content": "S"}] * with_system + [{"role": "user", "content": "U"}]
    assert default_system(tokenizer, a) == system
    assert (f'SYSTEM """{system}"""' in modelfile(tokenizer, "m.gguf")) == (system is not None)
    shown = messages if with_system or not system else [{"role": "system", "content": system}, *messages]
    by_parts = a["start"][0] + "".join(a[m["role"]][0] + m["content"] + a[m["role"]][1] for m in shown)
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert by_parts + a["generation"][0] == expected  # Ollama adds SYSTEM when the chat has no system turn
