"""The python_function entry point of a logged sftops chat model (MLmodel: loader_module served_chat): MLflow's
transformers pyfunc behind a check of each request, which it answers with HTTP 400 and a one-line reason before
any token is generated:

- the conversation: a non-empty list of {role, content}, roles system, developer (a system turn, as training
  reads it), user or assistant, content a string, ending with a user (or system) turn;
- the fields: `messages`, `max_tokens` (a positive integer) and `stop` (a list of up to 4 strings), what the
  signature advertises (this model answers greedily, one completion; MLflow drops any other field);
- the length: the rendered prompt's tokens plus `max_tokens` must fit the model's context, counted before
  generating (a 100 KB message is refused in milliseconds, not computed for minutes).

`stop` is honoured here with the model's own tokenizer (MLflow's would load one from the model's source name,
which is not a folder on the serving machine), and cut from the answer as OpenAI's API does.

The logged signature types every field as `any`, and this check types them: MLflow's own schema enforcement and
its scoring server put the whole request into their error message (100 KB back for a 100 KB message); a refusal
from here is its reason alone.

Shipped in the model's code/ folder and imported there: it must need nothing but mlflow and transformers (no
sftops)."""

from __future__ import annotations

from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST

ROLES = ("system", "developer", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}  # as sftops.data.schemas reads OpenAI's developer turn
MAX_STOP = 4


class Refusal(MlflowException):
    """A request refused with HTTP 400 and its reason only. The scoring server rewrites an error's message to
    'Failed to predict data <the whole request>. Error: ...'; this message keeps the reason."""

    def __init__(self, reason: str) -> None:
        self._reason = reason
        super().__init__(reason, error_code=BAD_REQUEST)

    @property
    def message(self) -> str:
        return self._reason

    @message.setter
    def message(self, value: str) -> None:  # the server's rewrite (with the request in it) is dropped
        pass


def conversation_problem(messages: Any) -> str | None:
    """Why a value is not a conversation to answer, or None."""
    if not isinstance(messages, (list, tuple)) or not messages:
        return "messages must be a non-empty list of {role, content} objects"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{i}] must be an object with role and content"
        role = message.get("role")
        if role not in ROLES:
            shown = repr(role)[:40]
            return f"messages[{i}].role is {shown}; it must be one of {', '.join(ROLES)}"
        if not isinstance(message.get("content"), str):
            return f"messages[{i}].content must be a string"
    if messages[-1]["role"] == "assistant":
        return "the last message is the assistant's; end with a user message for the model to answer"
    return None


def field_problem(request: dict[str, Any]) -> str | None:
    """Why the request's other fields cannot be honoured, or None."""
    tokens = request.get("max_tokens")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        return "max_tokens must be a positive integer"
    stop = request.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not 0 < len(stops) <= MAX_STOP:
            return f"stop must be a string or a list of 1 to {MAX_STOP} strings"
        if not all(isinstance(s, str) and s for s in stops):
            return "stop must hold non-empty strings"
    return None


def requests_of(data: Any) -> list[dict[str, Any]]:
    """One dict per conversation: a DataFrame's rows (numpy arrays back to lists) or the dict itself."""
    if hasattr(data, "to_dict"):  # a DataFrame, after MLflow's schema enforcement
        rows = data.to_dict(orient="records")
    elif isinstance(data, dict):
        rows = [data]
    else:
        raise Refusal("the request must be a JSON object with messages")
    return [{k: _plain(v) for k, v in row.items() if not _missing(v)} for row in rows]


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays (and scalars) come back from pandas
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # pandas fills absent fields with NaN


def canonical(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"role": ROLE_ALIASES.get(m["role"], m["role"]), "content": m["content"]} for m in messages]


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The answer up to the first stop string (excluded), and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class LastToken:
    """A stopping criterion that never stops: it notes the last token generated (one conversation at a time)."""

    token: int | None = None

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        self.token = int(input_ids[0, -1])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class CheckedChat:
    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped
        pipeline = wrapped.get_raw_model()
        self.tokenizer = pipeline.tokenizer
        self.context = getattr(pipeline.model.config, "max_position_embeddings", None)
        self.default_max_tokens = int(wrapped.model_config.get("max_new_tokens", 64))
        eos = wrapped.model_config.get("eos_token_id", self.tokenizer.eos_token_id)
        self.stop_ids = set(eos if isinstance(eos, list) else [eos])
        # the longest token's characters: a text longer than context * this cannot fit, without tokenising it
        self.chars_per_token = max((len(t) for t in self.tokenizer.get_vocab()), default=1) or 1

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        requests = requests_of(data)
        answers = []
        for row, request in enumerate(requests):
            problem = conversation_problem(request.get("messages")) or field_problem(request)
            problem = problem or self.length_problem(request)
            if problem:
                where = f" (row {row})" if len(requests) > 1 else ""
                raise Refusal(f"invalid chat request{where}: {problem}")
        for request in requests:
            answers += self.answer(request, params)
        return answers

    def length_problem(self, request: dict[str, Any]) -> str | None:
        if not self.context:
            return None
        new = request.get("max_tokens") or self.default_max_tokens
        if new >= self.context:
            return f"max_tokens {new} is not below the model's context of {self.context} tokens"
        chars = sum(len(m["content"]) for m in request["messages"])
        if chars > (self.context - new) * self.chars_per_token:
            return f"the conversation ({chars} characters) is longer than the model's context of {self.context} tokens"
        ids = self.tokenizer.apply_chat_template(canonical(request["messages"]), add_generation_prompt=True)
        prompt = len(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        if prompt + new > self.context:
            return (
                f"the conversation is {prompt} tokens; with max_tokens {new} that is more than the model's context "
                f"of {self.context} tokens: shorten it or lower max_tokens"
            )
        return None

    def answer(self, request: dict[str, Any], params: dict[str, Any] | None) -> list[Any]:
        from transformers import StoppingCriteriaList, StopStringCriteria

        stop = request.get("stop")
        stops = [stop] if isinstance(stop, str) else (stop or [])
        last = LastToken()
        criteria = [last, *([StopStringCriteria(self.tokenizer, stops)] if stops else [])]
        extra = {**(params or {}), "stopping_criteria": StoppingCriteriaList(criteria)}
        single = {"messages": canonical(request["messages"])}
        if request.get("max_tokens"):
            single["max_tokens"] = request["max_tokens"]
        replies = self.wrapped.predict(single, extra)
        for reply in replies:
            for choice in reply["choices"]:
                content, found = cut_at_stop(choice["message"]["content"], stops)
                choice["message"]["content"] = content
                # MLflow says "length" when the answer has max_tokens tokens, even where the last was the end of
                # turn: the answer stopped when it ended on a stop token or a stop string
                choice["finish_reason"] = "stop" if found or last.token in self.stop_ids else "length"
        return replies

    def get_raw_model(self) -> Any:
        return self.wrapped.get_raw_model()


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> CheckedChat:
    from mlflow.transformers import _load_pyfunc as load_transformers

    return CheckedChat(load_transformers(path, model_config))
