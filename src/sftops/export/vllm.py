"""Will vLLM load this LoRA adapter, and serve what was evaluated? A static check of the adapter folder (its
adapter_config.json and the tensor names in adapter_model.safetensors) against vLLM's own rules, and the
`vllm serve` line that serves champion and challenger side by side. vLLM itself is not needed (nor run) here.

The rules, as vLLM's source states them (vllm-project/vllm, read 2026-12-07):
- `vllm/config/lora.py`: `max_lora_rank` is one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (16 by default);
- `vllm/lora/peft_helper.py` `validate_legal`: the rank (and any `rank_pattern` rank) at most `max_lora_rank`;
  `bias` "none"; no `modules_to_save` (except classifier/score heads of classification models), no DoRA, no
  `lora_bias`, no base-modifying init (PiSSA, OLoRA, CorDA, LoftQ), no aLoRA, `layer_replication`, BD-LoRA or
  QALoRA;
- `vllm/lora/lora_model.py` `from_local_checkpoint`: every LoRA module's name must be one vLLM's model supports
  (`vllm/lora/utils.py` `get_supported_lora_modules`: the model's linear layers, with packed ones such as Llama's
  qkv_proj and gate_up_proj unpacked to q/k/v_proj and gate/up_proj), else it refuses the adapter; full
  embedding weights in the adapter (a resized vocabulary saved with the adapter) are skipped, silently
  (`is_base_embedding_weights`): vLLM would then serve the base's embeddings, not the trained ones."""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The linear layers of the Llama family as vLLM names LoRA modules (llama.py's packed_modules_mapping unpacked).
LLAMA_LORA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
SUPPORTED_INITS = {"gaussian", "eva", "orthogonal", "mica", "lora_ga"}  # string inits that leave the base as is


@dataclass
class AdapterCheck:
    """What vLLM would make of one adapter folder."""

    loads: bool  # no rule broken: vLLM loads it and serves the weights that were trained
    rank: int  # the largest LoRA rank in the adapter
    max_lora_rank: int | None  # the smallest `--max-lora-rank` vLLM accepts that holds it; None: none does
    modules: list[str] = field(default_factory=list)  # the LoRA modules found in the weights
    problems: list[str] = field(default_factory=list)  # each rule broken, with the fix

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def max_lora_rank(rank: int) -> int | None:
    """The smallest value vLLM's --max-lora-rank takes that is at least `rank`."""
    return next((r for r in MAX_LORA_RANKS if r >= rank), None)


def tensor_names(adapter_dir: Path) -> list[str]:
    """The tensor names in adapter_model.safetensors, read from its header (no tensor is loaded)."""
    with open(adapter_dir / "adapter_model.safetensors", "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return sorted(k for k in header if k != "__metadata__")


def lora_module(name: str) -> str | None:
    """The module a LoRA tensor belongs to (`...layers.0.self_attn.q_proj.lora_A.weight` -> q_proj); None for a
    tensor that is not a LoRA factor (full weights saved with the adapter)."""
    parts = name.split(".")
    if parts[-1] == "weight" and len(parts) > 2 and parts[-2] in ("lora_A", "lora_B"):
        return parts[-3]
    if parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        return parts[-2]
    return None


def check_config(config: dict[str, Any]) -> list[str]:
    """The rules of vLLM's PEFTHelper that adapter_config.json alone decides (rank aside)."""
    problems = []
    saved = [m for m in config.get("modules_to_save") or [] if m not in ("classifier", "score")]
    if saved:
        problems.append(
            f"modules_to_save {saved}: vLLM loads no fully trained module beside the LoRA factors; merge the "
            "adapter (train.merge_adapter: true) and serve the merged model"
        )
    if config.get("use_dora"):
        problems.append("DoRA: vLLM does not load DoRA adapters; merge it and serve the merged model")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("trained biases (bias / lora_bias): vLLM refuses them; train without, or merge")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in SUPPORTED_INITS:
        problems.append(f"init_lora_weights={init!r} changes the base weights: vLLM refuses it; merge instead")
    for key, what in (
        ("alora_invocation_tokens", "aLoRA"),
        ("layer_replication", "layer_replication"),
        ("use_bdlora", "BD-LoRA"),
        ("use_qalora", "QALoRA"),
    ):
        if config.get(key):
            problems.append(f"{what}: vLLM does not support it; merge the adapter instead")
    return problems


def check_adapter(adapter_dir: Path, supported: frozenset[str] = LLAMA_LORA_MODULES) -> AdapterCheck:
    """The adapter in `adapter_dir` (a PEFT folder) against vLLM's rules, for a base whose LoRA modules vLLM
    names `supported` (the Llama family's by default: the architecture sftops exports)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    names = tensor_names(adapter_dir)
    problems = check_config(config)
    rank = max([int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())])
    limit = max_lora_rank(rank)
    if limit is None:
        problems.append(f"rank {rank} is above {MAX_LORA_RANKS[-1]}, the largest --max-lora-rank vLLM takes")
    modules = sorted({m for m in map(lora_module, names) if m})
    unknown = [m for m in modules if m not in supported]
    if unknown:
        problems.append(
            f"LoRA on {unknown}: vLLM serves LoRA on the linear layers {sorted(supported)} only and refuses the "
            "adapter; train with target_modules among them, or merge"
        )
    full = [n for n in names if lora_module(n) is None]
    if full:
        shown = ", ".join(full[:3]) + (f" and {len(full) - 3} more" if len(full) > 3 else "")
        problems.append(
            f"full weights saved with the adapter ({shown}; a resized vocabulary or a fully trained module): "
            "vLLM skips them and would serve the base's; merge the adapter and serve the merged model"
        )
    return AdapterCheck(not problems, rank, limit, modules, problems)


def serve_line(base: str, revision: str | None, adapters: dict[str, str], rank: int) -> str:
    """`vllm serve` with each adapter under its name (champion=..., challenger=...), one server for all: a request
    picks one by its `model` field."""
    modules = " ".join(shlex.quote(f"{name}={path}") for name, path in adapters.items())
    pinned = f" --revision {shlex.quote(revision)}" if revision else ""
    return (
        f"vllm serve {shlex.quote(base)}{pinned} --enable-lora --lora-modules {modules} "
        f"--max-lora-rank {rank} --max-loras {len(adapters)}"
    )


def vllm_base(base: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """The base as `vllm serve` takes it (a hub id and its revision, or a transformers folder) from a model
    manifest's `base`, and why vLLM would not serve the weights trained on, if so."""
    from sftops.modeling import resolve_base

    if base.get("gguf_file"):  # named as configured: not a line to run, and no path of this machine in it
        return (
            f"{base['base']}/{base['gguf_file']}",
            None,
            (
                f"the base is the GGUF file {base['gguf_file']}: vLLM would run it quantised, not the float32 weights "
                "the adapter was trained and evaluated on; serve the merged model (or the GGUF export) instead"
            ),
        )
    return resolve_base(base["base"]), base.get("revision"), None


def check_model(model_dir: Path, name: str) -> dict[str, Any]:
    """The vLLM block of an sftops model folder: the adapter check with its base, and the `vllm serve` line that
    serves it as `name`; a folder of full (or merged) weights is served as it is."""
    from sftops.modeling import is_adapter, read_manifest

    info = read_manifest(model_dir)
    base, revision, base_problem = vllm_base(info["base"])
    if not is_adapter(info):
        return {"adapter": False, "loads": True, "serve": f"vllm serve {shlex.quote(str(model_dir))}"}
    check = check_adapter(model_dir)
    if base_problem:
        check.problems.append(base_problem)
        check.loads = False
    line = serve_line(base, revision, {name: str(model_dir)}, check.max_lora_rank or MAX_LORA_RANKS[-1])
    return {"adapter": True, **check.as_dict(), "base": base, "revision": revision, "serve": line}


def summary(block: dict[str, Any]) -> str:
    """One line for the version's tag and description."""
    if not block["adapter"]:
        return "full weights: `vllm serve` the merged model folder (no adapter to check)"
    if block["loads"]:
        return f"the adapter loads (rank {block['rank']}, --max-lora-rank {block['max_lora_rank']}): {block['serve']}"
    return f"not servable as an adapter as trained: {'; '.join(block['problems'])}"


def side_by_side(blocks: dict[str, dict[str, Any]], folders: dict[str, Path]) -> str | None:
    """One `vllm serve` for every named adapter (champion=..., challenger=...) when each passes vLLM's rules on
    the same base; None otherwise (each block's own line, or the reason, says what to serve instead)."""
    if not all(b["adapter"] and b["loads"] for b in blocks.values()):
        return None
    bases = {(b["base"], b.get("revision")) for b in blocks.values()}
    if len(bases) != 1:
        return None
    (base, revision), rank = bases.pop(), max(b["max_lora_rank"] for b in blocks.values())
    return serve_line(base, revision, {name: str(folders[name]) for name in blocks}, rank)
