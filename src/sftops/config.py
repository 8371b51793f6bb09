"""The one typed configuration, loaded from params.yaml, shared by the CLI, DVC stages and Prefect flows."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sftops.errors import ConfigError
from sftops.redact import redact


# The default of data.max_row_bytes (also the readers' default in sftops.sources).
MAX_ROW_BYTES = 4_000_000


class _Strict(BaseModel):
    # Unknown keys are errors: a typo must never silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(_Strict):
    """One raw data source: a local file/folder/glob, a folder inside an installed package, or a hub dataset."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True, serialize_by_alias=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    path: str | None = None
    package: str | None = None
    hub: str | None = None
    hub_config: str | None = None
    # A hub dataset's branch, tag or commit (null: the default branch). Either way ingest records the commit it read.
    revision: str | None = None
    split: str = "train"
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "yaml"] = "auto"
    # How rows map to conversations: detected per row, or declared (see sftops.data.schemas.SCHEMAS).
    row_schema: Literal[
        "auto", "messages", "openai", "sharegpt", "alpaca", "dolly", "prompt_completion", "prompt_response",
        "question_answer", "conversation",
    ] = Field("auto", alias="schema")
    # Schema key -> where it is in the row: a dotted path with list indices, e.g. {output: "instances[0].output"}.
    fields: dict[str, str] = {}
    # "val"/"test"/"train": every row of this source goes to that split (a separate validation file);
    # "auto": the seeded hash of the prompt decides.
    split_as: Literal["auto", "train", "val", "test"] = "auto"
    # Mixing: the source's train rows are repeated weight times (fractions: a seeded sample), and
    # max_rows caps its curated rows (a seeded sample, stable when rows are added).
    weight: float = Field(1.0, gt=0)
    max_rows: int | None = Field(None, ge=1)
    # Row fields left out of the conversation on purpose (e.g. [id, category]): not reported as unused.
    # A multimodal field named here (images) is dropped, and "<image>" lets placeholders through as text.
    ignore: list[str] = []

    @model_validator(mode="after")
    def _one_location(self) -> SourceConfig:
        if self.hub is not None:
            if self.path is not None or self.package is not None:
                raise ValueError("a hub source takes no 'path' or 'package'")
        elif self.revision is not None:
            raise ValueError("'revision' applies to a hub dataset ('hub'); a file source has none (its files are hashed)")
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
                    raise ValueError(f"{path!r} leads out of {what} through '..'; "
                                     f"write it as an absolute path if that file is really meant")
                parts.pop()
            elif part != ".":
                parts.append(part)
    return path


class DataConfig(_Strict):
    sources: list[SourceConfig] = Field(min_length=1)
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    split_seed: int = 0
    # Rows longer than model.max_length tokens: drop them, cut the oldest prompt turns / the start of the
    # prompt (truncate_prompt, keeping the response whole where it fits), or stop the stage (error).
    overflow: Literal["drop", "truncate_prompt", "error"] = "drop"
    # Near-duplicates: estimated Jaccard similarity of word 3-gram sets (MinHash) at or above this; null: off.
    near_duplicate_threshold: float | None = Field(0.85, gt=0.0, le=1.0)
    # Contamination report: test prompts sharing at least this fraction of their word n-grams with train prompts.
    contamination_ngram: int = Field(8, ge=1)
    contamination_threshold: float = Field(0.5, gt=0.0, le=1.0)
    # Rows whose loss mask and prompt rendering are re-derived independently on every format run.
    self_check_rows: int = Field(64, ge=1)
    # A raw row (a JSONL line, a CSV row) larger than this many bytes is rejected at ingest.
    max_row_bytes: int = Field(MAX_ROW_BYTES, ge=1024)
    # The format stage stops when fewer test rows are kept (evaluation needs them); 0: prepare data without one.
    min_test_rows: int = Field(1, ge=0)
    # A source none of whose rows is kept stops ingest/format, naming its top reasons; false: counted and go on.
    stop_on_empty_source: bool = True
    # The format stage maps and tokenises rows in chunks of this many, in this many worker processes (1: in
    # the stage's own process); any values give the same curated data, bytes for bytes.
    chunk_rows: int = Field(5000, ge=1)
    workers: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be below 1 (the rest is the train split)")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        return self


class ModelConfig(_Strict):
    # A hub id, a local folder, or 'pkg:<python package>' for a model shipped inside an installed package.
    base: str
    # Hub id: a branch, tag or commit (null: the default branch); the commit it names when the run starts is what
    # is loaded and recorded (manifest, MLflow, the model's base). pkg: the package version it must be (null: the
    # installed one, recorded). A local folder: null.
    revision: str | None = None
    gguf_file: str | None = None
    max_length: int = Field(1024, ge=8)
    # sdpa (default) and eager build block-diagonal masks for packed rows (memory grows with the square of
    # the packed length); flex_attention (torch's FlexAttention, compiled) masks packed documents by block,
    # without that matrix; flash_attention_2 needs the flash-attn package and a CUDA GPU.
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2"] = "sdpa"
    # Run Python code shipped with a hub model (its own modelling files)? Only when set here, never by default.
    trust_remote_code: bool = False
    # Load pickle-based weights (pytorch_model.bin, *.pt)? Unpickling can run arbitrary code: by default only
    # safetensors (and GGUF, which is parsed) are loaded.
    allow_pickle: bool = False

    @model_validator(mode="after")
    def _gguf_name(self) -> ModelConfig:
        if self.gguf_file is not None:
            stays_inside(self.gguf_file, "model.base")
        return self


class LoraConfig(_Strict):
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # "all-linear" or an explicit list of module names.
    target_modules: Literal["all-linear"] | list[str] = "all-linear"


class TrainConfig(_Strict):
    # lora, dora (LoRA with weight decomposition), qlora (LoRA on a 4-bit base; CUDA + bitsandbytes) or full.
    method: Literal["lora", "dora", "qlora", "full"] = "lora"
    lora: LoraConfig = LoraConfig()
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 42
    # Batch rows of similar length together (less padding, same objective).
    group_by_length: bool = True
    # Padding-free: each micro-batch is one row of concatenated conversations (checked at start-up).
    packing: bool = False
    gradient_checkpointing: bool = False
    # The trained weights' dtype: float32 master weights under bf16 autocast (default), or pure bfloat16
    # weights (full fine-tuning: half the memory of weights, gradients and AdamW moments, but rounded updates).
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compile: bool = False
    max_train_rows: int | None = Field(None, ge=1)
    # Checkpoint every N optimizer steps (null: never); a re-run with the same config resumes from the last.
    checkpoint_every: int | None = Field(None, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    # Validation NLL every N steps (null: only before and after training); the best weights are exported.
    eval_every: int | None = Field(None, ge=1)
    early_stopping_patience: int | None = Field(None, ge=1)
    # Processes on this node (GPUs, or CPU processes with gloo); above 1 the train stage launches torchrun.
    num_processes: int = Field(1, ge=1)
    # ddp: a full replica per process; fsdp: parameters, gradients and optimizer state sharded across processes
    # (for models that do not fit one GPU).
    distributed: Literal["ddp", "fsdp"] = "ddp"
    # Export a LoRA/DoRA model merged into its base (full weights), after checking its held-out NLL.
    merge_adapter: bool = False
    merge_tolerance: float = Field(1e-3, gt=0)

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

    # A seeded sample of the suite's rows (evaluation time); null: all of them.
    max_rows: int | None = Field(None, ge=1)
    # Prompts answered by both models (null: evaluate.num_generations); a seeded sample.
    num_generations: int | None = Field(None, ge=0)
    # The metric that decides a regression (null: evaluate.primary_metric), and its margin (null:
    # evaluate.regression_margin).
    primary_metric: Metric | None = None
    regression_margin: float | None = Field(None, ge=0)
    # Reported, never blocking promotion.
    informational: bool = False

    @model_validator(mode="after")
    def _not_training_data(self) -> SuiteConfig:
        if self.split_as != "auto" or self.weight != 1.0:
            raise ValueError("a suite is never trained on: it takes no 'split_as' or 'weight'")
        return self


class EvaluateConfig(_Strict):
    # Rows per forward pass when scoring and prompts per generate() call: lower it if evaluation runs out of memory.
    batch_size: int = Field(16, ge=1)
    num_generations: int = Field(16, ge=0)
    max_new_tokens: int = Field(64, ge=1)
    # Decoding: greedy unless do_sample; temperature/top_p apply only when sampling (seeded by sample_seed).
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    sample_seed: int = 0
    # How a generated answer and a reference are compared for exact match: 'normalized' text, 'gsm8k' (the
    # number after '####'), or 'last_number' (the last number in the text).
    answer_extraction: Literal["normalized", "gsm8k", "last_number"] = "normalized"
    # Paired bootstrap of the base - tuned NLL difference over test rows.
    bootstrap_resamples: int = Field(1000, ge=10)
    bootstrap_seed: int = 0
    confidence: float = Field(0.95, gt=0.5, lt=1)
    # Promotion gate: the new version becomes the 'champion' only if this test metric beats the champion's on
    # the same test set by promotion_margin (nll and perplexity: lower is better; the others: higher).
    primary_metric: Metric = "nll"
    promotion_margin: float = Field(0.0, ge=0)
    # Regression suites (see SuiteConfig): promotion also needs that no suite regresses, i.e. that the whole
    # confidence interval of (tuned - base) on the suite's primary metric lies on the worse side of
    # regression_margin (in the metric's units: nats/token for nll).
    suites: list[SuiteConfig] = []
    regression_margin: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _suite_names(self) -> EvaluateConfig:
        names = [s.name for s in self.suites]
        if len(set(names)) != len(names):
            raise ValueError(f"suite names must be unique, got {names}")
        return self


class TrackingConfig(_Strict):
    # Where the tracking server is, is not config: MLFLOW_TRACKING_URI (default sqlite:///mlflow.db).
    experiment: str = "sftops"
    registered_model_name: str = "sftops-model"


class PathsConfig(_Strict):
    raw: str = "data/raw"
    curated: str = "data/curated"
    model: str = "models"
    checkpoints: str = "checkpoints"
    reports: str = "reports"
    metrics: str = "metrics.json"

    @model_validator(mode="after")
    def _inside_project(self) -> PathsConfig:
        for value in self.model_dump().values():
            stays_inside(value, "the project folder")
        return self


class LaunchConfig(_Strict):
    # Where the train stage runs: local (this node; torchrun --standalone when train.num_processes > 1), slurm
    # (an sbatch script, submitted and waited for), kubernetes (a Kubeflow PyTorchJob, applied and waited for)
    # or loopback (launch.nodes torchrun agents on this machine: the stand-in the tests use).
    target: Literal["local", "slurm", "kubernetes", "loopback"] = "local"
    name: str = Field("sftops-train", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # the job's name (and rendezvous id)
    nodes: int = Field(1, ge=1)  # train.num_processes processes run on each
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_node: int = Field(8, ge=1)
    image: str = "sftops:latest"  # kubernetes: the container image (the Dockerfile's)
    # kubernetes: the PersistentVolumeClaim holding the project folder, mounted at shared_folder on every pod.
    volume_claim: str = "sftops-shared"
    shared_folder: str = "/shared/sftops"
    rdzv_port: int = Field(29500, ge=1, le=65535)
    join_timeout_s: int = Field(600, ge=1)  # how long the nodes wait for each other at the rendezvous
    # slurm --time, in minutes: a "24:00:00" string would not survive `dvc exp run -S`, which rewrites params.yaml
    # unquoted, and YAML 1.1 then reads 24:00:00 as the integer 86400.
    time_limit_minutes: int = Field(1440, ge=1)
    wait_timeout_s: int = Field(86400, ge=1)  # kubernetes: how long `kubectl wait` waits for the job


class Config(_Strict):
    data: DataConfig
    model: ModelConfig
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    launch: LaunchConfig = LaunchConfig()
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
    node[parts[-1]] = yaml.safe_load(raw)


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


def _describe(err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration in {origin}:"]
    # unknown keys first: a misspelt key is the likeliest cause, and other errors often follow from it
    for e in sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden"):
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            near = _closest_key(e["loc"], Config)
            hint = f"did you mean {near!r}?" if near else "check the spelling."
            lines.append(f"  {loc}: unknown key: {hint} (params.yaml lists the allowed keys)")
        elif isinstance(e.get("input"), (dict, list)):  # a dump of the whole section would bury the message
            lines.append(f"  {loc}: {e['msg']}")
        else:
            lines.append(f"  {loc}: {e['msg']} (got {redact(repr(e.get('input')))[:200]})")
    return "\n".join(lines)


def load_config(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"params file {path} not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (data, model, train, ...)")
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_describe(err, str(path))) from None
    # the GPU a setting needs is checked by the stages that use it (train, evaluate), not here: preparing
    # data for a GPU run works on a laptop
    return cfg
