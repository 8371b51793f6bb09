"""The python_function entry point of a logged sftops chat model (MLmodel: loader_module served_chat): MLflow's
transformers pyfunc, behind a check of each conversation. The chat schema checks types only; a conversation with
an unknown role or no turns would render as nonsense or fail inside the template (a 500), so it is refused here
with error code BAD_REQUEST, which `mlflow models serve` answers as HTTP 400 with the reason.

Shipped in the model's code/ folder and imported there: it must need nothing but mlflow (no sftops)."""

from __future__ import annotations

from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST

ROLES = ("system", "user", "assistant")


def conversation_problem(messages: Any) -> str | None:
    """Why a value is not a conversation to answer, or None."""
    if not isinstance(messages, (list, tuple)) or not messages:
        return "messages must be a non-empty list of {role, content} objects"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{i}] must be an object with role and content"
        if message.get("role") not in ROLES:
            return f"messages[{i}].role is {message.get('role')!r}; it must be one of {', '.join(ROLES)}"
        if not isinstance(message.get("content"), str):
            return f"messages[{i}].content must be a string"
    if messages[-1]["role"] == "assistant":
        return "the last message is the assistant's; end with a user message for the model to answer"
    return None


def conversations(data: Any) -> list[Any]:
    if hasattr(data, "columns"):  # a DataFrame, after MLflow's schema enforcement
        return list(data["messages"]) if "messages" in data.columns else [None]
    if isinstance(data, dict):
        return [data.get("messages")]
    return [None]


class CheckedChat:
    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        for row, messages in enumerate(conversations(data)):
            if hasattr(messages, "tolist"):  # numpy arrays come back from pandas
                messages = messages.tolist()
            if problem := conversation_problem(messages):
                raise MlflowException(f"invalid chat request (row {row}): {problem}", error_code=BAD_REQUEST)
        return self.wrapped.predict(data, params)

    def get_raw_model(self) -> Any:
        return self.wrapped.get_raw_model()


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> CheckedChat:
    from mlflow.transformers import _load_pyfunc as load_transformers

    return CheckedChat(load_transformers(path, model_config))
