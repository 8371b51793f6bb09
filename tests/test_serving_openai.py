"""A deployer's OpenAI client talks to the registered champion: `sftops serve-openai` started by the documented
command (docs/serving.md, "An OpenAI client") in a new shell, the documented `openai` snippet run as written,
and its answer equal to `sftops generate`'s greedy answer; the refusals reach the client as 400 (404 for another
model) with a short reason. The model: stories260K fine-tuned a little (its tokenizer adds BOS, which its chat
template writes already: the answer is the evaluated one only where the server encodes as training did)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from mlflow import MlflowClient

from conftest import ROOT, trained_qa
from realstack import background, free_port
from sftops.cli import main
from sftops.tracking.openai_server import chat_request, request_problem, served_name

DOCUMENTED_NAME = "smollm2-chatterbot"
DOCUMENTED_PORT = "8000"


def documented_blocks() -> tuple[list[str], str]:
    """The section's bash lines and its Python snippet, as written."""
    text = (ROOT / "docs" / "serving.md").read_text().split("### An OpenAI client", 1)[1]
    bash = text.split("```bash\n", 1)[1].split("```", 1)[0]
    python = text.split("```python\n", 1)[1].split("```", 1)[0]
    return [line for line in bash.splitlines() if line.strip() and not line.startswith("#")], python


def new_shell(tracking: str) -> dict[str, str]:
    """A new shell with the project's environment active (its bin/ on PATH) and nothing else of this session's;
    PYTHONPATH kept where set, so that a worktree's sources are the ones that run."""
    keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR", "PYTHONPATH")}
    return {**keep, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "MLFLOW_TRACKING_URI": tracking}


@pytest.fixture
def champion(project_folder, stories_model):
    cfg, report = trained_qa(stories_model, tracking={"registered_model_name": DOCUMENTED_NAME})
    MlflowClient(report.tracking_uri).set_registered_model_alias(DOCUMENTED_NAME, "champion", report.version)
    return report.tracking_uri


def generated(uri: str, prompt: str, max_tokens: int, capsys) -> str:
    capsys.readouterr()
    assert main(["generate", "--model", uri, "--prompt", prompt, "--max-new-tokens", str(max_tokens)]) == 0
    return capsys.readouterr().out.split("\n", 1)[1].strip()


def test_an_openai_client_gets_the_champions_greedy_answer_and_short_refusals(champion, project_folder, capsys):
    lines, snippet = documented_blocks()
    assert lines[0].startswith("export MLFLOW_TRACKING_URI=") and len(lines) == 2, lines
    assert f"--port {DOCUMENTED_PORT}" in lines[1] and f'model="{DOCUMENTED_NAME}"' in snippet
    port = str(free_port())
    env = new_shell(champion)
    serve = ["bash", "-c", lines[1].replace(f"--port {DOCUMENTED_PORT}", f"--port {port}")]
    health = f"http://127.0.0.1:{port}/health"
    with background(serve, project_folder / "serve-openai.log", env=env, cwd=project_folder, health=health):
        run = subprocess.run(
            [sys.executable, "-c", snippet.replace(f":{DOCUMENTED_PORT}/", f":{port}/")],
            env=env,
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        expected = generated(f"models:/{DOCUMENTED_NAME}@champion", "What is 2 + 2?", 32, capsys)
        assert expected and run.stdout.strip() == expected

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [DOCUMENTED_NAME]
        question = [{"role": "user", "content": "What is 2 + 2?"}]
        reply = client.chat.completions.create(model=DOCUMENTED_NAME, messages=question, max_tokens=32, temperature=0)
        assert reply.choices[0].message.content.strip() == expected and reply.model == DOCUMENTED_NAME
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 32

        refused = {
            "longer than the model's context": {"messages": [{"role": "user", "content": "what is two? " * 10000}]},
            "messages[0].role is 'wizard'": {"messages": [{"role": "wizard", "content": "hi"}]},
            "non-empty list": {"messages": []},
            "n=2 is not offered": {"messages": question, "n": 2},
            "'tools' is not supported": {"messages": question, "tools": [{"type": "function", "function": {}}]},
        }
        for reason, request in refused.items():
            with pytest.raises(openai.BadRequestError) as caught:
                client.chat.completions.create(model=DOCUMENTED_NAME, **request)
            message = caught.value.body["message"]
            assert caught.value.status_code == 400 and reason in message and len(message) < 300, message
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4o", messages=question)
        again = client.chat.completions.create(model=DOCUMENTED_NAME, messages=question, max_tokens=32)
        assert again.choices[0].message.content.strip() == expected  # the server answers on after refusals


@pytest.mark.parametrize(
    ("extra", "status", "reason"),
    [
        ({}, None, None),
        ({"n": 1, "stream": False, "temperature": 0, "top_p": 1, "user": "u", "seed": 3}, None, None),
        ({"n": True}, 400, "n=true is not offered"),
        ({"stream": True}, 400, "stream=true is not offered"),
        ({"temperature": 0.7}, 400, "temperature=0.7 is not offered"),
        ({"logprobs": True}, 400, "'logprobs' is not supported"),
        ({"model": "other"}, 404, "model 'other' is not served here"),
    ],
)
def test_what_the_greedy_model_cannot_honour_is_refused_by_name(extra, status, reason):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
    problem = request_problem(body, "m")
    assert (problem is None) if status is None else (problem[0] == status and reason in problem[1]), problem


def test_the_request_the_model_gets_takes_max_completion_tokens_for_max_tokens():
    messages = [{"role": "user", "content": "hi"}]
    assert chat_request({"messages": messages, "max_completion_tokens": 7, "stop": ["."]}) == {
        "messages": messages,
        "max_tokens": 7,
        "stop": ["."],
    }
    assert served_name("models:/chat@champion") == served_name("models:/chat/3") == "chat"
