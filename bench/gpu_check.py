"""GPU checks of the training engine, for a machine with a CUDA GPU (CI has none; run by hand):

    python bench/gpu_check.py

On a small Llama built from a config with random weights and synthetic conversations, each check trains a
few steps with the real engine (sftops.train.loop.train_loop) and prints one line:
- bf16 autocast, LoRA and full: the loss falls; fused AdamW is in use;
- packing: the start-up self-check's packed-vs-padded gap under bf16 autocast with SDPA;
- torch.compile: the first-step loss equals the eager one (bf16 tolerance);
- QLoRA: a 4-bit NF4 base (bitsandbytes) trains its adapter and the loss falls;
- out of memory: a micro-batch far too big for the GPU stops with the engine's one-line advice (GpuMemoryError).

    python bench/gpu_check.py --only oom      # just the out-of-memory check
Needs torch, transformers, peft and (for QLoRA) bitsandbytes; not mlflow, DVC or Prefect.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sftops.config import ModelConfig, TrainConfig
from sftops.data.tokenize import encode_conversation
from sftops.encoded import Encoded
from sftops.errors import GpuMemoryError
from sftops.modeling import load_base_model, load_tokenizer
from sftops.train.distributed import World
from sftops.train.loop import train_loop
from sftops.train.lora import apply_method
from sftops.train.packing_check import packing_self_check
from sftops.train.setup import build_optimizer

WORDS = "the cat sat on the mat and the dog ran in the park what is two plus four hello how are you today".split()


def build(folder: Path) -> None:
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(200)] + ["### User:\n### Assistant:\n"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)


def conversations(n: int) -> list[list[dict[str, str]]]:
    rng = random.Random(1)
    out = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20)))
        a = " ".join(sorted(q.split()))  # a learnable task: sort the words
        out.append([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
    return out


def train(folder: Path, examples, pad: int, **train) -> dict:
    cfg = TrainConfig(**{"max_steps": 30, "micro_batch_size": 16, "learning_rate": 2e-3, "warmup_ratio": 0.0, **train})
    base = load_base_model(ModelConfig(base=str(folder)), quantize_4bit=cfg.method == "qlora")
    model = apply_method(base, cfg)
    if cfg.method != "qlora":
        model = model.cuda()
    world = World(device=torch.device("cuda"))
    started = time.perf_counter()
    result = asdict(train_loop(model, examples, cfg, pad, world))
    result["seconds"] = time.perf_counter() - started
    result["model"] = model
    result["optimizer_fused"] = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg).defaults.get(
        "fused"
    )
    return result


def out_of_memory(folder: Path, examples, pad: int) -> None:
    """A real CUDA out-of-memory (no injection): one micro-batch of 48,000 rows of ~250 tokens (12M tokens) through
    a 512-wide model, far more activations than any GPU holds. (48,000 rows: a CUDA grid dimension stops at 65,535.)"""
    long_rows = [
        Encoded(sum((e.input_ids for e in examples[i : i + 6]), []), sum((e.labels for e in examples[i : i + 6]), []))
        for i in range(0, len(examples) - 5, 6)
    ]
    many = long_rows * 600
    try:
        train(folder, many, pad, method="full", micro_batch_size=len(many), max_steps=1, grad_accum_steps=1)
    except GpuMemoryError as exc:
        print(f"out of memory: GpuMemoryError: {exc}")
    else:
        print("out of memory: FAILED: the step fitted; no out-of-memory to report")
    finally:
        torch.cuda.empty_cache()


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16: {torch.cuda.is_bf16_supported()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build(folder)
        tok = load_tokenizer(ModelConfig(base=str(folder)))
        examples = [encode_conversation(tok, c) for c in conversations(480)]
        pad = tok.pad_token_id
        if sys.argv[1:] == ["--only", "oom"]:
            out_of_memory(folder, examples, pad)
            return
        for method in ("lora", "full"):
            r = train(folder, examples, pad, method=method)
            h = r["history"]
            print(
                f"bf16 {method:5s}: loss {h[0]['train_loss']:.3f} -> {h[-1]['train_loss']:.3f} in {r['steps']} steps, "
                f"{r['seconds']:.1f} s, fused AdamW: {r['optimizer_fused']}"
            )
        r = train(folder, examples, pad, method="full", packing=True, max_steps=2)
        gap = packing_self_check(r["model"], examples, pad, torch.device("cuda"), "sdpa", n=8)
        print(f"packing self-check (bf16 autocast, sdpa): largest per-example relative gap {gap:.2e}")
        eager = train(folder, examples, pad, method="full", max_steps=3)
        compiled = train(folder, examples, pad, method="full", max_steps=3, compile=True)
        e, c = eager["history"][0]["train_loss"], compiled["history"][0]["train_loss"]
        print(f"torch.compile: first-step loss {c:.5f} vs eager {e:.5f} (relative gap {abs(c - e) / e:.1e})")
        try:
            r = train(folder, examples, pad, method="qlora")
        except Exception as exc:  # report, do not hide: the line says why QLoRA did not run
            print(f"qlora: FAILED: {type(exc).__name__}: {exc}")
        else:
            h = r["history"]
            four_bit = sum(type(m).__name__ == "Linear4bit" for m in r["model"].modules())
            print(
                f"qlora: {four_bit} Linear4bit layers, "
                f"loss {h[0]['train_loss']:.3f} -> {h[-1]['train_loss']:.3f} in {r['steps']} steps"
            )
        out_of_memory(folder, examples, pad)


if __name__ == "__main__":
    main()
