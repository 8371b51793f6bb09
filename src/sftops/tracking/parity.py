"""Serving parity, MLflow's side: the registered version run as a server runs it (tracking/served_probe.py, in a
fresh process), its figures compared with the evaluated model's (evaluate/parity.py), and the result recorded on
the version as the tag `serving.parity`, which the gate reads back through metrics.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from sftops.chat import generation_prompt
from sftops.config import Config
from sftops.evaluate.generation import Decoding, complete
from sftops.evaluate.parity import Answer, compare, not_checked, not_served, parity_rows, summary
from sftops.evaluate.sides import EvalSet, Side
from sftops.tracking.served_chat import ROLES
from sftops.tracking.store import store_of

PARITY_TAG = "serving.parity"
PROBE_TIMEOUT_S = 1800  # loading a 135M model and answering 8 rows takes about a minute on 2 CPU cores


class ServeFailed(Exception):
    """The registered model did not load or answer as a server would run it."""


def served_answers(
    model_uri: str, store: str, rows: list[dict[str, Any]], max_new_tokens: int, max_length: int, overflow: str
) -> tuple[list[Answer], dict[str, Any]]:
    """The registered model's answers and response NLL on `rows`, loaded as `mlflow models serve` loads it, in a
    fresh process; with its load and answer times."""
    request = {
        "model_uri": model_uri,
        "rows": [{"messages": r["messages"], "tools": r.get("tools")} for r in rows],
        "max_new_tokens": max_new_tokens,
        "max_length": max_length,
        "overflow": overflow,
    }
    with tempfile.TemporaryDirectory(prefix="sftops-parity-") as tmp:
        request_file, result_file = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request_file.write_text(json.dumps(request))
        env = {**os.environ, "MLFLOW_TRACKING_URI": store}
        cmd = [sys.executable, "-m", "sftops.tracking.served_probe", str(request_file), str(result_file)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ServeFailed(f"{model_uri} did not load or answer as served: {last[:300]}")
        result = json.loads(result_file.read_text())
    answers = [Answer(a["text"], a["stopped"], a["nll"]) for a in result["answers"]]
    return answers, {"load_seconds": result["load_seconds"], "answer_seconds": result["answer_seconds"]}


def record_parity(run_info: dict[str, Any], block: dict[str, Any]) -> None:
    """The verdict and its figures as the version's (and its training run's) tag `serving.parity`."""
    client = MlflowClient(store_of(run_info))
    text = summary(block)[:5000]
    client.set_model_version_tag(run_info["registered_model"], str(run_info["version"]), PARITY_TAG, text)
    client.set_tag(run_info["run_id"], PARITY_TAG, text)


def servable(messages: list[dict[str, Any]]) -> bool:
    """A conversation the chat endpoint takes as it is: plain text turns of the roles it knows."""
    return all(
        m.get("role") in ROLES and isinstance(m.get("content"), str) and set(m) <= {"role", "content"} for m in messages
    )


def check_serving(cfg: Config, run_info: dict[str, Any], tuned: Any, tokenizer: Any, test: EvalSet, side: Side) -> dict:
    """The parity block of the registered version against the evaluated model (`tuned`, whose test split results
    are `side`), recorded on the version: on evaluate.parity_rows test rows sampled with evaluate.sample_seed
    among those the endpoint takes as they are, each answered alone (as a server answers) with the evaluated
    settings' max_new_tokens."""
    e = cfg.evaluate
    if e.parity_rows == 0:
        return not_checked("evaluate.parity_rows is 0")
    if not run_info.get("version"):
        return not_checked("the training run registered no model version")
    usable = [i for i, row in enumerate(test.rows) if servable(row["messages"][:-1])]
    picked = [usable[j] for j in parity_rows(len(usable), e.parity_rows, e.sample_seed)]
    if not picked:
        return not_checked("no test row is a plain chat the endpoint takes")
    rows = [test.rows[i] for i in picked]
    prompts = [generation_prompt(tokenizer, row["messages"]) for row in rows]
    done = complete(tuned, tokenizer, prompts, Decoding(max_new_tokens=e.max_new_tokens), 1, "generate for parity")
    nll = side.row_nll()
    evaluated = [Answer(c.text, c.stopped, nll[i]) for c, i in zip(done, picked)]
    uri = f"models:/{run_info['registered_model']}/{run_info['version']}"
    try:
        served, timing = served_answers(
            uri, store_of(run_info), rows, e.max_new_tokens, cfg.model.max_length, cfg.data.overflow
        )
        ids = [str(row.get("id", i)) for row, i in zip(rows, picked)]
        block = {**compare(ids, evaluated, served, e.parity_nll_tolerance, uri), **timing}
    except ServeFailed as exc:
        block = not_served(uri, str(exc))
    record_parity(run_info, block)
    return block
