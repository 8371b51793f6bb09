"""`python -m sftops.tracking.served_probe REQUEST.json RESULT.json`: the registered model as a server has it, in a
process of its own (nothing of the evaluating process: no model, tokenizer or patched module in memory).

The model is loaded with `mlflow.pyfunc.load_model` of its registry URI, as `mlflow models serve` loads it;
each parity row's conversation is answered through its `predict` (the served entry point, served_chat, with the
logged decoding), and its reference answer is scored with the weights and tokenizer that pyfunc holds, encoded
as the evaluate stage encodes test rows. The result: per row the answer, whether it stopped, its response NLL
per token; and how long loading and answering took."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def probe(request: dict[str, Any]) -> dict[str, Any]:
    import mlflow
    import torch

    from sftops.data.examples import encode_curated_rows
    from sftops.train.loss import score_rows

    started = time.monotonic()
    served = mlflow.pyfunc.load_model(request["model_uri"])
    loaded = time.monotonic() - started
    answers, seconds = [], []
    for row in request["rows"]:
        payload = {"messages": row["messages"][:-1], "max_tokens": request["max_new_tokens"]}
        started = time.monotonic()
        [reply] = served.predict(payload)
        seconds.append(time.monotonic() - started)
        choice = reply["choices"][0]
        answers.append({"text": choice["message"]["content"].strip(), "stopped": choice["finish_reason"] == "stop"})
    pipeline = served.get_raw_model()
    tokenizer = pipeline.tokenizer
    examples, kept, _ = encode_curated_rows(tokenizer, request["rows"], request["max_length"], request["overflow"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = score_rows(pipeline.model, examples, 1, pad, torch.device("cpu"), desc="score served model")
    nll = [float("nan")] * len(request["rows"])  # a row the served tokenizer cannot encode has no NLL
    for i, (total, count) in zip(kept, scores):
        nll[i] = total / max(count, 1)
    for answer, value in zip(answers, nll):
        answer["nll"] = value
    return {"answers": answers, "load_seconds": loaded, "answer_seconds": seconds}


def main(argv: list[str]) -> int:
    request_file, result_file = (Path(a) for a in argv)
    result = probe(json.loads(request_file.read_text()))
    result_file.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
