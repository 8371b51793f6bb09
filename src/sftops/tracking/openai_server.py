"""`sftops serve-openai MODEL_URI`: the registered chat model behind OpenAI's chat completions API
(`POST /v1/chat/completions`, `GET /v1/models`), for a deployer's OpenAI client.

The model is loaded as `mlflow models serve` loads it (mlflow.pyfunc.load_model: the logged served_chat entry
point, its checks and the logged decoding), and each request is its `predict`: the same answer as the scoring
server's `/invocations` and `sftops generate`, the same fast 400 refusals (a conversation longer than the context
is refused before any token is generated). Why not MLflow's AI gateway: its `mlflow-model-serving` provider sends
a model server only the first message's text (`{"inputs": [content]}`, the rest of the conversation dropped) and
expects `{"predictions": [text]}` back, which a chat model served with its messages does not take or give.

What OpenAI's API offers that this greedy, one-completion model cannot honour (`n` > 1, `stream`, a temperature
or top_p that samples, tools, logprobs, ...) is refused with 400 and its reason, never silently ignored. One
request is answered at a time (the model computes on all cores); the others wait their turn."""

from __future__ import annotations

import json
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sftops.errors import ConfigError

MAX_BODY_BYTES = 8 * 1024 * 1024  # far more than any context's worth of text; a larger body is refused unread
HONOURED = {"model", "messages", "max_tokens", "max_completion_tokens", "stop"}
# accepted where they ask for what this model does anyway (or change nothing in the answer)
HARMLESS = {"n": (None, 1), "stream": (None, False), "temperature": (None, 0, 0.0), "top_p": (None, 1, 1.0)}
IGNORED = {"user", "seed", "store", "metadata"}


def served_name(uri: str) -> str:
    """The id clients name the model by: the registered model's name (models:/NAME@ALIAS, models:/NAME/VERSION),
    else the URI as given."""
    if uri.startswith("models:/"):
        return uri.removeprefix("models:/").split("@")[0].split("/")[0]
    return uri


def request_problem(body: Any, name: str) -> tuple[int, str] | None:
    """Why an OpenAI chat request cannot be answered by this model as asked (status, reason), or None."""
    if not isinstance(body, dict):
        return HTTPStatus.BAD_REQUEST, "the request must be a JSON object with model and messages"
    if body.get("model") != name:
        shown = repr(body.get("model"))[:60]
        return HTTPStatus.NOT_FOUND, f"model {shown} is not served here; this server serves {name!r}"
    for key, value in body.items():
        if key in HONOURED or key in IGNORED:
            continue
        if key in HARMLESS:
            # bool apart from int: True == 1, yet n=true is no count
            if value not in HARMLESS[key] or isinstance(value, bool) != isinstance(HARMLESS[key][1], bool):
                shown = json.dumps(value)[:40]
                return HTTPStatus.BAD_REQUEST, (
                    f"{key}={shown} is not offered: this model answers greedily, one completion, not streamed"
                )
            continue
        takes = ", ".join(sorted(HONOURED))
        return HTTPStatus.BAD_REQUEST, f"{key[:40]!r} is not supported by this model (it takes {takes})"
    return None


def chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """The served model's request: messages, max_tokens (OpenAI's newer max_completion_tokens too), stop."""
    request = {"messages": body.get("messages")}
    tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if tokens is not None:
        request["max_tokens"] = tokens
    if body.get("stop") is not None:
        request["stop"] = body["stop"]
    return request


class ChatEndpoint:
    """The loaded model and the one lock its answers take turns on."""

    def __init__(self, uri: str, name: str | None = None) -> None:
        import mlflow

        try:
            self.model = mlflow.pyfunc.load_model(uri)
        except mlflow.exceptions.MlflowException as exc:
            raise ConfigError(f"cannot load {uri}: {exc.message.splitlines()[0][:300]}") from None
        self.name = name or served_name(uri)
        self.lock = threading.Lock()

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "sftops"}]}

    def complete(self, body: Any) -> tuple[int, dict[str, Any]]:
        from mlflow.exceptions import MlflowException

        problem = request_problem(body, self.name)
        if problem:
            return problem[0], error(problem[1], problem[0])
        try:
            with self.lock:
                [reply] = self.model.predict(chat_request(body))
        except MlflowException as exc:  # served_chat's refusals: the reason alone
            if exc.get_http_status_code() != HTTPStatus.BAD_REQUEST:
                raise
            return HTTPStatus.BAD_REQUEST, error(exc.message, HTTPStatus.BAD_REQUEST)
        return HTTPStatus.OK, {**reply, "model": self.name}


def error(message: str, status: int) -> dict[str, Any]:
    """OpenAI's error body (the openai client raises BadRequestError / NotFoundError with this message)."""
    kinds = {HTTPStatus.BAD_REQUEST: "invalid_request_error", HTTPStatus.NOT_FOUND: "not_found_error"}
    kind = kinds.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def handler_for(endpoint: ChatEndpoint) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (the http.server name)
            if self.path.rstrip("/") == "/v1/models":
                self.send(HTTPStatus.OK, endpoint.models())
            elif self.path in ("/health", "/ping"):
                self.send(HTTPStatus.OK, {"status": "ok"})
            else:
                self.send(HTTPStatus.NOT_FOUND, error(f"no route {self.path[:80]}", HTTPStatus.NOT_FOUND))

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/v1/chat/completions":
                self.send(HTTPStatus.NOT_FOUND, error(f"no route {self.path[:80]}", HTTPStatus.NOT_FOUND))
                return
            size = int(self.headers.get("Content-Length") or 0)
            if size > MAX_BODY_BYTES:
                self.close_connection = True  # the body is left unread
                too_big = f"the request is over {MAX_BODY_BYTES} bytes"
                self.send(HTTPStatus.BAD_REQUEST, error(too_big, HTTPStatus.BAD_REQUEST))
                return
            try:
                body = json.loads(self.rfile.read(size) or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.send(HTTPStatus.BAD_REQUEST, error("the request body is not JSON", HTTPStatus.BAD_REQUEST))
                return
            try:
                self.send(*endpoint.complete(body))
            except Exception as exc:  # a bug, not the request's fault: its trace in the server's log, not the reply
                traceback.print_exc()
                failed = f"the model failed to answer ({type(exc).__name__}); see the server's log"
                self.send(HTTPStatus.INTERNAL_SERVER_ERROR, error(failed, HTTPStatus.INTERNAL_SERVER_ERROR))

        def send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # one line per request, never its body
            print(f"{self.address_string()} {format % args}", flush=True)

    return Handler


def serve(uri: str, host: str, port: int, name: str | None = None) -> None:
    """Load the model, then answer until interrupted."""
    endpoint = ChatEndpoint(uri, name)
    server = ThreadingHTTPServer((host, port), handler_for(endpoint))
    print(f"serving {uri} as {endpoint.name!r} on http://{host}:{port}/v1 (chat completions, models)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
