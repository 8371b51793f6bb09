"""The loss of an optimizer step is sum(NLL) / total supervised tokens over all its micro-batches and processes:
micro-batch 8 x 1, micro-batch 2 x 4 accumulation, and two torchrun processes (gloo) of micro-batch 4 give the
same loss and gradients."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from sftops.config import ModelConfig
from sftops.data.batching import collate, make_batch, micro_batches, step_batches
from sftops.data.tokenize import encode_conversation
from sftops.modeling import load_tokenizer
from sftops.train.loss import SupervisedNLL, row_nll
from sftops.train.step import accumulate_gradients

HERE = Path(__file__).parent
WORDS = "the cat sat on the mat and the dog ran in the park hello how are you today".split()


def conversations(n: int) -> list[list[dict[str, str]]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        # Very different response lengths, so a mean of micro-batch means would differ from the token mean.
        q = " ".join(WORDS[i] for i in torch.randint(len(WORDS), (3,), generator=g))
        a = " ".join(
            WORDS[i] for i in torch.randint(len(WORDS), (int(torch.randint(1, 25, (1,), generator=g)),), generator=g)
        )
        out.append([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
    return out


def one_step(
    model, examples, pad_id, micro: int, accum: int, packed: bool = False
) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    stream = micro_batches([len(e.input_ids) for e in examples], micro, seed=3)
    shares = step_batches(stream, accum, world=1, rank=0)
    batches = [make_batch([examples[i] for i in idx], pad_id, packed) for idx in shares]
    stats = accumulate_gradients(SupervisedNLL(model), batches, torch.device("cpu"))
    return stats.loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_step(a, b):
    loss_a, grads_a = a
    loss_b, grads_b = b
    assert abs(loss_a - loss_b) <= 1e-5 * abs(loss_a)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_accumulation_matches_one_big_batch(tiny_model):
    tok = load_tokenizer(ModelConfig(base=str(tiny_model)))
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    examples = [encode_conversation(tok, c) for c in conversations(8)]
    big = one_step(model, examples, tok.pad_token_id, micro=8, accum=1)
    assert_same_step(big, one_step(model, examples, tok.pad_token_id, micro=2, accum=4))
    assert_same_step(big, one_step(model, examples, tok.pad_token_id, micro=2, accum=4, packed=True))
    # The loss is also what an independent computation from the model's own full logits gives.
    batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        sums, counts = row_nll(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
        )
    assert abs(sums.sum().item() / counts.sum().item() - big[0]) <= 1e-5 * big[0]
    # And the check has teeth: weighting by micro-batch means instead gives a different loss.
    per_micro = []
    stream = micro_batches([len(e.input_ids) for e in examples], 2, seed=3)
    for _ in range(4):
        batch = collate([examples[i] for i in next(stream)], tok.pad_token_id)
        with torch.no_grad():
            sums, counts = row_nll(
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
            )
        per_micro.append((sums.sum() / counts.sum()).item())
    assert abs(sum(per_micro) / 4 - big[0]) > 1e-3


def test_two_ddp_processes_match_one_process(tiny_model, tmp_path):
    """torchrun, 2 processes x micro-batch 4 with gloo on CPU, against micro-batch 8 in this process."""
    tok = load_tokenizer(ModelConfig(base=str(tiny_model)))
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    examples = [encode_conversation(tok, c) for c in conversations(8)]
    loss, grads = one_step(model, examples, tok.pad_token_id, micro=8, accum=1)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(HERE / "ddp_step.py"),
        str(tiny_model),
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp_loss = json.loads((tmp_path / "loss.json").read_text())["loss"]
    ddp_grads = torch.load(tmp_path / "grads.pt", weights_only=True)
    assert_same_step((loss, grads), (ddp_loss, ddp_grads))


def test_length_grouping_covers_every_row_once_per_epoch_with_less_padding():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(5, 300, (1000,), generator=g).tolist()
    for grouped in (False, True):
        stream = micro_batches(lengths, 8, seed=0, group_by_length=grouped)
        epoch = [next(stream) for _ in range(125)]
        assert sorted(i for b in epoch for i in b) == list(range(1000))
    padded = lambda batches: sum(max(lengths[i] for i in b) * len(b) for b in batches)  # noqa: E731
    plain = micro_batches(lengths, 8, seed=0)
    grouped = micro_batches(lengths, 8, seed=0, group_by_length=True)
    assert padded([next(grouped) for _ in range(125)]) < 0.7 * padded([next(plain) for _ in range(125)])


def test_gradient_checkpointing_changes_memory_not_the_step(tiny_model):
    from sftops.config import TrainConfig
    from sftops.train.lora import apply_method

    tok = load_tokenizer(ModelConfig(base=str(tiny_model)))
    examples = [encode_conversation(tok, c) for c in conversations(8)]
    steps = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        model = apply_method(
            base, TrainConfig(method="lora", gradient_checkpointing=checkpointing, lora={"dropout": 0.0})
        )
        model.train()
        steps.append(one_step(model, examples, tok.pad_token_id, micro=4, accum=2))
    assert steps[0][1] and steps[0][1].keys() == steps[1][1].keys()
    assert_same_step(*steps)
