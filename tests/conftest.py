"""Shared fixtures: a tiny Llama built from a config with a tokenizer trained here, and the real pre-trained
models and datasets in ../shared (tests that need those skip with a reason where it is absent)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs several workers: one torch thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# DVC starts a usage-analytics daemon after each command (~0.3 s of CPU, and no network here to send it to)
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import pytest  # noqa: E402

# The real processes (servers, temp repositories) live in realstack; tests also import these names from here.
from realstack import MlflowServer, empty_mlflow_store, free_port, sh, tool_env  # noqa: F401
from sftops.chat import target_spans  # noqa: E402
from sftops.config import Config, load_config  # noqa: E402
from sftops.encoded import IGNORE, Encoded  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K" / "hf"
GSM8K = SHARED / "data" / "gsm8k"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    "the cat sat on the mat and the dog ran in the park",
    "what is two plus two? two plus two is four.",
    "hello, how are you today? i am fine, thank you.",
    "### User:\n### Assistant:\n### System:\n",
] * 20


# The tiny Llama every test model is built from (random weights): 2 layers, 4 heads, 2 KV heads.
TINY_LLAMA = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def build_tiny_model(path: Path, vocab_size: int = 300) -> Path:
    """A 2-layer Llama with random weights and a byte-level BPE tokenizer trained on CORPUS."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(
        **TINY_LLAMA,
        vocab_size=len(fast),
        max_position_embeddings=256,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


# The files of minutes (real servers, pipeline runs, several processes), longest first: `make test` hands whole
# files to its workers in collection order (pytest-xdist, --dist loadfile --no-loadscope-reorder), so these start
# at once and no worker is left alone with one at the end. Measured durations: docs/tests.md.
LONG_FIRST = (
    "test_operations.py",
    "test_registry_events.py",  # three servers, a worker, five flow runs (about 6 min on 2 busy cores)
    "test_faults.py",
    "test_serving.py",
    "test_pipeline_e2e.py",
    "test_record.py",
    "test_training_engine.py",
    "test_several_nodes.py",
    "test_suites_real.py",
    "test_sharded_checkpoints.py",
    "test_bench_dry_run.py",
    "test_operations_postgres.py",
    "test_serving_parity.py",
    "test_review_pages.py",
    "test_plan.py",  # real steps of five small models, measured (about 1.5 min on 2 cores)
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file stays


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The caches of tests that set none of their own (GGUF tokenizers, base-model results), in one folder of the
    session: shared by its tests and processes, never in the checkout. A value already set is kept."""
    os.environ.setdefault("SFTOPS_CACHE_DIR", str(tmp_path_factory.mktemp("sftops-cache")))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


# The tiny projects' data: numbered copies of short questions with their answers.
QA = [("what is two plus two?", "two plus two is four."), ("hello, how are you today?", "i am fine, thank you.")]


def qa_rows(copies: int, pairs: list[tuple[str, str]] = QA) -> list[dict]:
    """`copies` numbered copies of each (question, answer), as prompt/completion rows: "what is two plus two? (7)"."""
    return [{"prompt": f"{q} ({i})", "completion": a} for i in range(copies) for q, a in pairs]


def arithmetic_rows(n: int) -> list[dict]:
    """n distinct questions: "what is 7 plus two?" -> "7 plus two is 9."."""
    return [{"prompt": f"what is {i} plus two?", "completion": f"{i} plus two is {i + 2}."} for i in range(n)]


def write_jsonl(path: Path | str, rows: list[dict]) -> Path:
    import json

    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(path)


def write_project(base: Path | str, sources: list[dict], folder: Path | str = ".", **sections: dict) -> Config:
    """The one tiny-project builder: params.yaml in `folder` (what the CLI and DVC read) training the base model on
    `sources`, test and validation splits of 20% and 10%, rows of up to 64 tokens, registered as "tiny"; each of
    `sections` (train={...}, data={...}) updates its section. Returns the configuration as the stages load it."""
    import yaml

    params: dict = {
        "data": {"sources": sources, "test_fraction": 0.2, "val_fraction": 0.1},
        "model": {"base": str(base), "max_length": 64},
        "tracking": {"registered_model_name": "tiny"},
    }
    for section, values in sections.items():
        params[section] = {**params.get(section, {}), **values}
    (Path(folder) / "params.yaml").write_text(yaml.safe_dump(params))
    return load_config(Path(folder) / "params.yaml")


def data_config(
    folder: Path, sources: list[dict], base: Path | str = "unused", max_length: int = 128, **data
) -> Config:
    """A configuration for the data stages alone, writing data/raw and data/curated under `folder` (no params.yaml,
    no working folder): the data-layer tests' project."""
    return Config.model_validate(
        {
            "data": {"sources": sources, **data},
            "model": {"base": str(base), "max_length": max_length},
            "paths": {"raw": str(folder / "raw"), "curated": str(folder / "curated")},
        }
    )


def trained_qa(tiny_model: Path, **sections: dict):
    """The tiny model fine-tuned with LoRA (20 steps, a high rate) on 80 short Q/A rows until it answers them:
    (config, TrainResult). `sections` update the project's sections (evaluate={...}, export={...})."""
    from sftops.stages.train import run_train

    sources = [{"name": "qa", "path": str(write_jsonl("in.jsonl", qa_rows(40)))}]
    train = {"method": "lora", "max_steps": 20, "micro_batch_size": 8, "learning_rate": 0.05}
    cfg = formatted(write_project(tiny_model, sources, train=train, **sections))
    return cfg, run_train(cfg)


def formatted(cfg: Config) -> Config:
    """The project's data ingested and formatted (once: a later call finds the curated splits)."""
    from sftops.stages.format import run_format
    from sftops.stages.ingest import run_ingest

    if not (Path(cfg.paths.curated) / "test.parquet").exists():
        run_ingest(cfg)
        run_format(cfg)
    return cfg


@pytest.fixture
def project_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path as the working folder, with its own MLflow store and caches."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty_mlflow_store(tmp_path / "mlflow.db"))
    monkeypatch.setenv("SFTOPS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def sftops(
    *args: str,
    cwd: Path | str | None = None,
    env: dict[str, str] | None = None,
    fault: str | None = None,
    timeout: float = 900,
    wait: bool = True,
    limit_bytes: int | None = None,
) -> subprocess.CompletedProcess | subprocess.Popen:
    """The one runner: `sftops ARGS` in a process of its own, as a user runs it (this interpreter, the environment
    with `env` on top), output captured. fault: SFTOPS_FAULT for this run only; limit_bytes: a disk that fills up
    after that many bytes per file. wait=False returns the running process (to pause it, kill a server meanwhile)."""
    full = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "SFTOPS_FAULT"}
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), full.get("PYTHONPATH")]))  # this checkout's
    if fault:
        full["SFTOPS_FAULT"] = fault

    def limit() -> None:  # writes beyond limit_bytes fail with EFBIG, as on a full disk
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    command = [sys.executable, "-m", "sftops", *args]
    kwargs = {"cwd": cwd, "env": full, "text": True, "preexec_fn": limit if limit_bytes else None}
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
    return subprocess.run(command, capture_output=True, timeout=timeout, **kwargs)


def error_lines(stderr: str) -> list[str]:
    """The CLI's one-line error messages in a captured stderr (progress bars end their lines with \\r)."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("sftops:")]


@pytest.fixture
def mlflow_server_process(tmp_path: Path):
    server = MlflowServer(tmp_path / "server")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mlflow_server(mlflow_server_process: MlflowServer) -> str:
    """The URL of a real `mlflow server` on a free loopback port, with a SQLite store and served artifacts."""
    return mlflow_server_process.url


@pytest.fixture(scope="session")
def stories_model() -> Path:
    if not (STORIES / "model.safetensors").exists():
        pytest.skip(f"pre-trained test model not found at {STORIES} (../shared is absent)")
    return STORIES


@pytest.fixture(scope="session")
def gsm8k() -> Path:
    if not (GSM8K / "train.jsonl").exists():
        pytest.skip(f"GSM8K not found at {GSM8K} (../shared is absent)")
    return GSM8K


# The reliability suite's figures (`make reliability`): tests add what they tried and what held, e.g.
# figures["bad inputs tried"] += 1, after their assertions; the totals of the run are written to the JSON file
# named by $SFTOPS_RELIABILITY_JSON, from which tests/reliability.py prints its table.
class _Figures(dict):
    def __missing__(self, key: str) -> int:
        return 0


_FIGURES = _Figures()
_OUTCOMES: dict[str, str] = {}


@pytest.fixture(scope="session")
def figures() -> dict[str, int]:
    return _FIGURES


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or report.outcome != "passed":
        _OUTCOMES[report.nodeid] = "passed" if report.outcome == "passed" and report.when == "call" else report.outcome


def pytest_sessionfinish(session: pytest.Session) -> None:
    target = os.environ.get("SFTOPS_RELIABILITY_JSON")
    if target:
        import json

        Path(target).write_text(json.dumps({"figures": dict(_FIGURES), "tests": _OUTCOMES}, indent=2))


@pytest.fixture
def project(project_folder, tiny_model):
    """A folder with two sources (maths, chat) ingested and formatted, and params.yaml; returns (folder, write),
    write(train) rewriting params.yaml with those train params (micro-batches of 4, learning rate 0.01 unless set)."""
    sources = []
    for name, pair in (("maths", QA[:1]), ("chat", QA[1:])):
        write_jsonl(f"{name}.jsonl", qa_rows(50, pair))
        sources.append({"name": name, "path": f"{name}.jsonl"})

    def write(train: dict) -> Path:
        write_project(tiny_model, sources, train={"micro_batch_size": 4, "learning_rate": 0.01, **train})
        return Path("params.yaml")

    write({})
    formatted(load_config("params.yaml"))
    return project_folder, write


def reference_encode(tokenizer, messages: list[dict]) -> Encoded:
    """An independent encoding to check the production encoder against: the chat template through transformers'
    apply_chat_template (not sftops' compiled renderer), one tokenizer call per conversation, and a per-token
    test of whether each token starts inside a target turn's span (not the encoder's search for span edges)."""

    def render(prefix, generation):
        return tokenizer.apply_chat_template(prefix, tokenize=False, add_generation_prompt=generation)

    text, spans = target_spans(messages, render)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        t if any(lo <= start < hi for lo, hi in spans) else IGNORE
        for t, (start, _) in zip(enc["input_ids"], enc["offset_mapping"])
    ]
    return Encoded(list(enc["input_ids"]), labels)
