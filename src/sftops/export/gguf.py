"""The fine-tuned model as a GGUF file for llama.cpp and Ollama, written with the `gguf` package from the merged
weights and the tokenizer training used (its byte-level BPE vocabulary and merges, its chat template, its EOS and
end-of-turn tokens), in the layout llama.cpp's own converter writes for the Llama architecture (its tensor names,
the query and key rows permuted for its rotary embedding), so that llama.cpp, Ollama and transformers
(`from_pretrained(folder, gguf_file=...)`) all read it.

Quantisations offered: F32 (the weights as evaluated), F16, Q8_0; a tensor whose rows are not a whole number of
quantisation blocks (32 values) stays F32, as llama.cpp's converter keeps it. What each costs in response NLL is
measured against the evaluated model by the export stage (export/verify.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

QUANTS = ("F32", "F16", "Q8_0")
ARCH = "llama"


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for the query and key projections (convert_hf_to_gguf.py LlamaModel.permute)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gguf_tensors(model: Any) -> list[tuple[str, np.ndarray]]:
    """The model's tensors under llama.cpp's names, float32, queries and keys permuted. An output matrix equal to
    the token embeddings (tied, as SmolLM2's) is left out, as llama.cpp's converter leaves it: llama.cpp, and
    transformers' GGUF reader, use the embeddings for both where the file has no `output.weight`."""
    import gguf
    import torch

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state = model.state_dict()
    head, embeddings = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    tied = head is not None and embeddings is not None and torch.equal(head, embeddings)
    out = []
    for name, tensor in state.items():
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue
        data = tensor.detach().to("cpu").float().numpy()
        if name.endswith("q_proj.weight"):
            data = _permute(data, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = _permute(data, config.num_key_value_heads)
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ValueError(f"no GGUF name for tensor {name}: only the Llama architecture is exported")
        out.append((mapped, data))
    return out


def _typed(data: np.ndarray, quant: str) -> tuple[np.ndarray, Any]:
    import gguf

    if quant == "F32" or data.ndim == 1:  # norms stay F32, as llama.cpp keeps them
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if quant == "F16":
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    qtype = gguf.GGMLQuantizationType[quant]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    return gguf.quants.quantize(data, qtype), qtype


def tokenizer_fields(tokenizer: Any) -> dict[str, Any]:
    """A byte-level BPE tokenizer (GPT-2 style, as SmolLM2's) in GGUF's terms: tokens by id, their types, merges."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or spec.get("decoder", {}).get("type") != "ByteLevel":
        raise ValueError("only byte-level BPE tokenizers (GPT-2 style) are exported to GGUF here")
    vocab = tokenizer.get_vocab()
    tokens = [""] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    special = set(tokenizer.all_special_ids)
    types = [3 if i in special else 1 for i in range(len(tokens))]  # CONTROL, NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return {"tokens": tokens, "types": types, "merges": merges}


def write_gguf(model: Any, tokenizer: Any, path: Path, quant: str, name: str) -> Path:
    """Write the merged `model` and its `tokenizer` (chat template, EOS, padding) as one GGUF file."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    fields = tokenizer_fields(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
    writer.add_bos_token_id(tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)  # the chat template writes BOS where it wants one
    writer.add_chat_template(tokenizer.chat_template)
    for tensor_name, data in gguf_tensors(model):
        typed, qtype = _typed(data, quant)
        writer.add_tensor(tensor_name, typed, raw_dtype=qtype)  # a quantised tensor's shape: from its bytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
