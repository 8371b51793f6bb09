"""Load base models and tokenizers (hub id, local folder, or GGUF file, also inside an installed package),
and save/load fine-tuned models (LoRA adapter or full weights) as safetensors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from sftops import hub
from sftops.config import ModelConfig
from sftops.errors import ModelError
from sftops.machine import package_dir
from sftops.workspace import cache_root

if TYPE_CHECKING:  # torch, the model classes and AutoTokenizer (which imports torch) cost seconds to import: the
    # data stages, which need only a tokenizer, skip them where they can
    from transformers import PreTrainedModel

MANIFEST = "sftops_model.json"

# Used only when the tokenizer has no chat template of its own. Saved with the tokenizer, so training,
# evaluation and serving all render conversations the same way.
FALLBACK_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '### Assistant:\n' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


def resolve_base(base: str) -> str:
    """'pkg:<package>' -> that package's folder; anything else (a hub id or a local folder) as given."""
    if base.startswith("pkg:"):
        return str(package_dir(base[4:]))
    return base


def check_base(cfg: ModelConfig) -> str | None:
    """model.base and model.gguf_file name something loadable here, or one line says which setting and the fix:
    a local folder that exists (holding gguf_file, if set), or a hub id whose model.revision is in the local cache
    or on the reachable hub. Returns what fixes the weights besides the path: the hub commit model.revision
    resolves to now, the package's version for pkg:, None for a local folder."""
    where = resolve_base(cfg.base)
    folder = Path(where)
    if folder.is_dir():
        _gguf_in_folder(cfg, folder)
        return _package_version(cfg) if cfg.base.startswith("pkg:") else _no_revision(cfg)
    if folder.is_absolute() or cfg.base.startswith((".", "~")) or cfg.base.count("/") > 1:
        raise ModelError(
            f"model.base {cfg.base!r} is not a folder here, nor a hub id (owner/name); fix model.base in params.yaml"
        )
    commit = hub.resolve(cfg.base, cfg.revision, "model", f"model.base {cfg.base!r}", "model.revision", ModelError)
    snapshot = hub.cached_snapshot(cfg.base, commit, "model")
    wanted = cfg.gguf_file or "config.json"
    if snapshot is not None and (snapshot / wanted).is_file():
        return commit
    if hub.offline() or not hub.reachable():
        if snapshot is not None:
            raise ModelError(
                f"model.base {cfg.base!r} at commit {commit} has no {wanted} in the local Hugging Face cache and "
                "the hub is not at hand; download it once with network, or fix model.gguf_file"
            )
    elif cfg.gguf_file and not _on_hub(cfg.base, cfg.gguf_file, commit):
        raise ModelError(
            f"model.gguf_file {cfg.gguf_file!r} is not in model.base {cfg.base!r} at commit {commit} (left over "
            "from another base?); set model.gguf_file to a GGUF file of that repository, or to null for its "
            "safetensors"
        )
    return commit


def _gguf_in_folder(cfg: ModelConfig, folder: Path) -> None:
    """A model.gguf_file left over from another base is named with both settings, before anything reads it."""
    if cfg.gguf_file and not (folder / cfg.gguf_file).is_file():
        found = sorted(p.name for p in folder.glob("*.gguf"))
        raise ModelError(
            f"model.gguf_file {cfg.gguf_file!r} is not in model.base {cfg.base!r} (GGUF files there: "
            f"{found or 'none'}); set model.gguf_file to one of them, or to null for the folder's safetensors"
        )


def _on_hub(repo: str, filename: str, commit: str) -> bool:
    """Whether the hub has the file at that commit; True when it cannot say (the download then says why)."""
    from huggingface_hub import HfApi

    try:
        return HfApi().file_exists(repo, filename, revision=commit)
    except Exception:  # noqa: BLE001 - the hub gone or refusing between two calls: not this check's business
        return True


def pinned(cfg: ModelConfig) -> ModelConfig:
    """The model config with model.revision replaced by what check_base resolves it to (a hub commit, a package
    version): loading from it loads exactly what the run records, however the hub's branches move meanwhile."""
    return cfg.model_copy(update={"revision": check_base(cfg)})


def _no_revision(cfg: ModelConfig) -> None:
    if cfg.revision is not None:
        raise ModelError(
            f"model.revision {cfg.revision!r} applies to a hub id, but model.base {cfg.base!r} is a local "
            "folder (its files are hashed instead); set model.revision to null"
        )
    return None


def _package_version(cfg: ModelConfig) -> str | None:
    """The installed version of the distribution holding pkg:<package>; model.revision, when set, must be it."""
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    package = cfg.base[len("pkg:") :]
    dist = (packages_distributions().get(package) or [package])[0]
    try:
        installed = version(dist)
    except PackageNotFoundError:
        installed = None
    if cfg.revision is not None and cfg.revision != installed:
        raise ModelError(
            f"model.revision {cfg.revision!r} is the version of {dist} that model.base {cfg.base!r} must come "
            f"from, but {installed!r} is installed; pip install '{dist}=={cfg.revision}', or set "
            "model.revision to null (the installed version is recorded)"
        )
    return installed


def _hub_revision(cfg: ModelConfig) -> str | None:
    """The revision to pass to from_pretrained: the resolved commit for a hub id, nothing for a folder or package."""
    revision = check_base(cfg)
    return None if Path(resolve_base(cfg.base)).is_dir() else revision


def _refusing_unsafe_code(what: str, load: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a from_pretrained call; the refusals of code or pickles the user did not opt in to become ModelErrors
    naming the setting (transformers says it in its own words, with a traceback)."""
    try:
        return load(*args, **kwargs)
    except (ValueError, OSError) as exc:
        text = str(exc)
        if "trust_remote_code" in text:
            raise ModelError(
                f"{what} ships its own Python code, which sftops does not run unless you set "
                f"model.trust_remote_code: true (only for a model you trust)"
            ) from None
        if "safetensors" in text and not kwargs.get("gguf_file"):
            raise ModelError(
                f"{what} has no safetensors weights; pickle-based weights (.bin/.pt) can run code "
                f"when loaded and are refused unless you set model.allow_pickle: true"
            ) from None
        if isinstance(exc, OSError) and not Path(str(args[0])).is_dir():  # a hub id that does not resolve
            first = text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
            raise ModelError(
                f"model.base {what!r} could not be loaded from the hub ({first}); check the id, "
                "or log in (huggingface-cli login) for a gated model"
            ) from None
        raise


def tokenizer_cache() -> Path:
    """Where tokenizers read out of GGUF files are kept: in the project's cache (workspace.cache_root), with the
    base model's evaluations; nothing is written outside the project unless $SFTOPS_CACHE_DIR says so."""
    return cache_root() / "tokenizers"


def _gguf_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """A local GGUF file's tokenizer, read out of it once (seconds: the whole file's metadata is parsed) and then
    from a saved copy (a fraction of a second), keyed by the file's path, size and mtime and the transformers
    version. The copy is what every stage loads, the first one too, so all see the same tokenizer."""
    import transformers

    gguf = (Path(resolve_base(cfg.base)) / cfg.gguf_file).resolve()
    info = gguf.stat()
    key = hashlib.sha256(json.dumps([str(gguf), info.st_size, info.st_mtime_ns, transformers.__version__]).encode())
    folder = tokenizer_cache() / key.hexdigest()[:24]
    if not (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = _refusing_unsafe_code(cfg.base, AutoTokenizer.from_pretrained, str(gguf.parent), gguf_file=gguf.name)
        partial = folder.with_name(f".{folder.name}.{os.getpid()}")
        tok.save_pretrained(partial)
        try:
            partial.rename(folder)  # another process may have saved it meanwhile: either copy is the same
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)
    saved_class = json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    if saved_class in ("TokenizersBackend", "PreTrainedTokenizerFast"):  # what AutoTokenizer would build, without
        return PreTrainedTokenizerFast.from_pretrained(folder)  # importing torch (2-3 s of every data stage)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    if cfg.gguf_file and Path(resolve_base(cfg.base)).is_dir():
        _gguf_in_folder(cfg, Path(resolve_base(cfg.base)))
        tok = _gguf_tokenizer(cfg)
    else:
        from transformers import AutoTokenizer

        tok = _refusing_unsafe_code(
            cfg.base,
            AutoTokenizer.from_pretrained,
            resolve_base(cfg.base),
            gguf_file=cfg.gguf_file,
            revision=_hub_revision(cfg),
            trust_remote_code=cfg.trust_remote_code,
        )
    if not tok.chat_template:
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    if tok.eos_token is None:
        raise ModelError(f"tokenizer of {cfg.base!r} has no EOS token; the model could never learn to stop")
    if tok.pad_token is None:
        # Padding positions are masked out of the loss and attention, so any id will do.
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(cfg: ModelConfig, quantize_4bit: bool = False) -> PreTrainedModel:
    """The pre-trained model in float32 (the optimizer's master weights), or with 4-bit NF4 linear layers
    (bf16 compute) for QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    extra: dict[str, Any] = {"attn_implementation": cfg.attn_implementation, "revision": _hub_revision(cfg)}
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        extra["device_map"] = {"": torch.cuda.current_device()}
    if cfg.gguf_file:
        # A GGUF-loaded model is dequantised to float but still flagged as GGUF, and save_pretrained refuses it:
        # move its weights into a plain model of the same config (from there on it is an ordinary checkpoint).
        # GGUF is a data format: its tensors and metadata are parsed (gguf package), no code is run.
        gguf = _refusing_unsafe_code(
            cfg.base,
            AutoModelForCausalLM.from_pretrained,
            resolve_base(cfg.base),
            gguf_file=cfg.gguf_file,
            dtype=torch.float32,
            revision=extra["revision"],
            trust_remote_code=cfg.trust_remote_code,
        )
        config = gguf.config
        del config.quantization_config
        plain = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation=cfg.attn_implementation
        )
        plain.load_state_dict(gguf.state_dict())
        plain.generation_config = gguf.generation_config
        if not quantize_4bit:
            return plain
        raise ModelError("train.method=qlora on a GGUF base is not supported: point model.base at safetensors weights")
    return _refusing_unsafe_code(
        cfg.base,
        AutoModelForCausalLM.from_pretrained,
        resolve_base(cfg.base),
        dtype=torch.float32,
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=None if cfg.allow_pickle else True,
        **extra,
    )


def save_finetuned(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path, info: dict[str, Any]) -> None:
    """Adapter (LoRA) or full weights as safetensors, the tokenizer with its chat template, and a manifest
    that says how to rebuild the model (for an adapter: which base to load it onto)."""
    out.mkdir(parents=True, exist_ok=True)
    for adapter in getattr(model, "peft_config", {}).values():
        # peft keeps target_modules as a set and writes it in hash order, which changes from process to process:
        # sorted, the same training writes the same adapter_config.json (and DVC records the same model).
        if isinstance(adapter.target_modules, set):
            adapter.target_modules = sorted(adapter.target_modules)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / MANIFEST).write_text(json.dumps(info, indent=2) + "\n")


def read_manifest(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / MANIFEST
    if not path.exists():
        raise ModelError(f"{model_dir} is not an sftops model folder (no {MANIFEST})")
    return json.loads(path.read_text())


def is_adapter(info: dict[str, Any]) -> bool:
    """Whether a saved model is an adapter to load onto its base (else full weights, merged ones included)."""
    return info.get("weights", "full" if info["method"] == "full" else "adapter") == "adapter"


def load_finetuned(model_dir: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    info = read_manifest(model_dir)
    base_cfg = ModelConfig.model_validate(info["base"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    if not is_adapter(info):
        model = _refusing_unsafe_code(
            str(model_dir),
            AutoModelForCausalLM.from_pretrained,
            model_dir,
            dtype=torch.float32,
            trust_remote_code=False,
            use_safetensors=None if base_cfg.allow_pickle else True,
        )
    else:
        from peft import PeftModel

        if not (model_dir / "adapter_model.safetensors").exists() and not base_cfg.allow_pickle:
            raise ModelError(
                f"{model_dir} has no adapter_model.safetensors; pickle-based adapters are refused "
                f"unless model.allow_pickle: true"
            )
        base = load_base_model(base_cfg, quantize_4bit=info["method"] == "qlora")
        model = PeftModel.from_pretrained(base, model_dir)
    model.eval()
    return model, tokenizer
