"""The registered champion is served by `mlflow models serve` from a fresh virtualenv built from the model's own
requirements.txt only (no sftops, no project venv), and answers a chat request as `sftops generate` does; the
pyfunc and transformers loaders answer alike; a malformed chat request gets HTTP 400 with the reason.

Both logged shapes: merged full weights (a local-folder base, as for GGUF and pkg: bases) and an adapter on a
hub base named at its commit (a Hugging Face cache folder built here, read with HF_HUB_OFFLINE=1).

The venv is built once per session (a few minutes: torch, transformers and mlflow from the local mirror)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from conftest import ROOT, build_tiny_model, formatted, qa_rows, write_jsonl, write_project
from realstack import background, free_port, mlflow_server
from sftops.cli import main
from sftops.modeling import FALLBACK_CHAT_TEMPLATE
from sftops.stages.train import run_train

PROMPT = "what is two plus two?"
MAX_TOKENS = 12
DOCUMENTED_NAME = "smollm2-chatterbot"  # the model docs/serving.md serves (params.yaml's registered name)
HUB_ID, HUB_REVISION = "sftops-test/tiny-chat", "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlflow_server(tmp_path_factory.mktemp("registry")) as url:
        yield url


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HF_HOME holding HUB_ID at HUB_REVISION in the layout huggingface_hub reads offline (refs/main, snapshots/),
    a tiny Llama whose tokenizer carries its own chat template."""
    home = tmp_path_factory.mktemp("hf-home")
    repo = home / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    snapshot = build_tiny_model(repo / "snapshots" / HUB_REVISION)
    (snapshot / "chat_template.jinja").write_text(FALLBACK_CHAT_TEMPLATE)  # the base's own template
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_REVISION)
    return home


def train_champion(folder: Path, base: str, name: str, registry: str, monkeypatch) -> str:
    """The production path: ingest, format, train (logs and registers), then the alias the gate would set."""
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    monkeypatch.setenv("SFTOPS_CACHE_DIR", str(folder / "cache"))
    cfg = write_project(
        base,
        [{"name": "qa", "path": str(write_jsonl("in.jsonl", qa_rows(40, [(PROMPT, "two plus two is four.")])))}],
        train={"method": "lora", "max_steps": 3, "micro_batch_size": 8, "learning_rate": 0.05},
        tracking={"registered_model_name": name},
    )
    run = run_train(formatted(cfg))
    MlflowClient(registry).set_registered_model_alias(name, "champion", run.version)
    return f"models:/{name}@champion"


def logged_file(registry: str, uri: str, name: str) -> str:
    mlflow.set_tracking_uri(registry)
    return Path(mlflow.artifacts.download_artifacts(f"{uri}/{name}")).read_text()


@pytest.fixture(scope="session")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv without the project (pip reads this machine's index configuration); each test installs into
    it the requirements.txt of the model it serves, nothing else. SFTOPS_TEST_SERVED_VENV names a folder to keep
    it in between sessions (the install takes minutes; made there when missing)."""
    kept = os.environ.get("SFTOPS_TEST_SERVED_VENV")
    # named as docs/serving.md names it: its commands run beside it as written (venv refuses a symlinked folder)
    venv = (Path(kept) if kept else tmp_path_factory.mktemp("served")) / "serve-env"
    if not (venv / "bin" / "pip").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # on the base interpreter, empty
    return venv


def install_requirements(venv: Path, requirements: str, folder: Path) -> None:
    path = folder / "requirements.txt"
    path.write_text(requirements)
    # --no-compile: Python compiles what the server imports when it imports it, not all of torch at install
    pip = [str(venv / "bin" / "pip"), "install", "-q", "--no-compile", "-r", str(path)]
    proc = subprocess.run(pip, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


def venv_env(venv: Path, registry: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The served process's environment: the fresh venv first on PATH, the project's venv and sources nowhere."""
    keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR", "PIP_CONFIG_FILE")}
    return {**keep, "PATH": f"{venv / 'bin'}:/usr/bin:/bin", "MLFLOW_TRACKING_URI": registry, **(extra or {})}


def post(url: str, body: object) -> tuple[int, str]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def chat(messages: list[dict]) -> dict:
    return {"messages": messages, "max_tokens": MAX_TOKENS}


def sftops_generate(uri: str, capsys) -> str:
    capsys.readouterr()
    assert main(["generate", "--model", uri, "--prompt", PROMPT, "--max-new-tokens", str(MAX_TOKENS)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"> {PROMPT}\n")
    return out[len(f"> {PROMPT}\n") :].strip()


def transformers_answer(uri: str) -> str:
    """mlflow.transformers.load_model's pipeline, given the chat prompt and the decoding the pyfunc applies."""
    pipeline = mlflow.transformers.load_model(uri)
    decoding = mlflow.pyfunc.load_model(uri).model_config
    prompt = pipeline.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    out = pipeline(prompt, return_full_text=False, **{**decoding, "max_new_tokens": MAX_TOKENS})
    return out[0]["generated_text"].strip()


def documented_commands() -> list[str]:
    """The serving commands of docs/serving.md, as written: its first bash block's lines."""
    text = (ROOT / "docs" / "serving.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def fresh_shell(registry: str, extra_path: str = "") -> dict[str, str]:
    """A new user's shell: the machine's python3 (the interpreter the project's venv was made from), /usr/bin and
    /bin on PATH, nothing of the project's venv unless `extra_path` names it."""
    keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR", "PIP_CONFIG_FILE")}
    path = f"{Path(sys.base_prefix) / 'bin'}:/usr/bin:/bin" + (f":{extra_path}" if extra_path else "")
    return {**keep, "PATH": path, "MLFLOW_TRACKING_URI": registry}


def documented_serve(venv: Path, registry: str, port: int) -> list[str]:
    """Runs the documented lines up to the server beside the session's venv, serve-env (the documented `python3 -m
    venv` and `pip install -r requirements.txt` run on it as written); returns the command that starts the server:
    the activation and `mlflow models serve` lines, in one shell, to run in the same folder."""
    lines = documented_commands()
    assert lines[0].startswith("export MLFLOW_TRACKING_URI="), lines[0]  # the test's registry stands in for it
    assert venv.name == "serve-env", venv
    folder = venv.parent
    client = str(ROOT / ".venv" / "bin")  # "any mlflow client": the project's, for the download only
    for line in lines[1:]:
        if line.startswith(". serve-env/bin/activate"):
            break
        env = fresh_shell(registry, client if "mlflow artifacts download" in line else "")
        proc = subprocess.run(["bash", "-c", line], cwd=folder, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, (line, proc.stderr[-3000:])
    serve = "\n".join(lines[lines.index(line) :]).replace("-p 5001", f"-p {port}")
    assert "models:/smollm2-chatterbot@champion" in serve and f"-p {port}" in serve, serve
    return ["bash", "-c", serve]


def direct_serve(venv: Path, port: int, uri: str) -> list[str]:
    return [
        str(venv / "bin" / "mlflow"),
        "models",
        "serve",
        "-m",
        uri,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "--workers",
        "1",
    ]


def served_answers_and_refusals(
    venv: Path, registry: str, uri: str, folder: Path, env_extra: dict | None, expected: str, documented: bool
) -> tuple:
    port = free_port()
    if documented:
        cmd, env, cwd = documented_serve(venv, registry, port), fresh_shell(registry), venv.parent
    else:
        cmd, env, cwd = direct_serve(venv, port, uri), venv_env(venv, registry, env_extra), folder
    health = f"http://127.0.0.1:{port}/ping"
    with background(cmd, folder / "serve.log", env=env, cwd=cwd, health=health, timeout=600):
        url = f"http://127.0.0.1:{port}/invocations"
        status, body = post(url, chat([{"role": "user", "content": PROMPT}]))
        assert status == 200, body
        [reply] = json.loads(body)  # one conversation, one chat completion
        stop = expected.split()[-1]
        status, body = post(url, {**chat([{"role": "user", "content": PROMPT}]), "stop": [stop]})
        assert status == 200, body
        stopped = json.loads(body)[0]["choices"][0]
        assert stopped["message"]["content"].strip() == expected[: expected.index(stop)].strip(), (stopped, stop)
        assert stopped["finish_reason"] == "stop"
        developer = [{"role": "developer", "content": "answer briefly"}, {"role": "user", "content": PROMPT}]
        status, body = post(url, chat(developer))
        assert status == 200, body  # developer is a system turn, as training reads it
        started = time.monotonic()
        too_long = post(url, chat([{"role": "user", "content": "what is two plus two? " * 5000}]))  # 110,000 chars
        too_long_s = time.monotonic() - started
        refusals = {
            "no messages": post(url, {"max_tokens": 4}),
            "content a number": post(url, chat([{"role": "user", "content": 7}])),
            "messages a string": post(url, {"messages": "hello"}),
            "unknown role": post(url, chat([{"role": "wizard", "content": PROMPT}])),
            "no turns": post(url, chat([])),
            "max_tokens a string": post(url, {**chat([{"role": "user", "content": PROMPT}]), "max_tokens": "many"}),
            "longer than the context": too_long,
        }
        status, body = post(url, chat([{"role": "user", "content": PROMPT}]))
        assert status == 200, body  # the worker is free again: nothing is still computing the refused request
    assert too_long_s < 1.0, too_long_s
    return reply, refusals


def check_refusals(refusals: dict[str, tuple[int, str]]) -> None:
    for what, (status, body) in refusals.items():
        assert status == 400, (what, status, body[-2000:])
        message = json.loads(body)["message"]
        # no stack trace, and never the request back (MLflow's own "no messages" protocol note is ~1 KB)
        assert message and "Traceback" not in body and len(body) < 1500, (what, body[-2000:])
    assert "messages[0].role is 'wizard'" in json.loads(refusals["unknown role"][1])["message"]
    assert "non-empty list" in json.loads(refusals["no turns"][1])["message"]
    too_long = refusals["longer than the context"][1]
    assert "longer than the model's context" in json.loads(too_long)["message"] and len(too_long) < 300, too_long


def paths_named(registry: str, uri: str, paths: list[Path]) -> list[str]:
    """The logged files' lines that name any of `paths` (MLflow's own artifact_path, where the store keeps the
    model, aside)."""
    mlflow.set_tracking_uri(registry)
    local = Path(mlflow.artifacts.download_artifacts(uri))
    found = []
    for file in local.rglob("*"):
        if file.is_file() and file.suffix not in (".safetensors",):
            for line in file.read_text(errors="replace").splitlines():
                if any(str(p) in line for p in paths) and not line.startswith("artifact_path:"):
                    found.append(f"{file.name}: {line[:200]}")
    return found


def check_one_model(
    uri: str,
    registry: str,
    venv: Path,
    folder: Path,
    capsys,
    served_name: str,
    env_extra: dict | None = None,
    documented: bool = False,
) -> None:
    # first without compiling (minutes less): the documented `pip install -r requirements.txt` then finds it done
    install_requirements(venv, logged_file(registry, uri, "requirements.txt"), folder)
    expected = sftops_generate(uri, capsys)
    reply, refusals = served_answers_and_refusals(venv, registry, uri, folder, env_extra, expected, documented)
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["choices"][0]["message"]["content"].strip() == expected
    pyfunc_reply = mlflow.pyfunc.load_model(uri).predict(chat([{"role": "user", "content": PROMPT}]))
    assert pyfunc_reply[0]["choices"][0]["message"]["content"].strip() == expected
    assert reply["model"] == pyfunc_reply[0]["model"] == served_name  # never a path of the training machine
    assert transformers_answer(uri) == expected
    check_refusals(refusals)


def requirement_names(requirements: str) -> set[str]:
    return {line.split("==")[0] for line in requirements.split() if line and not line.startswith("#")}


def test_merged_champion_is_served_from_its_own_record(
    tmp_path, registry, fresh_venv, stories_model, monkeypatch, capsys
):
    """A local-folder base (as GGUF and pkg: bases): the adapter is merged into self-contained safetensors, served
    by the commands of docs/serving.md as written, in a fresh shell; no logged file names a path of this machine
    (the base's folder, the project's); each answer names the registered model."""
    uri = train_champion(tmp_path, str(stories_model), DOCUMENTED_NAME, registry, monkeypatch)
    assert uri == "models:/smollm2-chatterbot@champion"
    assert paths_named(registry, uri, [stories_model, tmp_path, ROOT]) == []
    requirements = logged_file(registry, uri, "requirements.txt")
    assert requirement_names(requirements) == {"torch", "transformers", "tokenizers", "safetensors", "mlflow"}
    assert "+" not in requirements
    assert "+" not in logged_file(registry, uri, "conda.yaml")
    mlmodel = yaml.safe_load(logged_file(registry, uri, "MLmodel"))
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "served_chat"
    assert mlmodel["metadata"]["task"] == "llm/v1/chat" and mlmodel["metadata"]["sftops"]["weights"] == "full"
    assert "peft_adaptor" not in mlmodel["flavors"]["transformers"] and mlmodel["saved_input_example_info"]
    inputs = json.loads(mlmodel["signature"]["inputs"])
    assert [field["name"] for field in inputs] == ["messages", "max_tokens", "stop"]  # what is honoured, no more
    check_one_model(uri, registry, fresh_venv, tmp_path, capsys, f"models:/{DOCUMENTED_NAME}", documented=True)


def test_adapter_champion_on_a_named_hub_base_is_served_from_its_own_record(
    tmp_path, registry, fresh_venv, hub_cache, monkeypatch, capsys
):
    """A hub base: the adapter alone, on the base named at its commit; the serving env fetches the base from
    the (offline) hub cache at that commit."""
    monkeypatch.setenv("HF_HOME", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache / "hub"))
    uri = train_champion(tmp_path, HUB_ID, "served-adapter", registry, monkeypatch)
    requirements = logged_file(registry, uri, "requirements.txt")
    assert requirement_names(requirements) == {"torch", "transformers", "tokenizers", "safetensors", "mlflow", "peft"}
    flavor = yaml.safe_load(logged_file(registry, uri, "MLmodel"))["flavors"]["transformers"]
    assert (flavor["source_model_name"], flavor["source_model_revision"]) == (HUB_ID, HUB_REVISION)
    assert flavor["peft_adaptor"] == "peft" and "model_binary" not in flavor
    offline = {"HF_HOME": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    check_one_model(uri, registry, fresh_venv, tmp_path, capsys, HUB_ID, offline)  # the base's hub id


def test_a_registry_uri_naming_no_model_or_alias_is_one_line_exit_2(tmp_path, registry, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    for uri in ("models:/no-such-model@champion", "models:/no-such-model/3"):
        capsys.readouterr()
        assert main(["generate", "--model", uri, "--prompt", PROMPT]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and uri in err, err
