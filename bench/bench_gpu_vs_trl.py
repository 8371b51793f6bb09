"""GPU throughput of the sftops engine against TRL's SFTTrainer on a realistic chat-SFT workload, with MFU.

    python bench/bench_gpu_vs_trl.py --budget-s 220                  # on a CUDA GPU (the H200): the whole table
    python bench/bench_gpu_vs_trl.py --device cpu --tiny --budget-s 600   # the dry run: same code path, tiny model

Workload: a Llama built from a config (about 0.5B parameters, 49,152-token vocabulary, random weights: speed
needs shapes only), seeded synthetic conversations whose lengths follow a log-normal of mean about 700 tokens
capped at 2,048, a prompt share drawn from 20-60% (about 60% of tokens supervised), and the same rows per
optimizer step for both sides (a fixed budget of --step-tokens on average). On a GPU both sides train in bf16
autocast over float32 master weights (and sftops once more with pure bf16 weights, train.param_dtype).
Both methods: full fine-tuning and LoRA (r 16, all linear layers, the same adapter initialisation).

Runs, in this order, until --budget-s is spent (those left are printed as skipped):
- matched: TRL padded in sftops' micro-batch order, sftops padded ungrouped; their first-step losses must agree;
- each side's candidates for its best: TRL padding_free or packing (BFD), with SDPA or FlexAttention; sftops
  packing with SDPA or FlexAttention, or padded rows grouped by length.
All runs share one process (model weights are rebuilt from one saved copy; the GPU's peak memory is reset per
run), so imports and compilation are paid once. Throughput = tokens of the timed steps / their wall time.
MFU = 6 x all parameters x all non-padding tokens/s over --peak-flops (989e12: the H100/H200 dense bf16 peak);
the measured bf16 matmul ceiling is printed beside it. Needs trl and datasets (bench/stage_device_wheels.sh
stages them as wheels for the GPU machine).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import platform
import resource
import signal
import sys
import time
from dataclasses import dataclass, field

import torch

GPU_LLAMA = dict(
    hidden_size=1280,
    intermediate_size=3456,
    num_hidden_layers=24,
    num_attention_heads=20,
    num_key_value_heads=4,
    vocab_size=49152,
)
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
)
# (side, name, options), in priority order: the matched pair first, then each side's candidates for its best.
CANDIDATES = [
    ("trl", "matched", {}),
    ("sftops", "matched", {"group_by_length": False, "packing": False}),
    ("trl", "padding_free+flex", {"padding_free": True, "attn": "flex_attention"}),
    ("sftops", "packing+flex", {"packing": True, "attn": "flex_attention"}),
    ("trl", "padding_free+sdpa", {"padding_free": True}),
    ("sftops", "packing+sdpa", {"packing": True}),
    ("trl", "packing_bfd+flex", {"packing": True, "attn": "flex_attention"}),
    ("sftops", "group_by_length", {"group_by_length": True}),
]
PURE_BF16 = (
    "sftops",
    "packing+flex+bf16 weights",
    {"packing": True, "attn": "flex_attention", "param_dtype": "bfloat16"},
)


@dataclass
class Run:
    side: str
    name: str
    method: str
    losses: list[float] = field(default_factory=list)
    supervised: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # all non-padding tokens of each step
    times: list[float] = field(default_factory=list)
    peak_gib: float = float("nan")
    left_over_gib: float = float("nan")  # GPU memory still allocated when the run started: should be ~0
    error: str = ""

    def rate(self, warmup: int, counts: list[int]) -> float:
        return sum(counts[warmup:]) / (self.times[-1] - self.times[warmup - 1])


def workload(n: int, vocab: int, mean: float, cap: int, seed: int) -> list:
    """Chat-SFT-shaped rows: log-normal lengths (sigma 0.8) of the given mean, capped, a 20-60% prompt share."""
    from sftops.encoded import IGNORE, Encoded

    g = torch.Generator().manual_seed(seed)
    sigma = 0.8
    mu = math.log(mean) - sigma**2 / 2
    lengths = torch.exp(mu + sigma * torch.randn(n, generator=g)).clamp(16, cap).round().long().tolist()
    out = []
    for length in lengths:
        prompt = max(1, round(length * (0.2 + 0.4 * float(torch.rand(1, generator=g)))))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append(Encoded(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def matmul_ceiling(device: torch.device, size: int) -> float:
    """FLOP/s of a large bf16 (GPU) or float32 (CPU) matrix product on random data, the mean of ten after warm-up."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * size**3 / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fresh_model(weights: dict, config, method: str, options: dict, seed: int, device: torch.device) -> torch.nn.Module:
    """The saved random weights in a new model, with the adapter (seeded: the same on both sides) and dtype asked."""
    from transformers import LlamaForCausalLM

    from sftops.config import TrainConfig
    from sftops.train.lora import apply_method

    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.load_state_dict(weights)  # copies: the saved weights stay untouched for the next run
    # FlexAttention has no backward on the CPU: the dry run trains those candidates with SDPA
    # (same code path otherwise).
    model.set_attn_implementation(options.get("attn", "sdpa") if device.type == "cuda" else "sdpa")
    torch.manual_seed(seed)
    cfg = TrainConfig(
        method=method,
        lora={"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        param_dtype=options.get("param_dtype", "float32"),
    )
    return apply_method(model, cfg).to(device)


def train_config(spec: dict, method: str, options: dict):
    from sftops.config import TrainConfig

    return TrainConfig(
        method=method,
        max_steps=spec["steps"],
        micro_batch_size=spec["micro_batch"],
        grad_accum_steps=spec["accum"],
        learning_rate=spec["lr"],
        warmup_ratio=0.1,
        max_grad_norm=1.0,
        seed=spec["seed"],
        lora={"r": 16, "alpha": 32, "dropout": 0.0},
        group_by_length=options.get("group_by_length", False),
        packing=options.get("packing", False),
        param_dtype=options.get("param_dtype", "float32"),
    )


class OutOfTime(BaseException):
    """The outer `timeout` sent SIGTERM: not an Exception, so no run's error handling swallows it."""


class StopRun(Exception):
    """Raised from the step callback when a run has used its share of the budget (after its timed steps)."""


def run_sftops(
    run: Run, model: torch.nn.Module, examples: list, spec: dict, options: dict, device: torch.device
) -> None:
    from sftops.data.batching import micro_batches
    from sftops.train.distributed import World
    from sftops.train.loop import train_loop

    cfg = train_config(spec, run.method, options)
    stream = micro_batches([len(e.input_ids) for e in examples], cfg.micro_batch_size, cfg.seed, cfg.group_by_length)

    def on_step(step: int, record: dict) -> None:
        sync(device)
        run.times.append(time.perf_counter())
        run.losses.append(record["train_loss"])
        run.supervised.append(int(record["supervised_tokens"]))
        # The same seeded stream the loop drew from: every token of the step's rows (neither side pads packed rows).
        run.tokens.append(
            sum(
                len(examples[i].input_ids)
                for i in itertools.chain(*(next(stream) for _ in range(cfg.grad_accum_steps)))
            )
        )
        if time.perf_counter() > spec["deadline"] and step > spec["warmup"] + 1:
            raise StopRun

    try:
        train_loop(model, examples, cfg, pad_id=0, world=World(device=device), on_step=[on_step])
    except StopRun:
        pass


def run_trl(
    run: Run, model: torch.nn.Module, examples: list, spec: dict, options: dict, device: torch.device, workdir: str
) -> None:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from sftops.data.batching import micro_batches

    micro, packed = spec["micro_batch"], options.get("packing", False)
    step = {"loss": 0.0, "supervised": 0, "tokens": 0}

    class MatchedOrderSFTTrainer(SFTTrainer):
        """Samples rows in sftops' micro-batch order (the first epoch of micro_batches, ungrouped)."""

        def _get_train_sampler(self, train_dataset=None):
            if packed:  # packed rows are new rows: TRL's own order
                return super()._get_train_sampler(train_dataset)
            epoch = micro_batches([len(e.input_ids) for e in examples], micro, spec["seed"])
            return [i for batch in itertools.islice(epoch, math.ceil(len(examples) / micro)) for i in batch]

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            step["loss"] += float(loss)  # micro-batch NLL sum / the step's supervised tokens: these add up
            step["supervised"] += int((inputs["labels"][:, 1:] != -100).sum())
            mask = inputs.get("attention_mask")
            step["tokens"] += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            return loss

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            run.times.append(time.perf_counter())
            run.losses.append(step["loss"])
            run.supervised.append(step["supervised"])
            run.tokens.append(step["tokens"])
            step.update(loss=0.0, supervised=0, tokens=0)
            if time.perf_counter() > spec["deadline"] and state.global_step > spec["warmup"] + 1:
                control.should_training_stop = True

    mean_length = sum(len(e.input_ids) for e in examples) / len(examples)
    data = Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]})
    cuda = device.type == "cuda"
    args = SFTConfig(
        output_dir=f"{workdir}/trl-out",
        max_steps=spec["steps"],
        gradient_accumulation_steps=spec["accum"],
        # Packed: sequences of about a micro-batch's worth of tokens, the same work per step.
        per_device_train_batch_size=1 if packed else micro,
        max_length=round(micro * mean_length) if packed else None,
        packing=packed,
        padding_free=options.get("padding_free", False),
        learning_rate=spec["lr"],
        weight_decay=0.0,
        optim="adamw_torch_fused",
        lr_scheduler_type="cosine",
        warmup_steps=round(0.1 * spec["steps"]),
        max_grad_norm=1.0,
        seed=spec["seed"],
        use_cpu=not cuda,
        bf16=cuda,
        gradient_checkpointing=False,  # SFTConfig's default is True
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = MatchedOrderSFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=id_tokenizer(model.config.vocab_size),
        callbacks=[StepClock()],
    )
    trainer.train()


def id_tokenizer(vocab: int):
    """A real tokenizer over the synthetic ids (token i is "t{i}"): the rows are ids already, TRL asks for pad
    and EOS."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="t0", bos_token="t1", eos_token="t2")


def one_run(
    side: str,
    name: str,
    method: str,
    options: dict,
    weights: dict,
    config,
    examples: list,
    spec: dict,
    device: torch.device,
    workdir: str,
) -> Run:
    run = Run(side, name, method)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        run.left_over_gib = torch.cuda.memory_allocated() / 2**30
    try:
        model = fresh_model(weights, config, method, options, spec["seed"], device)
        if side == "trl":
            run_trl(run, model, examples, spec, options, device, workdir)
        else:
            run_sftops(run, model, examples, spec, options, device)
    except Exception as exc:  # a candidate that cannot run here (a missing kernel, say) is reported, not fatal
        run.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    if device.type == "cuda":
        run.peak_gib = torch.cuda.max_memory_allocated() / 2**30
    return run


def versions() -> str:
    import importlib.metadata as md

    names = ("torch", "transformers", "peft", "accelerate", "trl", "datasets")
    found = {n: md.version(n) if _installed(n) else "absent" for n in names}
    return f"python {platform.python_version()}, " + ", ".join(f"{n} {v}" for n, v in found.items())


def _installed(name: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


def report(runs: list[Run], skipped: list[str], spec: dict, n_params: dict, peak: float, ceiling: float) -> None:
    warmup = spec["warmup"]
    print(
        f"\n{'method':7s}{'side':8s}{'setting':28s}{'sup. tok/s':>12s}{'all tok/s':>12s}{'MFU':>7s}{'of ceiling':>11s}"
        f"{'peak GiB':>10s}{'first loss':>12s}"
    )
    speed: dict[tuple[str, str, str], float] = {}
    for r in runs:
        if r.error or len(r.times) <= warmup:
            print(
                f"{r.method:7s}{r.side:8s}{r.name:28s}  failed: {r.error or 'too few steps in its share of the budget'}"
            )
            continue
        sup, every = r.rate(warmup, r.supervised), r.rate(warmup, r.tokens)
        speed[r.method, r.side, r.name] = sup
        flops = 6 * n_params[r.method] * every
        print(
            f"{r.method:7s}{r.side:8s}{r.name:28s}{sup:>12.0f}{every:>12.0f}"
            f"{flops / peak:>7.1%}{flops / ceiling:>11.1%}"
            f"{r.peak_gib:>10.2f}{r.losses[0]:>12.6f}"
        )
    for name in skipped:
        print(f"{'':15s}{name:28s}  skipped: --budget-s spent")
    print()
    for method in ("full", "lora"):
        done = {k: v for k, v in speed.items() if k[0] == method}
        pair = [r for r in runs if r.method == method and r.name == "matched" and not r.error and r.losses]
        if len(pair) == 2:
            a, b = pair[0].losses[0], pair[1].losses[0]
            tolerance = 1e-3 if spec["device"] == "cuda" else 1e-5
            gap = abs(a - b) / abs(a)
            print(
                f"{method}: matched first-step loss TRL {a:.6f}, sftops {b:.6f}, relative gap {gap:.1e} "
                f"({'within' if gap <= tolerance else 'ABOVE'} {tolerance:g})"
            )
        best = {side: max((k for k in done if k[1] == side), key=done.get, default=None) for side in ("trl", "sftops")}
        if best["trl"] and best["sftops"]:
            peaks = {r.side: r.peak_gib for r in runs if (r.method, r.side, r.name) in (best["trl"], best["sftops"])}
            print(
                f"{method}: supervised tokens/s, sftops best ({best['sftops'][2]}) / TRL best ({best['trl'][2]}): "
                f"{done[best['sftops']] / done[best['trl']]:.2f}x; "
                f"peak memory {peaks['sftops']:.2f} / {peaks['trl']:.2f} GiB"
            )
        if (method, "sftops", "matched") in done and (method, "trl", "matched") in done:
            print(
                f"{method}: supervised tokens/s, matched batching, sftops / TRL: "
                f"{done[method, 'sftops', 'matched'] / done[method, 'trl', 'matched']:.2f}x"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument(
        "--tiny", action="store_true", help="a tiny model and short rows: the CPU dry run of the same code path"
    )
    p.add_argument(
        "--budget-s", type=float, default=220, help="wall time for all runs; runs left when it is spent are skipped"
    )
    p.add_argument(
        "--steps", type=int, default=7, help="optimizer steps per run (fewer if its share of the budget ends)"
    )
    p.add_argument("--warmup", type=int, default=3, help="steps not timed (compilation happens here)")
    p.add_argument(
        "--step-tokens", type=int, default=None, help="tokens per optimizer step, on average (65,536; tiny: 2,048)"
    )
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--methods", default="full,lora")
    p.add_argument("--peak-flops", type=float, default=989e12, help="dense bf16 peak FLOP/s (H100/H200 SXM: 989e12)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not 1 <= args.warmup < args.steps - 1:
        raise SystemExit("--warmup must be at least 1 and leave two timed steps")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible (use --device cpu --tiny for the dry run)")
    run_all(args, device)


def run_all(args: argparse.Namespace, device: torch.device) -> None:
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    shape = TINY_LLAMA if args.tiny else GPU_LLAMA
    mean, cap = (70, 200) if args.tiny else (700, 2048)
    step_tokens = args.step_tokens or (2048 if args.tiny else 65536)
    micro = max(1, round(step_tokens / args.accum / mean))
    config = LlamaConfig(
        **shape,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(args.seed)
    with torch.device(device):  # initialised where it is fast; kept on the CPU: every run starts from these weights
        weights = {k: v.cpu() for k, v in LlamaForCausalLM(config).state_dict().items()}
    n_full = sum(t.numel() for t in weights.values())
    examples = workload(micro * args.accum * args.steps * 2, shape["vocab_size"], mean, cap, args.seed)
    lengths = [len(e.input_ids) for e in examples]
    supervised = sum(e.n_targets for e in examples) / sum(lengths)
    ceiling = matmul_ceiling(device, 512 if args.tiny else 8192)
    methods = args.methods.split(",")
    probe = fresh_model(weights, config, "lora", {}, args.seed, device)
    n_params = {"full": n_full, "lora": sum(p.numel() for p in probe.parameters())}
    n_lora = sum(p.numel() for p in probe.parameters() if p.requires_grad)
    del probe
    gc.collect()
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {name}; {versions()}")
    on_cuda = device.type == "cuda"
    precision = "bf16 autocast over float32 weights" if on_cuda else "float32; +flex runs use SDPA on the CPU"
    print(
        f"model: Llama {shape}, {n_full / 1e6:.3g}M parameters (LoRA r 16 all linear: {n_lora / 1e6:.3g}M trained); "
        f"{precision}; "
        f"MFU counts 6 x all parameters for LoRA too (its true cost is nearer 4 x)"
    )
    print(
        f"rows: log-normal lengths, mean {sum(lengths) / len(lengths):.0f} (target {mean}), "
        f"max {max(lengths)} (cap {cap}), {supervised:.0%} supervised; "
        f"{micro} rows per micro-batch x {args.accum} = ~{micro * args.accum * mean} tokens per step; "
        f"{args.steps} steps per run, first {args.warmup} not timed"
    )
    print(
        f"matmul ceiling: {ceiling / 1e12:.3g} TFLOP/s ({'bf16 8192^3' if not args.tiny else 'tiny'}); "
        f"peak used for MFU {args.peak_flops / 1e12:.0f} TFLOP/s; budget {args.budget_s:.0f} s",
        flush=True,
    )
    plan = [(side, name, method, options) for side, name, options in CANDIDATES for method in methods]
    if "full" in methods:
        plan.append((*PURE_BF16[:2], "full", PURE_BF16[2]))
    spec = {
        "steps": args.steps,
        "warmup": args.warmup,
        "micro_batch": micro,
        "accum": args.accum,
        "lr": 1e-5,
        "seed": args.seed,
        "device": device.type,
    }
    runs, skipped = [], []

    def out_of_time(signum, frame):  # the outer `timeout` ends the command: print what was measured so far
        raise OutOfTime(f"signal {signum}")

    signal.signal(signal.SIGTERM, out_of_time)
    try:
        with tempfile.TemporaryDirectory(prefix="sftops-gpu-bench-") as workdir:
            for i, (side, name, method, options) in enumerate(plan):
                left = args.budget_s - (time.perf_counter() - started)
                if left < 15:
                    skipped += [f"{m} {s} {n}" for s, n, m, _ in plan[i:]]
                    break
                # Each run may use an even share of what is left, but always finishes its warm-up and two timed steps.
                spec["deadline"] = time.perf_counter() + left / (len(plan) - i)
                run = one_run(side, name, method, options, weights, config, examples, spec, device, workdir)
                runs.append(run)
                status = run.error or (
                    f"{len(run.times)} steps, first loss {run.losses[0]:.6f}" if run.losses else "no steps"
                )
                print(
                    f"  {method:5s} {side:6s} {name:28s} {time.perf_counter() - started:6.0f} s  {status}; "
                    f"GPU memory left over from earlier runs {run.left_over_gib:.2f} GiB",
                    flush=True,
                )
                print("RUN " + json.dumps(run.__dict__), flush=True)
    except OutOfTime as stopped:
        print(f"stopped by {stopped} during a run; the table holds the runs that finished", flush=True)
    report(runs, skipped, spec, n_params, args.peak_flops, ceiling)
    if device.type == "cpu":
        print(
            f"peak RSS of the whole process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB "
            "(GPU runs report each run's peak)"
        )
    print(f"wall time {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
