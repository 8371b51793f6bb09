"""Peak memory of one process while an FSDP job checkpoints: sftops' sharded checkpoint (torch.distributed.
checkpoint, each process writes its own shards) against the full gather it replaced (the whole weights and
optimizer state gathered to the main process, CPU offload, written from there).

    python bench/bench_checkpoint_memory.py                  # 2 CPU processes (gloo), a 166M-parameter Llama
    python bench/bench_checkpoint_memory.py --layers 16 --processes 4

Each way runs in its own torchrun job (2 processes, FSDP2 over each transformer block, full fine-tuning, AdamW
after one step so its state exists); a thread samples each process's RSS every 2 ms while it checkpoints.
Prints, per process, the RSS before the checkpoint and its peak during it, and the ratio of the main process's
peaks, full gather / sharded."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def peak_rss_during(work) -> tuple[float, float]:
    """(RSS before, peak RSS while `work()` runs), in GiB."""
    import psutil

    me, peak, running = psutil.Process(), [0], [True]
    before = me.memory_info().rss

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], me.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        work()
    finally:
        running[0] = False
        sampler.join()
    return before / 2**30, max(peak[0], me.memory_info().rss) / 2**30


def worker(args: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftops.train import checkpoint
    from sftops.train.distributed import join, leave
    from sftops.train.setup import shard

    world = join()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, 32000, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    folder = Path(args.folder)
    state = {"loop": {"step": 1}}

    def sharded() -> None:  # what the training loop does with distributed=fsdp
        if world.is_main:
            checkpoint.start(folder, "step-000001")
        world.barrier()
        checkpoint.write_shards(checkpoint.temporary(folder, "step-000001"), model, optimizer)
        world.barrier()
        if world.is_main:
            checkpoint.commit(folder, "step-000001", state)
        world.barrier()

    def full_gather() -> None:  # what it did before
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        weights, optim = get_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if world.is_main:
            checkpoint.save(folder, "step-000001", weights, {**state, "optimizer": optim})
        del weights, optim
        world.barrier()

    world.barrier()
    before, peak = peak_rss_during(sharded if args.way == "sharded" else full_gather)
    rows = [None] * world.size
    torch.distributed.all_gather_object(rows, {"rank": world.rank, "before_gib": before, "peak_gib": peak})
    if world.is_main:
        size = sum(f.stat().st_size for f in (folder / "step-000001").iterdir()) / 2**30
        print(json.dumps({"way": args.way, "params": n_params, "checkpoint_gib": size, "processes": rows}))
    leave()


def run(way: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={args.processes}",
            __file__,
            "--worker",
            way,
            "--folder",
            folder,
            "--layers",
            str(args.layers),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if out.returncode != 0:
            sys.exit(out.stderr[-3000:])
        return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["sharded", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    if args.worker:
        args.way = args.worker
        return worker(args)
    results = {way: run(way, args) for way in ("full", "sharded")}
    print(
        f"FSDP checkpoint of a {results['full']['params'] / 1e6:.0f}M-parameter Llama (fp32 weights + AdamW state, "
        f"{results['sharded']['checkpoint_gib']:.2f} GiB on disk), {args.processes} CPU processes (gloo):"
    )
    rise = {}
    for way, result in results.items():
        for p in result["processes"]:
            print(
                f"  {way:>8}  rank {p['rank']}: RSS {p['before_gib']:.2f} GiB before, peak {p['peak_gib']:.2f} GiB "
                f"while checkpointing (+{p['peak_gib'] - p['before_gib']:.2f})"
            )
        main_process = result["processes"][0]
        rise[way] = main_process["peak_gib"] - main_process["before_gib"]
    peaks = {way: result["processes"][0]["peak_gib"] for way, result in results.items()}
    print(
        f"main process's peak RSS while checkpointing, full gather / sharded: {peaks['full'] / peaks['sharded']:.2f}x "
        f"({peaks['full']:.2f} vs {peaks['sharded']:.2f} GiB; rise +{rise['full']:.2f} vs +{rise['sharded']:.2f} GiB)"
    )


if __name__ == "__main__":
    main()
