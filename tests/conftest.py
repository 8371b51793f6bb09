"""Shared fixtures: a tiny Llama built from a config with a tokenizer trained here, and the real pre-trained
models and datasets in ../shared (tests that need those skip with a reason where it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The real processes (servers, temp repositories) live in realstack; tests also import these names from here.
from realstack import MlflowServer, free_port, sh, tool_env  # noqa: F401
from sftops.chat import target_spans
from sftops.encoded import IGNORE, Encoded

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
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def write_qa_project(tiny_model: Path, rows: int, name: str, **sections: dict) -> dict:
    """In the current folder: qa.jsonl (`rows` distinct arithmetic questions) and params.yaml training the tiny
    model on it (LoRA; `sections` update params sections, e.g. train={...}); returns the params."""
    import json

    import yaml

    Path("qa.jsonl").write_text(
        "".join(
            json.dumps({"prompt": f"what is {i} plus two?", "completion": f"{i} plus two is {i + 2}."}) + "\n"
            for i in range(rows)
        )
    )
    params = {
        "data": {"sources": [{"name": "qa", "path": "qa.jsonl"}], "test_fraction": 0.2, "val_fraction": 0.1},
        "model": {"base": str(tiny_model), "max_length": 64},
        "train": {"method": "lora"},
        "tracking": {"registered_model_name": name},
    }
    for section, values in sections.items():
        params[section] = {**params.get(section, {}), **values}
    Path("params.yaml").write_text(yaml.safe_dump(params))
    return params


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


QA = [("what is two plus two?", "two plus two is four."), ("hello, how are you today?", "i am fine, thank you.")]


@pytest.fixture
def project(tmp_path, tiny_model, monkeypatch):
    """A folder with two sources ingested and formatted, and params.yaml; returns (folder, write_params)."""
    import json

    import yaml

    from sftops.config import load_config
    from sftops.stages.format import run_format
    from sftops.stages.ingest import run_ingest

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name, qa in (("maths", QA[:1]), ("chat", QA[1:])):
        rows = [{"prompt": f"{q} ({i})", "completion": a} for i in range(50) for q, a in qa]
        Path(f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    def write(train: dict) -> Path:
        params = {
            "data": {
                "sources": [{"name": "maths", "path": "maths.jsonl"}, {"name": "chat", "path": "chat.jsonl"}],
                "test_fraction": 0.2,
                "val_fraction": 0.1,
            },
            "model": {"base": str(tiny_model), "max_length": 64},
            "train": {"micro_batch_size": 4, "learning_rate": 0.01, **train},
            "tracking": {"registered_model_name": "tiny"},
        }
        Path("params.yaml").write_text(yaml.safe_dump(params))
        return Path("params.yaml")

    write({})
    cfg = load_config("params.yaml")
    run_ingest(cfg)
    run_format(cfg)
    return tmp_path, write


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
