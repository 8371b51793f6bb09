"""Padding-free packing computes the same objective as padded batches: per-token logits and per-example losses
match on a real pre-trained model, attention never crosses an example boundary, and the start-up self-check
refuses to train when it would."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import sftops.train.packing_check as packing_check
from conftest import TINY_LLAMA
from sftops.config import ModelConfig
from sftops.data.packing import pack
from sftops.data.tokenize import encode_conversation
from sftops.encoded import IGNORE, Encoded
from sftops.errors import TrainingError
from sftops.modeling import load_tokenizer
from sftops.train.packing_check import packing_self_check, per_example_nll


@pytest.fixture(scope="module")
def stories(stories_model, gsm8k):
    tok = load_tokenizer(ModelConfig(base=str(stories_model)))
    model = AutoModelForCausalLM.from_pretrained(stories_model, dtype=torch.float32, attn_implementation="sdpa").eval()
    rows = [json.loads(line) for line in (gsm8k / "test.jsonl").read_text().splitlines()[:5]]
    examples = [
        encode_conversation(
            tok, [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
        )
        for r in rows
    ]
    return model, tok, examples


def test_packed_logits_equal_each_example_alone(stories):
    model, tok, examples = stories
    batch = pack(examples, tok.pad_token_id)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for e in examples:
            alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            # float32 rounding differs with the sequence length of the attention kernels: compare relative to
            # the logits' scale (a leak across examples moves logits by orders of magnitude more).
            gap = (packed[start : start + len(e.input_ids)] - alone).abs().max()
            assert gap <= 1e-5 * alone.abs().max()
            start += len(e.input_ids)
    # The first token of each later example is not a target (it is not predicted from the previous example).
    starts = torch.nonzero(batch["position_ids"][0] == 0).flatten()
    assert (batch["labels"][0, starts] == IGNORE).all()


def test_packed_and_padded_losses_match(stories):
    model, tok, examples = stories
    padded = per_example_nll(model, examples, tok.pad_token_id, torch.device("cpu"), packed=False)
    packed = per_example_nll(model, examples, tok.pad_token_id, torch.device("cpu"), packed=True)
    assert padded == pytest.approx(packed, rel=1e-5)
    assert len(set(padded)) == len(padded)  # distinct rows, so a mix-up would show


def test_a_leaking_packed_mask_is_caught_by_the_self_check(stories, monkeypatch):
    model, tok, examples = stories
    assert packing_self_check(model, examples, tok.pad_token_id, torch.device("cpu"), "sdpa") < 1e-5
    real_make_batch = packing_check.make_batch

    def leaking(examples, pad_id, packed, source_ids=None):
        # A plain all-ones mask: the model then builds one causal mask over the whole packed row, as an
        # attention implementation that ignores the per-example position ids would.
        batch = real_make_batch(examples, pad_id, packed, source_ids)
        if packed:
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        return batch

    monkeypatch.setattr(packing_check, "make_batch", leaking)
    with pytest.raises(TrainingError, match="train.packing=false"):
        packing_self_check(model, examples, tok.pad_token_id, torch.device("cpu"), "sdpa")


def test_flex_attention_packed_losses_match_padded_sdpa():
    """FlexAttention masks packed documents by block (no mask growing with the square of the packed length),
    and must give each packed example exactly the loss it has padded with SDPA (float32 on CPU). The packed
    rows keep one shape: torch 2.13's CPU compiler fails on the dynamic-shape FlexAttention kernel it builds
    when a second shape arrives (the GPU's Triton kernel does not)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # The tiny Llama, twice as wide: a head dimension of 16, the smallest FlexAttention's CPU kernel takes.
    config = LlamaConfig(**{**TINY_LLAMA, "hidden_size": 64, "intermediate_size": 128}, vocab_size=300)
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    examples = []
    for length in (37, 90, 5, 140):  # four: the self-check packs four, the same shape
        ids = torch.randint(3, 300, (length,), generator=g).tolist()
        examples.append(Encoded(ids, [IGNORE] * (length // 3) + ids[length // 3 :]))
    padded = per_example_nll(model, examples, 0, torch.device("cpu"), packed=False)
    model.set_attn_implementation("flex_attention")
    packed = per_example_nll(model, examples, 0, torch.device("cpu"), packed=True)
    assert packed == pytest.approx(padded, rel=1e-5)
    assert len(set(padded)) == len(padded)
    assert packing_self_check(model, examples, 0, torch.device("cpu"), "flex_attention") < 1e-5
