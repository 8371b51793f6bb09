"""The peak memory of one training process, estimated from the model's shapes and the train settings alone:
weights in their dtype, gradients and AdamW's two moments of what trains, and the activations a micro-batch of
micro_batch_size x max_length tokens keeps for the backward pass (every token a target: the most a micro-batch
can hold), with or without gradient checkpointing, for full, LoRA, DoRA or QLoRA, unsharded or FSDP-sharded.

The activation coefficients are counted from what autograd saves in transformers' Llama-style decoder layer (the
measured check, tests/test_plan.py, holds the estimate to its stated tolerance on real models)."""

from __future__ import annotations

from dataclasses import dataclass

from sftops.config import TrainConfig
from sftops.plan.model_shape import ModelShape

# bytes per weight of a 4-bit NF4 layer: half a byte, plus its block constants (double-quantised: an 8-bit scale per
# 64 weights and a float32 per 256 of those)
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


# LoRA with dropout keeps each adapter's dropped-out input (and its mask) for the backward pass, which then holds
# its gradient as well: 2.5 values per input value, measured on CPU (tests/test_plan.py)
LORA_INPUT = 2.5


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    trainable_params: int
    weights: int  # bytes, per process
    gradients: int
    optimizer: int  # AdamW's two moments
    activations: int  # one micro-batch's, at the start of the backward pass, with the backward's working set
    loading: int  # more than the weights while they load (a GGUF model and its plain copy)

    @property
    def training(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def peak(self) -> int:
        return max(self.training, self.weights + self.loading)

    def parts(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "loading": self.loading,
            "training": self.training,
            "peak": self.peak,
        }


def adapter_params(shape: ModelShape, train: TrainConfig) -> int:
    """LoRA's A and B (r x in, out x r) on each targeted linear layer, and DoRA's magnitude vector (out)."""
    r = train.lora.r
    dora = train.method == "dora"
    return sum(r * (n_in + n_out) + (n_out if dora else 0) for _, n_in, n_out in targeted(shape, train))


def targeted(shape: ModelShape, train: TrainConfig) -> list[tuple[str, int, int]]:
    """The linear layers peft puts an adapter on: all-linear (every one but the LM head) or those named."""
    wanted = train.lora.target_modules
    if wanted == "all-linear":
        return list(shape.linears)
    return [lin for lin in shape.linears if lin[0].rsplit(".", 1)[-1] in wanted or lin[0] in wanted]


def estimate_memory(
    shape: ModelShape,
    train: TrainConfig,
    max_length: int,
    *,
    bf16_compute: bool = False,
    attn_implementation: str = "sdpa",
) -> MemoryEstimate:
    """One process's peak (`train.num_processes` of them; `bf16_compute`: bf16 autocast, as on a GPU that has it)."""
    full = train.method == "full"
    weight_bytes = 2 if train.param_dtype == "bfloat16" else 4
    adapter = 0 if full else adapter_params(shape, train)
    trainable = shape.params if full else adapter
    if train.method == "qlora":  # the linear layers in NF4; the rest upcast to float32 for training (peft)
        weights = shape.linear_params * NF4_BYTES + (shape.params - shape.linear_params) * 4
    else:
        weights = shape.params * weight_bytes
    weights += adapter * 4  # an adapter stays float32
    grad_bytes = weight_bytes if full else 4
    gradients = trainable * grad_bytes
    optimizer = 2 * trainable * grad_bytes
    processes = train.num_processes
    if processes > 1 and train.distributed == "fsdp":
        # each process keeps its shard, and gathers one whole block at a time (and prefetches the next)
        weights = weights / processes + 2 * shape.block_params * weight_bytes
        gradients, optimizer = gradients / processes, optimizer / processes
    elif processes > 1:
        gradients *= 2  # DDP's gradient buckets are a second copy
    activations = activation_bytes(shape, train, max_length, bf16_compute, attn_implementation)
    loading = shape.params * 4 if shape.gguf else 0  # the GGUF model is copied into a plain one
    return MemoryEstimate(
        params=shape.params,
        trainable_params=trainable,
        weights=int(weights),
        gradients=int(gradients),
        optimizer=int(optimizer),
        activations=int(activations),
        loading=int(loading),
    )


def activation_bytes(
    shape: ModelShape, train: TrainConfig, max_length: int, bf16_compute: bool, attn_implementation: str
) -> float:
    """What a micro-batch keeps for its backward pass, per token: in each decoder layer the residual input, the
    two norms (input and normalised), q, k and v as the attention sees them (k and v repeated to every head),
    the attention output and its reshaped copy (about 10 x hidden), and the MLP's gate, up, activation and
    product (4 x intermediate); the attention mask (a row's length per layer, unless the kernel masks by block);
    LoRA's dropped-out input to each adapter (and its r outputs); outside the layers the embedding and final
    norm (3 x hidden) and the head's float32 log-probabilities, their gradient and the logits' gradient
    (3 x vocab, float32: the loss is taken in float32). Gradient checkpointing keeps only each layer's input
    and recomputes one layer at a time. The backward pass works on one more layer's worth."""
    h, i = shape.hidden, shape.intermediate
    value = 2 if bf16_compute else 4
    tokens = train.micro_batch_size * max_length
    layers = max(shape.layers, 1)
    row = tokens if train.packing else max_length
    mask = 0 if attn_implementation in ("flex_attention", "flash_attention_2") else row
    layer = 10 * h + 4 * i + mask
    if train.method != "full":
        adapted = targeted(shape, train)
        dropped = sum(LORA_INPUT * n_in for _, n_in, _ in adapted) if train.lora.dropout > 0 else 0
        layer += (dropped + train.lora.r * len(adapted)) / layers
    kept = layers * (h if train.gradient_checkpointing else layer)
    recomputed = 2 * layer if train.gradient_checkpointing else 0  # the layer recomputed, and its saved tensors
    backward = layer
    per_token = (kept + recomputed + backward + 3 * h) * value + 3 * shape.vocab * 4
    return per_token * tokens
