"""Run by test_accumulation under torchrun: one optimizer step's loss and gradients on each process's share,
through DDP, written by rank 0. Usage: ddp_step.py MODEL_DIR OUT_DIR"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from sftops.config import ModelConfig, TrainConfig  # noqa: E402
from sftops.data.batching import make_batch, micro_batches, step_batches  # noqa: E402
from sftops.data.tokenize import encode_conversation  # noqa: E402
from sftops.modeling import load_tokenizer  # noqa: E402
from sftops.train.distributed import join, leave  # noqa: E402
from sftops.train.setup import wrap_objective  # noqa: E402
from sftops.train.step import accumulate_gradients  # noqa: E402
from test_accumulation import conversations  # noqa: E402

model_dir, out = sys.argv[1], Path(sys.argv[2])
world = join()
tok = load_tokenizer(ModelConfig(base=model_dir))
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
examples = [encode_conversation(tok, c) for c in conversations(8)]
objective = wrap_objective(model, TrainConfig(), world)
stream = micro_batches([len(e.input_ids) for e in examples], 4, seed=3)
shares = step_batches(stream, accum=1, world=world.size, rank=world.rank)
batches = [make_batch([examples[i] for i in idx], tok.pad_token_id, packed=False) for idx in shares]
stats = accumulate_gradients(objective, batches, world.device, world)
if world.is_main:
    (out / "loss.json").write_text(json.dumps({"loss": stats.loss, "tokens": stats.supervised_tokens}))
    torch.save({n: p.grad for n, p in model.named_parameters()}, out / "grads.pt")
leave()
