"""Hub models and datasets pinned to their revisions, for real and without network: a hand-built Hugging Face hub
cache (tests/hubcache.py) holds a tiny model and a tiny dataset under fake `org/name` ids at two revisions each,
every process runs with HF_HUB_OFFLINE=1, and each revision loads its own weights and rows and is recorded as the
commit it named (run manifest, MLflow params and tags, the registered version, the model folder, the base-eval
cache key)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import empty_mlflow_store, error_lines, sftops, write_project
from hubcache import add_revision, offline_env

MODEL, DATA = "sftops-test/tiny", "sftops-test/qa"


def qa_rows(tag: str) -> list[dict[str, str]]:
    return [{"prompt": f"what is {i} plus {tag}?", "completion": f"{i} plus {tag} is {i}{tag}."} for i in range(40)]


def jsonl(rows: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_model):
    """The cache: the model at commit A (branch main) and B (tag v2, other weights); the dataset at commit one (tag
    v1) and two (branch main), with different rows. Returns the folders, the commits and the environment."""
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("hub")
    other = root / "weights-b"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(other)
    for tokenizer_file in tiny_model.glob("*token*"):
        (other / tokenizer_file.name).write_bytes(tokenizer_file.read_bytes())
    cache = root / "cache"
    commits = {
        "A": add_revision(cache, MODEL, tiny_model, refs=("main",)),
        "B": add_revision(cache, MODEL, other, refs=("v2",)),
        "one": add_revision(cache, DATA, {"train.jsonl": jsonl(qa_rows("one"))}, refs=("v1",), repo_type="dataset"),
        "two": add_revision(cache, DATA, {"train.jsonl": jsonl(qa_rows("two"))}, refs=("main",), repo_type="dataset"),
    }
    env = {**os.environ, **offline_env(cache, root), "SFTOPS_CACHE_DIR": str(root / "sftops-cache")}
    return {"weights": {"A": tiny_model, "B": other}, "commits": commits, "env": env, "root": root}


def tensor_digests(safetensors_file: Path) -> dict[str, str]:
    from safetensors.numpy import load_file

    return {name: hashlib.sha256(array.tobytes()).hexdigest() for name, array in load_file(safetensors_file).items()}


LOADER = """
import hashlib, json, sys
from sftops.config import ModelConfig, SourceConfig
from sftops.modeling import load_base_model, load_tokenizer, pinned
from sftops.data.sources import pinned_source, read_source
out = {"models": {}, "data": {}}
for revision in json.loads(sys.argv[1]):
    cfg = pinned(ModelConfig(base=sys.argv[3], revision=revision))
    model, tokenizer = load_base_model(cfg), load_tokenizer(cfg)
    out["models"][str(revision)] = {"commit": cfg.revision, "vocab": len(tokenizer), "tensors": {
        name: hashlib.sha256(t.detach().numpy().tobytes()).hexdigest() for name, t in model.state_dict().items()}}
for revision in json.loads(sys.argv[2]):
    source = pinned_source(SourceConfig(name="qa", hub=sys.argv[4], revision=revision))
    out["data"][str(revision)] = {"commit": source.revision, "rows": [r.fields for r in read_source(source)]}
print(json.dumps(out))
"""


def test_each_revision_loads_its_own_weights_and_rows_offline(hub):
    commits = hub["commits"]
    model_revisions = [None, "v2", commits["B"], commits["A"]]
    data_revisions = [None, "v1", commits["one"]]
    done = subprocess.run(
        [sys.executable, "-c", LOADER, json.dumps(model_revisions), json.dumps(data_revisions), MODEL, DATA],
        capture_output=True,
        text=True,
        env=hub["env"],
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    expected_model = {None: "A", "v2": "B", commits["B"]: "B", commits["A"]: "A"}
    for revision, which in expected_model.items():
        got = loaded["models"][str(revision)]
        assert got["commit"] == commits[which], (revision, got["commit"])
        # the weights loaded are, tensor for tensor, the ones stored at that revision (read here with safetensors)
        assert got["tensors"] == tensor_digests(hub["weights"][which] / "model.safetensors"), revision
    assert loaded["models"]["None"]["tensors"] != loaded["models"]["v2"]["tensors"]
    expected_data = {None: "two", "v1": "one", commits["one"]: "one"}
    for revision, which in expected_data.items():
        got = loaded["data"][str(revision)]
        assert got["commit"] == commits[which] and got["rows"] == qa_rows(which), revision


def _params(folder: Path, source: dict, model_revision: str | None) -> None:
    write_project(
        MODEL,
        [source],
        folder,
        model={"revision": model_revision},
        train={"method": "lora", "max_steps": 2, "micro_batch_size": 4, "checkpoint_every": None},
        evaluate={"num_generations": 2, "max_new_tokens": 4, "bootstrap_resamples": 10, "batch_size": 8},
        tracking={"registered_model_name": "hub-pinned"},
    )


@pytest.mark.reliability
def test_a_revision_that_does_not_exist_is_one_line_naming_it_offline(hub, tmp_path, figures):
    (tmp_path / "qa.jsonl").write_bytes(jsonl(qa_rows("local")))
    _params(tmp_path, {"name": "qa", "hub": DATA, "revision": "no-such-tag"}, None)
    ingest = sftops("ingest", cwd=tmp_path, env=hub["env"])
    assert ingest.returncode == 2 and "Traceback" not in ingest.stderr, ingest.stderr[-2000:]
    lines = error_lines(ingest.stderr)
    assert len(lines) == 1, lines
    for part in (
        "data.sources 'qa'",
        f"hub {DATA!r}",
        "'no-such-tag'",
        "HF_HUB_OFFLINE is set",
        "cached: main, v1",
        f"hf download {DATA} --repo-type dataset --revision no-such-tag",
    ):
        assert part in lines[0], (part, lines[0])

    _params(tmp_path, {"name": "qa", "path": "qa.jsonl"}, "no-such-branch")
    assert sftops("ingest", cwd=tmp_path, env=hub["env"]).returncode == 0
    fmt = sftops("format", cwd=tmp_path, env=hub["env"])
    assert fmt.returncode == 2 and "Traceback" not in fmt.stderr, fmt.stderr[-2000:]
    lines = error_lines(fmt.stderr)
    assert len(lines) == 1, lines
    for part in (
        f"model.base {MODEL!r}",
        "'no-such-branch'",
        "(model.revision)",
        "cached: main, v2",
        "fix model.revision in params.yaml",
    ):
        assert part in lines[0], (part, lines[0])
    figures["bad inputs tried"] += 2
    figures["bad inputs ending in one line"] += 2


def _recorded(folder: Path, paths_prefix: str = "") -> dict:
    """What a finished `sftops run` recorded: the model folder's manifest, the ingest report, metrics, and from
    MLflow the run's params and tags, its manifest artifact, the registered version's tags, the logged model's
    metadata."""
    import mlflow
    from mlflow import MlflowClient

    run_info = json.loads((folder / paths_prefix / "models/run.json").read_text())
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    run = client.get_run(run_info["run_id"])
    return {
        "base": json.loads((folder / paths_prefix / "models/model/sftops_model.json").read_text())["base"],
        "ingest": json.loads((folder / paths_prefix / "data/curated/ingest_report.json").read_text()),
        "raw": [
            json.loads(line)["fields"]
            for line in (folder / paths_prefix / "data/raw/qa.jsonl").read_text().splitlines()
        ],
        "metrics": json.loads((folder / paths_prefix / "metrics.json").read_text()),
        "params": run.data.params,
        "tags": run.data.tags,
        "manifest": mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/reproduce/manifest.json"),
        "version_tags": client.get_model_version(run_info["registered_model"], run_info["version"]).tags,
        "metadata": mlflow.models.get_model_info(run_info["model_uri"]).metadata,
    }


def test_a_pipeline_run_records_the_commits_it_loaded_and_a_moved_branch_is_a_new_base(hub, tmp_path):
    commits, env = hub["commits"], {**hub["env"], "MLFLOW_TRACKING_URI": empty_mlflow_store(tmp_path / "mlflow.db")}
    base_evals = Path(env["SFTOPS_CACHE_DIR"]) / "base-eval"
    cached_before = len(list(base_evals.glob("*.json")))
    _params(tmp_path, {"name": "qa", "hub": DATA, "revision": "v1"}, None)  # the model: its default branch
    first = sftops("run", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    got = _recorded(tmp_path)
    assert got["raw"] == qa_rows("one")  # tag v1's rows, not main's
    assert got["ingest"]["revisions"] == {"qa": {"hub": DATA, "requested": "v1", "commit": commits["one"]}}
    assert got["base"]["base"] == MODEL and got["base"]["revision"] == commits["A"]  # main, as a commit
    assert got["manifest"]["revisions"] == {
        "model": {"base": MODEL, "requested": None, "resolved": commits["A"]},
        "data": {"qa": {"hub": DATA, "requested": "v1", "commit": commits["one"]}},
    }
    # params: model.revision as params.yaml has it, the resolved commits beside it
    assert got["params"]["model.revision"] == "null"
    assert got["params"]["model.revision_resolved"] == commits["A"]
    assert got["params"]["data.qa.revision_resolved"] == commits["one"]
    for tags in (got["tags"], got["version_tags"]):
        assert tags["model.revision"] == commits["A"] and tags["data.qa.revision"] == commits["one"]
    assert got["metadata"]["base_model_revision"] == commits["A"]
    assert len(list(base_evals.glob("*.json"))) == cached_before + 1

    # The hub's main moves on to commit B: the same params.yaml now loads B, records B, and evaluates the base
    # afresh rather than taking commit A's cached base evaluation (same model.base, test split and eval settings).
    main = hub["root"] / "cache" / "models--sftops-test--tiny" / "refs" / "main"
    main.write_text(commits["B"])
    try:
        second = sftops("run", cwd=tmp_path, env=env)
    finally:
        main.write_text(commits["A"])
    assert second.returncode == 0, second.stderr[-3000:]
    again = _recorded(tmp_path)
    assert again["raw"] == qa_rows("one")
    assert again["base"]["revision"] == commits["B"]
    assert again["params"]["model.revision"] == "null" and again["params"]["model.revision_resolved"] == commits["B"]
    assert again["version_tags"]["model.revision"] == commits["B"]
    assert again["version_tags"]["data.qa.revision"] == commits["one"]
    assert len(list(base_evals.glob("*.json"))) == cached_before + 2  # a second key, not a hit on the first
    assert again["metrics"]["base"]["nll"] != got["metrics"]["base"]["nll"]  # other weights, other base scores


class StandInHub:
    """A loopback stand-in for the hub's revision API (GET /api/{models,datasets}/<repo>/revision/<rev>), answering
    as the hub does: the commit, or 404 with X-Error-Code RevisionNotFound / RepoNotFound, which huggingface_hub
    turns into its own errors. commits: (repo, revision) -> commit."""

    def __init__(self, commits: dict[tuple[str, str], str]) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import unquote

        known = commits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server name)
                parts = unquote(self.path.split("?")[0]).strip("/").split("/", 5)  # api/models/org/name/revision/rev
                repo = "/".join(parts[2:4])
                commit = known.get((repo, parts[5] if len(parts) > 5 else "main"))
                if commit is not None:
                    body = json.dumps({"id": repo, "sha": commit}).encode()
                    self.send_response(200)
                else:
                    body, repos = b"{}", {r for r, _ in known}
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RevisionNotFound" if repo in repos else "RepoNotFound")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_online_the_hub_names_the_commit_and_a_revision_it_lacks_is_one_line(hub, monkeypatch):
    from huggingface_hub import constants

    from sftops import hub as hubs
    from sftops.errors import DataError, ModelError

    commits = hub["commits"]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", hub["env"]["HF_HUB_CACHE"])
    # the hub's main has moved on to B while the cache's refs/main still names A: the hub decides
    server = StandInHub({(MODEL, "main"): commits["B"], (DATA, "v1"): commits["one"]})
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    try:
        assert hubs.resolve(MODEL, None, "model", f"model.base {MODEL!r}", "model.revision", ModelError) == commits["B"]
        assert hubs.resolve(DATA, "v1", "dataset", "source", "its revision", DataError) == commits["one"]
        with pytest.raises(ModelError) as missing:
            hubs.resolve(MODEL, "no-such-tag", "model", f"model.base {MODEL!r}", "model.revision", ModelError)
        message = str(missing.value)
        assert "\n" not in message and message.startswith(
            "model.revision='no-such-tag': model.base 'sftops-test/tiny' has no such branch, tag or commit on the hub"
        ), message
        with pytest.raises(DataError, match=r"\(hub 'sftops-test/none'\) is not a repository on the hub"):
            hubs.resolve(
                "sftops-test/none", None, "dataset", "source 'x' (hub 'sftops-test/none')", "its revision", DataError
            )
    finally:
        server.stop()
    # the hub gone (nothing listens there now): the cache's refs decide
    assert hubs.resolve(MODEL, None, "model", f"model.base {MODEL!r}", "model.revision", ModelError) == commits["A"]
