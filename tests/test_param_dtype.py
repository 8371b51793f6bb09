"""train.param_dtype: pure bf16 weights train with the same objective as float32 master weights."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from sftops.config import TrainConfig
from sftops.encoded import IGNORE, Encoded
from sftops.train.loop import train_loop
from sftops.train.lora import apply_method


def examples(n: int, vocab: int) -> list[Encoded]:
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        length = int(torch.randint(12, 40, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append(Encoded(ids, [IGNORE] * (length // 2) + ids[length // 2 :]))
    return out


def losses(tiny_model, method: str, param_dtype: str) -> tuple[list[float], set[torch.dtype]]:
    cfg = TrainConfig(
        method=method,
        param_dtype=param_dtype,
        max_steps=4,
        micro_batch_size=4,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        lora={"dropout": 0.0},
        packing=True,
    )
    torch.manual_seed(0)
    model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), cfg)
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    run = train_loop(model, examples(16, model.config.vocab_size), cfg, pad_id=0)
    return [r["train_loss"] for r in run.history], dtypes


@pytest.mark.parametrize("method", ["full", "lora"])
def test_bf16_weights_train_the_same_objective_as_float32(tiny_model, method):
    reference, reference_dtypes = losses(tiny_model, method, "float32")
    bf16, bf16_dtypes = losses(tiny_model, method, "bfloat16")
    assert reference_dtypes == {torch.float32}
    # Full: every trained weight is bf16; LoRA: the base is bf16 and the small adapter stays float32 (peft).
    assert bf16_dtypes == ({torch.bfloat16} if method == "full" else {torch.float32})
    assert bf16[0] == pytest.approx(reference[0], rel=2e-2)  # same rows, same weights rounded to bf16
    assert bf16[-1] < bf16[0]  # and it learns


def test_bf16_weights_with_a_4bit_base_are_refused():
    with pytest.raises(ValueError, match="param_dtype"):
        TrainConfig(method="qlora", param_dtype="bfloat16")
