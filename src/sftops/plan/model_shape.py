"""A base model's shapes from its config alone, no weights: the config (a hub id's config.json, a local folder's, a
GGUF file's metadata, or a config.json named directly) built into a model on the meta device, whose modules are
counted. Seconds for a 70B model, nothing downloaded but config.json."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sftops.config import ModelConfig
from sftops.errors import ModelError
from sftops.modeling import resolve_base


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    params: int  # all of them, a tied embedding counted once
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    linears: tuple[tuple[str, int, int], ...]  # (name, in, out) of every linear layer but the LM head
    head: int  # the LM head's weights (hidden x vocab)
    block_params: int  # the largest transformer block's (FSDP gathers one whole block at a time)
    gguf: bool  # read from a GGUF file: loading holds the file's model and a plain copy at once

    @property
    def linear_params(self) -> int:
        return sum(n_in * n_out for _, n_in, n_out in self.linears)


def base_config(model: ModelConfig, config_json: Path | None = None) -> Any:
    """The transformers config of model.base (or of the config.json named), without its weights."""
    from transformers import AutoConfig

    try:
        if config_json is not None:
            return AutoConfig.from_pretrained(str(config_json))
        where = resolve_base(model.base)
        extra: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
        if model.gguf_file:
            extra["gguf_file"] = model.gguf_file
        if not Path(where).is_dir():
            extra["revision"] = model.revision
        return AutoConfig.from_pretrained(where, **extra)
    except (OSError, ValueError) as exc:
        what = config_json or model.base
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"the config of {what} could not be read ({first}); fix model.base or --config-json") from None


def shape_of(config: Any, gguf: bool = False, trust_remote_code: bool = False) -> ModelShape:
    """The model the config describes, built on the meta device (no memory, no weights) and counted; a model
    with its own code is built only with model.trust_remote_code, as loading it would be."""
    from transformers import AutoModelForCausalLM

    config = _without_quantization(config)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as exc:  # not a causal LM transformers knows, or code not trusted
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"no causal language model can be built from the config of model.base ({first})") from None
    head = model.get_output_embeddings()
    linears = tuple(
        (name, m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    )
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    block_params = max(
        (sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m).__name__ in blocks), default=0
    )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelShape(
        model_type=config.model_type,
        params=sum(p.numel() for p in model.parameters()),  # parameters() yields a tied weight once
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
        vocab=text.vocab_size,
        linears=linears,
        head=head.in_features * head.out_features if head is not None else 0,
        block_params=block_params,
        gguf=gguf,
    )


def _without_quantization(config: Any) -> Any:
    """A config as it trains here: a checkpoint's own quantization (GPTQ, AWQ) is not built on the meta device."""
    if getattr(config, "quantization_config", None) is None:
        return config
    config = config.__class__.from_dict(config.to_dict())
    del config.quantization_config
    return config


def model_shape(model: ModelConfig, config_json: Path | None = None) -> ModelShape:
    gguf = bool(model.gguf_file) and config_json is None
    return shape_of(base_config(model, config_json), gguf, model.trust_remote_code)
