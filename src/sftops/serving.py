"""The fine-tuned model as an MLflow pyfunc: `mlflow.pyfunc.load_model(uri).predict(["a question"])`."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

import mlflow.pyfunc


def pip_requirements() -> list[str]:
    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "transformers", "peft", "tokenizers", "safetensors", "mlflow")]


class SFTChatModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from sftops.modeling import load_finetuned

        self.model, self.tokenizer = load_finetuned(context.artifacts["model"])

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would validate against them
        from sftops.generation import answer

        if hasattr(model_input, "columns"):  # a pandas DataFrame
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            questions = [str(q) for q in model_input[column]]
        elif isinstance(model_input, str):
            questions = [model_input]
        else:
            questions = [str(q) for q in model_input]
        max_new_tokens = int((params or {}).get("max_new_tokens", 64))
        return answer(self.model, self.tokenizer, questions, max_new_tokens)
