"""The one typed configuration, loaded from params.yaml, shared by the CLI, DVC stages and Prefect flows."""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from sftops.errors import ConfigError
from sftops.redact import redact

# The default of data.max_row_bytes (also the readers' default in sftops.data.sources).
MAX_ROW_BYTES = 4_000_000


class _Strict(BaseModel):
    # Unknown keys are errors: a typo must never silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(_Strict):
    """One raw data source: a local file/folder/glob, a folder inside an installed package, or a hub dataset."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True, serialize_by_alias=True)

    name: str = Field(
        pattern=r"^[A-Za-z0-9_.-]+$",
        description=(
            "The source's (or suite's) name, unique among them: reports name its rows by it, and a source's raw file "
            "is data/raw/<name>.jsonl."
        ),
    )
    path: str | None = Field(
        None,
        description=(
            "A file, folder or glob (JSONL, JSON, CSV, Parquet or YAML; .gz or .zst compressed too): relative to the "
            "project folder, or with package to that package's folder. Give path or hub."
        ),
    )
    package: str | None = Field(
        None,
        description=(
            "An installed Python package whose folder path is read from (e.g. chatterbot_corpus); "
            "null: the project folder."
        ),
    )
    hub: str | None = Field(
        None, description=("A Hugging Face dataset id (e.g. tatsu-lab/alpaca), read instead of path.")
    )
    hub_config: str | None = Field(
        None, description=("The hub dataset's configuration (subset) name; null: its default.")
    )
    revision: str | None = Field(
        None,
        description=(
            "A hub dataset's branch, tag or commit (null: the default branch). Either way ingest records the commit it "
            "read, and offline (HF_HUB_OFFLINE=1) reads that commit from the local Hugging Face cache."
        ),
    )
    split: str = Field("train", description="The hub dataset's split that is read (e.g. train).")
    format: Literal["auto", "jsonl", "json", "csv", "tsv", "parquet", "yaml"] = Field(
        "auto",
        description=(
            "The files' format; auto: told by each file's suffix (.jsonl, .csv, ..., optionally followed by "
            ".gz or .zst)."
        ),
    )
    row_schema: Literal[
        "auto",
        "messages",
        "openai",
        "sharegpt",
        "alpaca",
        "dolly",
        "prompt_completion",
        "prompt_response",
        "question_answer",
        "conversation",
    ] = Field(
        "auto",
        alias="schema",
        description=(
            "How rows map to conversations: auto (detected per row) or one declared schema "
            "(see sftops.data.schemas.SCHEMAS)."
        ),
    )
    fields: dict[str, str] = Field(
        {},
        description=(
            "Schema key -> where it is in the row: a dotted path with list indices, e.g. "
            '{output: "instances[0].output"}.'
        ),
    )
    split_as: Literal["auto", "train", "val", "test"] = Field(
        "auto",
        description=(
            "val, test or train: every row of this source goes to that split (e.g. a separate validation file); "
            "auto: the seeded hash of the prompt decides. A suite takes none."
        ),
    )
    weight: float = Field(
        1.0,
        gt=0,
        description=(
            "Mixing: the source's train rows are repeated this many times (e.g. 2; fractions such as 0.5: a seeded "
            "sample). A suite takes none."
        ),
    )
    max_rows: int | None = Field(
        None,
        ge=1,
        description=(
            "A cap on the source's curated rows (a seeded sample, stable when rows are added); null: all of them."
        ),
    )
    ignore: list[str] = Field(
        [],
        description=(
            "Row fields left out of the conversation on purpose (e.g. [id, category]); format reports any other field "
            "that reaches neither the conversation nor `fields` as unused. A multimodal field named here (images) is "
            'dropped, and "<image>" lets placeholders through as text.'
        ),
    )

    @model_validator(mode="after")
    def _one_location(self) -> SourceConfig:
        if self.hub is not None:
            if self.path is not None or self.package is not None:
                raise ValueError("a hub source takes no 'path' or 'package'")
        elif self.revision is not None:
            raise ValueError(
                "'revision' applies to a hub dataset ('hub'); a file source has none (its files are hashed)"
            )
        elif self.path is None:
            raise ValueError("give 'path' (a file, folder or glob; inside 'package' if set) or 'hub'")
        else:
            stays_inside(self.path, "the package's folder" if self.package else "the project folder")
        return self


def stays_inside(path: str, what: str) -> str:
    """A relative path may not climb out of its folder with '..'; an absolute path is the user's explicit choice."""
    if not Path(path).is_absolute() and ".." in Path(path).parts:
        parts: list[str] = []
        for part in Path(path).parts:
            if part == "..":
                if not parts:
                    raise ValueError(
                        f"{path!r} leads out of {what} through '..'; "
                        f"write it as an absolute path if that file is really meant"
                    )
                parts.pop()
            elif part != ".":
                parts.append(part)
    return path


class DataConfig(_Strict):
    sources: list[SourceConfig] = Field(min_length=1)
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="The fraction of rows in the validation split.")
    test_fraction: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description=(
            "The fraction of rows in the test split; val_fraction + test_fraction must be below 1 (the rest is train)."
        ),
    )
    split_seed: int = Field(
        0,
        description=(
            "The seed of the split, a seeded hash of the normalised prompt: a row keeps its split when rows are added."
        ),
    )
    overflow: Literal["drop", "truncate_prompt", "error"] = Field(
        "drop",
        description=(
            "Rows longer than model.max_length tokens: drop them, cut the prompt (truncate_prompt: the oldest "
            "exchanges, then the middle of the passage, never the instruction paragraph or the response; a row "
            "whose response cannot fit is dropped as too long), or stop the stage (error)."
        ),
    )
    near_duplicate_threshold: float | None = Field(
        0.85,
        gt=0.0,
        le=1.0,
        description=(
            "Rows whose word 3-gram sets have an estimated (MinHash) Jaccard similarity at or above this are "
            "near-duplicates; null: no near-duplicate check."
        ),
    )
    contamination_ngram: int = Field(
        8,
        ge=1,
        description=("The n of the word n-grams the contamination report compares (see contamination_threshold)."),
    )
    contamination_threshold: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description=(
            "The contamination report (stats.json, the data card) lists test prompts sharing at least this fraction of "
            "their word n-grams with train prompts."
        ),
    )
    self_check_rows: int = Field(
        64,
        ge=1,
        description=("Rows whose loss mask and prompt rendering are re-derived independently on every format run."),
    )
    max_row_bytes: int = Field(
        MAX_ROW_BYTES,
        ge=1024,
        description=(
            "A raw row (a JSONL line, a CSV record) larger than this many bytes is rejected at ingest, naming its file "
            "and row."
        ),
    )
    min_test_rows: int = Field(
        1,
        ge=0,
        description=(
            "The format stage stops when fewer test rows are kept (evaluation needs them); 0: prepare data without one."
        ),
    )
    stop_on_empty_source: bool = Field(
        True,
        description=(
            "A source none of whose rows is kept stops ingest/format, naming its top reasons and the fix; "
            "false: counted, and go on."
        ),
    )
    chunk_rows: int = Field(
        5000,
        ge=1,
        description=(
            "The format stage maps and tokenises rows in chunks of this many; any value gives the same curated data, "
            "byte for byte."
        ),
    )
    workers: int = Field(
        2,
        ge=1,
        description=(
            "Worker processes of the format stage (1: its own process); more: faster, more memory, "
            "the same curated data."
        ),
    )

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be below 1 (the rest is the train split)")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        return self


class ModelConfig(_Strict):
    base: str = Field(
        description=(
            "The base model: a hub id (e.g. HuggingFaceTB/SmolLM2-135M-Instruct), a local folder, or pkg:<package> for "
            "a model shipped inside an installed Python package."
        )
    )
    revision: str | None = Field(
        None,
        description=(
            "A hub id's branch, tag or commit (null: the default branch): the commit it names when train starts is "
            "loaded and recorded (run manifest, MLflow param model.revision_resolved and tag model.revision, the model "
            "folder's base, the base-eval cache key), so later runs and reloads use those exact weights. For pkg: the "
            "package version it must be (null: the installed one, recorded); a local folder: null (its files are "
            "hashed instead)."
        ),
    )
    gguf_file: str | None = Field(
        None,
        description=(
            "A GGUF file inside model.base to load the weights from; null: the model's own (safetensors) weights."
        ),
    )
    max_length: int = Field(
        1024,
        ge=8,
        description=(
            "Tokens per row (longer rows: see data.overflow); format tokenises with this model's tokenizer, and the "
            "data card says how many rows 256/512/1024/2048/4096/8192 would keep. Memory follows the tokens of a "
            "micro-batch (group_by_length pads only to a batch's longest row): measured on CPU on 2026-12-02 "
            "(SmolLM2-135M shape, LoRA-like backward), 8 rows x 256 tokens and 2 x 1024 both peak at 4.75 GiB RSS, so "
            "8 x 1024 needs about 4x the activations. Lower train.micro_batch_size (raising train.grad_accum_steps) if "
            "rows are long and memory short."
        ),
    )
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2"] = Field(
        "sdpa",
        description=(
            "sdpa and eager build block-diagonal masks for packed rows (memory grows with the square of the packed "
            "length); flex_attention (torch's FlexAttention, compiled; CUDA) masks packed documents by block, without "
            "that matrix; flash_attention_2 needs the flash-attn package and a CUDA GPU."
        ),
    )
    trust_remote_code: bool = Field(
        False,
        description=("Run Python code shipped with a hub model (its own modelling files): only for a base you trust."),
    )
    allow_pickle: bool = Field(
        False,
        description=(
            "Load pickle-based weights (pytorch_model.bin, *.pt), which can run arbitrary code; otherwise only "
            "safetensors (and GGUF, which is parsed) are loaded."
        ),
    )

    @model_validator(mode="after")
    def _gguf_name(self) -> ModelConfig:
        if self.gguf_file is not None:
            stays_inside(self.gguf_file, "model.base")
        return self


class LoraConfig(_Strict):
    r: int = Field(16, ge=1, description="The rank of each adapter's low-rank update.")
    alpha: float = Field(32, gt=0, description="The adapter's scaling: its update is multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapters' input while training.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description=(
            "The modules that get adapters: all-linear (the model's linear layers) or an explicit list of module names."
        ),
    )


class TrainConfig(_Strict):
    method: Literal["lora", "dora", "qlora", "full"] = Field(
        "lora",
        description=(
            "lora, dora (LoRA with weight decomposition), qlora (LoRA on a 4-bit base; CUDA GPU + bitsandbytes) or "
            "full (every weight is trained)."
        ),
    )
    lora: LoraConfig = LoraConfig()
    epochs: int = Field(1, ge=1, description="Passes over the train split (unless max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to train for; null: epochs decide.")
    micro_batch_size: int = Field(8, ge=1, description="Rows per forward and backward pass (in each process).")
    grad_accum_steps: int = Field(
        2, ge=1, description=("Micro-batches whose gradients are accumulated into one optimizer step.")
    )
    learning_rate: float = Field(
        3e-4, gt=0, description=("The peak learning rate, reached after warmup (a cosine schedule follows).")
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW's weight decay.")
    warmup_ratio: float = Field(
        0.05,
        ge=0,
        lt=1,
        description=("The fraction of the optimizer steps over which the learning rate warms up to learning_rate."),
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradients are clipped to this global norm.")
    seed: int = Field(42, description="The seed of training (row order, adapter initialisation, dropout).")
    group_by_length: bool = Field(
        True, description=("Batch rows of similar length together: less padding, same objective.")
    )
    packing: bool = Field(
        False,
        description=(
            "Padding-free: each micro-batch is one row of concatenated conversations (checked against padded at "
            "start-up)."
        ),
    )
    gradient_checkpointing: bool = Field(
        False, description=("Recompute activations in the backward pass: less memory, more time.")
    )
    param_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description=(
            "The trained weights' dtype: float32 master weights under bf16 autocast, or pure bfloat16 weights (full "
            "fine-tuning: half the memory of weights, gradients and AdamW moments, but rounded updates)."
        ),
    )
    compile: bool = Field(False, description="torch.compile the model.")
    max_train_rows: int | None = Field(
        None,
        ge=1,
        description=(
            "Train on a seeded sample of this many rows of the train split, to bound training time; null: all of them."
        ),
    )
    checkpoint_every: int | None = Field(
        20,
        ge=1,
        description=(
            "Checkpoint every N optimizer steps (null: never); a re-run of a killed job with the same config resumes "
            "from the last checkpoint."
        ),
    )
    keep_checkpoints: int = Field(2, ge=1, description="How many of the latest checkpoints are kept.")
    eval_every: int | None = Field(
        None,
        ge=1,
        description=(
            "Validate every N steps and at the last (null: only before and after training): the validation NLL, and "
            "each of evaluate.suites on a fixed sample (suite_rows, suite_generations) held to its budget. The "
            "exported weights are those of the validation with the lowest NLL among the ones within every blocking "
            "suite's budget; when none is, the last step's, and the run is refused promotion."
        ),
    )
    suite_rows: int = Field(
        32,
        ge=0,
        description=(
            "Rows of each suite (evaluate.suites) whose response NLL every validation scores: a seeded sample, the "
            "same at every step; 0: the suites are not scored during training."
        ),
    )
    suite_generations: int = Field(
        16,
        ge=0,
        description=(
            "Prompts of each suite that every validation answers (greedy, evaluate.max_new_tokens), held to the "
            "suite's behaviour budget (min_length_ratio, max_degenerate_rise) against the answers before the first "
            "step; 0: NLL only."
        ),
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description=("Stop after this many validations without improvement (needs eval_every); null: never."),
    )
    num_processes: int = Field(
        1,
        ge=1,
        description=(
            "Processes on each node (one per GPU, or CPU processes with gloo); "
            "above 1 the train stage launches torchrun."
        ),
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description=(
            "ddp: a full replica per process; fsdp: parameters, gradients and optimizer state sharded across the "
            "processes (for models that do not fit one GPU)."
        ),
    )
    merge_adapter: bool = Field(
        False,
        description=(
            "Export a LoRA/DoRA/QLoRA model merged into its base (full weights), after checking its held-out NLL."
        ),
    )
    merge_tolerance: float = Field(
        1e-3,
        gt=0,
        description=(
            "With merge_adapter: the largest relative difference of the merged model's held-out NLL from the adapter "
            "model's; above it the export fails."
        ),
    )

    @model_validator(mode="after")
    def _combinations(self) -> TrainConfig:
        if self.early_stopping_patience is not None and self.eval_every is None:
            raise ValueError("early_stopping_patience needs eval_every (validate every N steps)")
        if self.param_dtype == "bfloat16" and self.method == "qlora":
            raise ValueError("param_dtype bfloat16 does not apply to qlora (its base is 4-bit); use float32")
        if self.merge_adapter and self.method == "full":
            raise ValueError("merge_adapter applies to adapters (lora, dora, qlora), not method full")
        return self


Metric = Literal["nll", "perplexity", "exact_match", "rouge_l", "chrf"]


class SuiteConfig(SourceConfig):
    """A regression suite: a named evaluation set besides the test split (a file, folder, glob, package folder
    or hub dataset in any schema a source takes), never trained on, scored base against tuned."""

    max_rows: int | None = Field(
        None, ge=1, description=("A seeded sample of the suite's rows (evaluation time); null: all of them.")
    )
    num_generations: int | None = Field(
        None,
        ge=0,
        description=("Prompts of the suite answered by both models (a seeded sample); null: evaluate.num_generations."),
    )
    primary_metric: Metric | None = Field(
        None, description=("The metric that decides whether the suite regresses; null: evaluate.primary_metric.")
    )
    regression_margin: float | None = Field(
        None,
        ge=0,
        description=(
            "The suite's regression margin (see evaluate.regression_margin); null: evaluate.regression_margin."
        ),
    )
    min_length_ratio: float | None = Field(
        None,
        ge=0,
        description=(
            "The suite's floor on mean words tuned / base (see evaluate.min_length_ratio); null: "
            "evaluate.min_length_ratio; 0: never broken."
        ),
    )
    max_degenerate_rise: float | None = Field(
        None,
        ge=0,
        le=1,
        description=(
            "The suite's ceiling on the rise of degenerate answers (see evaluate.max_degenerate_rise); null: "
            "evaluate.max_degenerate_rise; 1: never broken."
        ),
    )
    informational: bool = Field(False, description="Reported, never blocking promotion.")
    reference: Literal["answers", "base"] = Field(
        "answers",
        description=(
            "answers: each row's own final assistant turn is its reference. base: a drift suite, whose rows are "
            "prompts only (a `prompt` field, or messages ending with a user turn): the reference of each prompt is "
            "the base model's own greedy answer (evaluate.max_new_tokens), so the suite measures how far fine-tuning "
            "moved the model from how its base answered, with no reference answers to write."
        ),
    )

    @model_validator(mode="after")
    def _not_training_data(self) -> SuiteConfig:
        if self.split_as != "auto" or self.weight != 1.0:
            raise ValueError("a suite is never trained on: it takes no 'split_as' or 'weight'")
        return self


class EvaluateConfig(_Strict):
    batch_size: int = Field(
        16,
        ge=1,
        description=(
            "Rows per scoring pass and prompts per generate() call: lower it if evaluation runs out of memory."
        ),
    )
    num_generations: int = Field(
        16, ge=0, description=("Distinct test prompts answered by the base and the tuned model (0: NLL only).")
    )
    max_new_tokens: int = Field(48, ge=1, description="The most tokens generated per answer.")
    parity_rows: int = Field(
        8,
        ge=0,
        description=(
            "Test rows (a seeded sample) on which the registered model, loaded as `mlflow models serve` loads it, in "
            "a fresh process, must answer as the evaluated model (greedy, the same text and stop) and score the "
            "same response NLL; a version that differs never becomes champion (0: not checked, and said so)."
        ),
    )
    parity_nll_tolerance: float = Field(
        1e-3,
        ge=0,
        description=(
            "The largest difference in response NLL (nats per token, on any parity row) between the served and the "
            "evaluated model that still counts as the same model (float32 both: differences are ~1e-6)."
        ),
    )
    do_sample: bool = Field(
        False, description=("Sample answers with temperature and top_p, seeded by sample_seed; false: greedy decoding.")
    )
    temperature: float = Field(1.0, gt=0, description="The sampling temperature (only with do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling's probability mass (only with do_sample).")
    sample_seed: int = Field(0, description="The seed of sampling (only with do_sample).")
    answer_extraction: Literal["normalized", "gsm8k", "last_number"] = Field(
        "normalized",
        description=(
            "How a generated answer and its reference are compared for exact match: normalized text, gsm8k (the number "
            "after '####'), or last_number (the last number in the text)."
        ),
    )
    bootstrap_resamples: int = Field(
        1000,
        ge=10,
        description=(
            "Resamples of the paired bootstraps, base against tuned: the NLL difference over rows; the text metrics' "
            "changes, length ratios, degenerate and stop rates over the sampled prompts."
        ),
    )
    bootstrap_seed: int = Field(0, description="The seed of the bootstrap.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="The confidence level of the bootstrap intervals.")
    primary_metric: Metric = Field(
        "nll",
        description=(
            "Promotion gate: the new model version gets the `champion` alias only if this test metric beats the "
            "current champion's (same test set and eval settings) by more than promotion_margin, the data checks "
            "passed, no suite regressed and no behaviour budget (min_length_ratio, max_degenerate_rise and their test_ "
            "twins) was broken; otherwise `challenger`. nll and perplexity: lower is better; the others: "
            "higher."
        ),
    )
    promotion_margin: float = Field(
        0.0, ge=0, description=("How much primary_metric must beat the champion's by, in the metric's units.")
    )
    suites: list[SuiteConfig] = []
    regression_margin: float = Field(
        0.0,
        ge=0,
        description=(
            "A suite regresses when the whole confidence interval of (tuned - base) on its primary metric lies on the "
            "worse side of this margin (metric units: nats/token for nll, 0-100 for chrf); a regression keeps the new "
            "version from becoming champion unless the suite is informational."
        ),
    )
    min_length_ratio: float | None = Field(
        0.5,
        ge=0,
        description=(
            "Behaviour budget of each suite (its own min_length_ratio overrides it): mean words of the tuned model's "
            "answers / those of the base model's to the same sampled prompts. The budget is broken when the whole "
            "confidence interval of the ratio lies below this floor (the tuned model answers far more briefly than "
            "its base did); a broken budget keeps the new version from becoming champion unless the suite is "
            "informational. null: not gated."
        ),
    )
    max_degenerate_rise: float | None = Field(
        0.1,
        ge=0,
        le=1,
        description=(
            "Behaviour budget of each suite (its own max_degenerate_rise overrides it): the rise (tuned - base) in "
            "the share of degenerate answers, i.e. near-empty (under 2 words, or nothing visible), looping (a word "
            "n-gram, n up to 4, 3 or more times in a row) or cut off by max_new_tokens. Broken when the whole "
            "confidence interval of the rise lies above this ceiling; it then blocks as min_length_ratio does. "
            "null: not gated."
        ),
    )
    test_min_length_ratio: float | None = Field(
        0.5,
        ge=0,
        description=(
            "The test split's behaviour budget: a floor on mean words of the tuned answers / those of the references "
            "(each cut to max_new_tokens tokens, the most an answer can hold). Against the references, not the base "
            "model: fine-tuning is meant to move test answers toward them. Broken when the whole confidence interval "
            "lies below it; a broken test budget keeps the new version from becoming champion. null: not gated."
        ),
    )
    test_max_degenerate_rise: float | None = Field(
        0.1,
        ge=0,
        le=1,
        description=(
            "The test split's ceiling on the rise (tuned - base) in the share of degenerate answers (see "
            "max_degenerate_rise); broken when the whole confidence interval lies above it. null: not gated."
        ),
    )

    @model_validator(mode="after")
    def _suite_names(self) -> EvaluateConfig:
        names = [s.name for s in self.suites]
        if len(set(names)) != len(names):
            raise ValueError(f"suite names must be unique, got {names}")
        return self


GgufQuant = Literal["F32", "F16", "Q8_0"]  # export/gguf.py QUANTS


class ExportConfig(_Strict):
    gguf: list[GgufQuant] = Field(
        ["F16"],
        description=(
            "The GGUF files the export stage writes for llama.cpp and Ollama (paths.exports/model-QUANT.gguf, with "
            "an Ollama Modelfile-QUANT each), from the merged weights and the training tokenizer: F32 (the weights "
            "as evaluated), F16 (half the size), Q8_0 (a quarter); each is read back and compared with the "
            "evaluated model (parity.json). []: none written (the vLLM adapter check still runs)."
        ),
    )
    rows: int = Field(
        8,
        ge=1,
        description=(
            "Test rows (a sample seeded by evaluate.sample_seed) each export answers greedily "
            "(evaluate.max_new_tokens) and scores, compared with the evaluated model: the same answers, stops and "
            "response NLL."
        ),
    )
    nll_tolerance: float = Field(
        0.05,
        ge=0,
        description=(
            "The largest response NLL difference (nats per token, on any row) between an export and the evaluated "
            "model for its parity to pass; with equal greedy answers and stops honoured. A failed parity is "
            "recorded and shown, the export is still written."
        ),
    )

    @field_validator("gguf")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"each quantisation once, got {value}")
        return value


class TrackingConfig(_Strict):
    experiment: str = Field(
        "sftops",
        description=(
            "The MLflow experiment runs are logged to. The tracking server is not config: MLFLOW_TRACKING_URI "
            "(default sqlite:///mlflow.db in the project folder)."
        ),
    )
    registered_model_name: str = Field(
        "sftops-model", description=("The MLflow registered model that each trained version is registered under.")
    )
    require_review: bool = Field(
        False,
        description=(
            "Whether a version becomes champion only once a reviewer approved it (its registry tag review=approved): "
            "true, a version that passes the automatic gate stays challenger, awaiting review, until approved "
            "(then `sftops review promote models:/NAME/VERSION`). Either way a version tagged review=rejected "
            "never becomes champion. Read by the promote step only (no stage)."
        ),
    )


class RecordConfig(_Strict):
    push_to: str | None = Field(
        None,
        description=(
            "The git remote (a name `git remote` lists, e.g. origin) that the pipeline flow's record step pushes each "
            "run's DVC experiment to: `dvc exp push` sends its git ref there and its outputs to the default DVC "
            "remote. null: nothing is pushed; the run is recorded in this repository and its DVC cache, and its "
            "registered version is tagged data.restorable=this-machine. Pushed to a git remote with a default DVC "
            "remote committed in .dvc/config, it is tagged data.restorable=anywhere; a shared tracking server "
            "(http(s) or a database store) makes only such versions champion. No stage reads this section."
        ),
    )


class PathsConfig(_Strict):
    raw: str = Field("data/raw", description="Where ingest writes the raw rows of each source.")
    curated: str = Field(
        "data/curated", description=("Where format writes the curated, tokenised splits and their stats.")
    )
    model: str = Field("models", description="Where train writes the fine-tuned model and its run record.")
    checkpoints: str = Field("checkpoints", description="Where train keeps its checkpoints.")
    reports: str = Field("reports", description="Where evaluate writes its reports.")
    metrics: str = Field("metrics.json", description="The metrics file evaluate writes.")
    exports: str = Field(
        "exports", description="Where export writes the GGUF files, Ollama Modelfiles and their parity checks."
    )

    @model_validator(mode="after")
    def _inside_project(self) -> PathsConfig:
        for value in self.model_dump().values():
            stays_inside(value, "the project folder")
        return self


class LaunchConfig(_Strict):
    target: Literal["local", "slurm", "kubernetes", "loopback"] = Field(
        "local",
        description=(
            "Where the train stage runs: local (this node; torchrun --standalone when train.num_processes > 1), slurm "
            "(an sbatch script, submitted and waited for), kubernetes (a Kubeflow PyTorchJob, applied and waited for) "
            "or loopback (launch.nodes torchrun agents on this machine). `sftops launch --write-only` writes "
            "launch/<name>.sbatch or .yaml and prints it. The project folder must be shared by every node."
        ),
    )
    name: str = Field(
        "sftops-train", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", description="The job's name and rendezvous id."
    )
    nodes: int = Field(1, ge=1, description="Nodes the train stage runs on; train.num_processes processes run on each.")
    gpus_per_node: int = Field(0, ge=0, description="GPUs the job asks for on each node (slurm, kubernetes).")
    cpus_per_node: int = Field(8, ge=1, description="CPUs the job asks for on each node (slurm, kubernetes).")
    image: str = Field("sftops:latest", description="kubernetes: the container image (the Dockerfile's).")
    volume_claim: str = Field(
        "sftops-shared",
        description=(
            "kubernetes: the PersistentVolumeClaim holding the project folder, mounted at shared_folder on every pod."
        ),
    )
    shared_folder: str = Field("/shared/sftops", description="kubernetes: where volume_claim is mounted on every pod.")
    rdzv_port: int = Field(
        29500, ge=1, le=65535, description=("The port of the torchrun rendezvous on the head node (node 0).")
    )
    join_timeout_s: int = Field(
        600, ge=1, description=("How long the nodes wait for each other at the rendezvous (seconds).")
    )
    # Minutes, not a "24:00:00" string: that would not survive `dvc exp run -S`, which rewrites params.yaml
    # unquoted, and YAML 1.1 then reads 24:00:00 as the integer 86400.
    time_limit_minutes: int = Field(1440, ge=1, description="slurm: the job's time limit (--time), in minutes.")
    wait_timeout_s: int = Field(
        86400, ge=1, description=("kubernetes: how long `kubectl wait` waits for the job (seconds).")
    )


class CostConfig(_Strict):
    per_device_hour: float | None = Field(
        None,
        ge=0,
        description=(
            "The price of one device-hour (a GPU per training process; on a CPU-only machine, the machine): with it, "
            "run.json, the MLflow run (cost/amount), the report and the registered version's description say what "
            "the run cost and what each 0.1 nats of test NLL improvement cost. null: device-hours only."
        ),
    )
    currency: str = Field("USD", description="The currency of per_device_hour, as the figures print it.")
    peak_tflops: float | None = Field(
        None,
        gt=0,
        description=(
            "The device's dense peak in TFLOP/s (bf16 tensor cores on a GPU) that model FLOPs utilisation (MFU) is "
            "measured against; null: looked up by the GPU's name in sftops.accelerator.DENSE_PEAK_TFLOPS (on a CPU, "
            "or a GPU not in the table, MFU is not computed)."
        ),
    )
    preflight: bool = Field(
        True,
        description=(
            "Before anything loads, the train stage estimates the run's peak memory from the model's config alone "
            "(`sftops plan` prints it) and stops in one line, with settings that would fit, when it exceeds "
            "usable_memory of the device; false: train anyway."
        ),
    )
    usable_memory: float = Field(
        0.9,
        gt=0,
        le=1,
        description=(
            "The fraction of the device's free memory (a GPU's, or on CPU the RAM available, within a cgroup limit) "
            "the estimated peak may take: the rest is kept for the allocator's fragmentation and what the estimate "
            "leaves out."
        ),
    )


class Config(_Strict):
    data: DataConfig
    model: ModelConfig
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()
    tracking: TrackingConfig = TrackingConfig()
    record: RecordConfig = RecordConfig()
    launch: LaunchConfig = LaunchConfig()
    cost: CostConfig = CostConfig()
    paths: PathsConfig = PathsConfig()

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, for logging as run parameters."""
        return _flatten(self.model_dump(mode="json"))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def isolate_outputs(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """A whole-pipeline run with overrides is an experiment: it writes under runs/<digest of the overrides>/,
    so the DVC-tracked outputs keep matching params.yaml (unless the overrides set paths.* themselves)."""
    if not overrides or any(o.split("=", 1)[0].strip().startswith("paths.") for o in overrides):
        return cfg
    digest = hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:10]
    paths = {key: str(Path("runs") / digest / value) for key, value in cfg.paths.model_dump().items()}
    return cfg.model_copy(update={"paths": PathsConfig(**paths)})


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one 'dotted.key=value' override; the value is parsed as YAML (so 1e-4, true, [a, b] work)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key=value, e.g. train.learning_rate=1e-4")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {assignment}: the value is not valid YAML ({_yaml_problem(exc)})") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What YAML found wrong, without its excerpt of the text (the caller names where)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    return f"{problem} ({context})" if context else problem


def _yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    """`params.yaml:LINE:COL: problem`, as compilers and editors point at a place in a file."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is None:
        return f"{path} is not valid YAML: {_yaml_problem(exc)}"
    return f"{path}:{mark.line + 1}:{mark.column + 1}: {_yaml_problem(exc)}"


def _override_of(loc: tuple, overrides: list[str] | tuple[str, ...]) -> str | None:
    """The --set assignment an error at `loc` comes from (its key is `loc` or a section above it), if any."""
    dotted = [str(p) for p in loc]
    for assignment in reversed(overrides):  # the last --set of a key is the one that holds
        key = assignment.split("=", 1)[0].strip().split(".")
        if dotted[: len(key)] == key:
            return assignment
    return None


def _closest_key(loc: tuple, model: type[BaseModel]) -> str | None:
    """The allowed key nearest to a misspelt one, found by walking the config classes along its location."""
    import difflib
    import typing

    node: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(node, "model_fields", {}).get(part)
        if field is None:
            return None
        node = field.annotation
        while typing.get_args(node) and not hasattr(node, "model_fields"):
            node = next((a for a in typing.get_args(node) if hasattr(a, "model_fields")), typing.get_args(node)[0])
    names = list(getattr(node, "model_fields", {}))
    names += [f.alias for f in getattr(node, "model_fields", {}).values() if f.alias]
    match = difflib.get_close_matches(str(loc[-1]), names, n=1)
    return match[0] if match else None


def leaf_fields(model: type[BaseModel] | None = None, prefix: str = "") -> dict[str, FieldInfo]:
    """Dotted key -> pydantic field, for every leaf of the config; in a list of sections: `data.sources[].weight`."""
    out: dict[str, FieldInfo] = {}
    for name, field in (model or Config).model_fields.items():
        key, node = prefix + (field.alias or name), field.annotation
        many = typing.get_origin(node) is list
        node = typing.get_args(node)[0] if many else node
        if isinstance(node, type) and issubclass(node, BaseModel):
            out.update(leaf_fields(node, key + ("[]." if many else ".")))
        else:
            out[key] = field
    return out


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    return str(annotation).replace("typing.", "") if origin else annotation.__name__


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "min_length": "at least", "pattern": "matching"}


def explain(key: str, cfg: Config | None, origin: str = "params.yaml") -> str:
    """What `sftops config --explain KEY` prints: for each leaf at or under KEY, its type and constraints, its code
    default, its value in cfg (per list item for `data.sources[].x`) and its description."""
    plain = re.sub(r"\[\d*\]", "", key.strip()).strip(".")
    leaves = {
        k: f
        for k, f in leaf_fields().items()
        if k.replace("[]", "") == plain or k.replace("[]", "").startswith(plain + ".")
    }
    if not leaves:
        parts = plain.split(".")
        near = _closest_key(tuple(parts), Config)
        hint = (
            f"did you mean {'.'.join(parts[:-1] + [near])!r}?"
            if near
            else "check the spelling (`--explain train` lists a section)"
        )
        raise ConfigError(f"unknown config key {key!r}: {hint}")
    flat = cfg.flat() if cfg else {}
    blocks = []
    for name, field in leaves.items():
        kind = [_type_name(field.annotation)]
        kind += [
            f"{sym} {getattr(m, attr)}"
            for m in field.metadata
            for attr, sym in _BOUNDS.items()
            if getattr(m, attr, None) is not None
        ]
        default = "(required)" if field.is_required() else json.dumps(field.get_default(call_default_factory=True))
        section, _, leaf = name.partition("[].")
        if cfg is None:
            value = "-"
        elif leaf:  # one value per list item: per source, per suite
            value = ", ".join(f"{item['name']}: {json.dumps(item.get(leaf))}" for item in flat[section])
            value = value or "(none listed)"
        else:
            value = json.dumps(flat[name])
        blocks.append(
            f"{name}\n  type:     {', '.join(kind)}\n  default:  {default}\n"
            f"  value:    {value}   ({origin})\n"
            + textwrap.fill(field.description or "", 100, initial_indent="  ", subsequent_indent="  ")
        )
    return "\n\n".join(blocks)


def _describe(err: ValidationError, origin: str, overrides: list[str] | tuple[str, ...] = ()) -> str:
    lines = [f"invalid configuration in {origin}" + (" with its --set overrides:" if overrides else ":")]
    # unknown keys first: a misspelt key is the likeliest cause, and other errors often follow from it
    for e in sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden"):
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        assignment = _override_of(e["loc"], overrides)
        # not a line of the file: say which override set it (its key; a value may be a whole section)
        came = f" [from --set {assignment.split('=', 1)[0].strip()}, not params.yaml]" if assignment else ""
        if e["type"] == "extra_forbidden":
            near = _closest_key(e["loc"], Config)
            hint = f"did you mean {near!r}?" if near else "check the spelling."
            lines.append(f"  {loc}: unknown key: {hint} (params.yaml lists the allowed keys){came}")
        elif isinstance(e.get("input"), (dict, list)):  # a dump of the whole section would bury the message
            lines.append(f"  {loc}: {e['msg']}{came}")
        else:
            lines.append(f"  {loc}: {e['msg']} (got {redact(repr(e.get('input')))[:200]}){came}")
    return "\n".join(lines)


def load_config(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"params file {path} not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error(path, exc)) from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (data, model, train, ...)")
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_describe(err, str(path), overrides)) from None
    # the GPU a setting needs is checked by the stages that use it (train, evaluate), not here: preparing
    # data for a GPU run works on a laptop
    return cfg
