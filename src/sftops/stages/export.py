"""Stage 5, export: the copies of the fine-tuned model that deployers run, each checked against the model that
was evaluated. For each quantisation in export.gguf, a GGUF file for llama.cpp and Ollama written from the merged
weights and the training tokenizer (export/gguf.py) with its Ollama Modelfile (export/modelfile.py), read back and
compared on export.rows test rows: greedy answers, stops, response NLL (export/verify.py); the LoRA adapter
against vLLM's rules with its `vllm serve` line (export/vllm.py). All in paths.exports, and logged on the
registered version (tracking/exports.py)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftops.config import Config
from sftops.data.store import read_split
from sftops.evaluate.parity import Answer, parity_rows
from sftops.export import vllm
from sftops.export.gguf import write_gguf
from sftops.export.modelfile import modelfile
from sftops.export.verify import answers, verify_gguf
from sftops.jsonio import read_json, require, write_json
from sftops.layout import EXPORT_PARITY, GGUF_FILE, MODEL_DIR, MODELFILE, RUN_FILE, VLLM_CHECK
from sftops.modeling import load_finetuned
from sftops.outputs import replaced_whole
from sftops.tracking.exports import log_exports

TIMES = ("write_seconds", "verify_seconds")


@dataclass(frozen=True)
class ExportResult:
    gguf: dict[str, dict[str, Any]]  # per quantisation: its parity block (figures, verdict, bytes, seconds)
    vllm: dict[str, Any]  # the adapter against vLLM's rules, and its serve line
    files: list[str]


def run_export(cfg: Config) -> ExportResult:
    run_info = read_json(require(Path(cfg.paths.model) / RUN_FILE, "train"))
    model_dir = require(Path(cfg.paths.model) / MODEL_DIR, "train")
    model, tokenizer = load_finetuned(model_dir)
    rows, evaluated = evaluated_answers(cfg, model, tokenizer)
    # not the version: the files are the same whichever door (dvc repro, the flow) ran the stage, as DVC records
    name = run_info.get("registered_model", "model")
    exports = Path(cfg.paths.exports)
    with replaced_whole(exports) as out:
        served = vllm.check_model(model_dir, name)
        write_json(out / VLLM_CHECK, served)
        merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        gguf = {q: export_gguf(cfg, merged, tokenizer, out, q, rows, evaluated, name) for q in cfg.export.gguf}
        figures = {q: {k: v for k, v in b.items() if k not in TIMES} for q, b in gguf.items()}  # times: MLflow's
        write_json(out / EXPORT_PARITY, {"rows": [r["id"] for r in rows], "gguf": figures})
    files = sorted(p for p in exports.iterdir() if p.is_file())
    log_exports(run_info, gguf, served, files)
    return ExportResult(gguf, served, [str(f) for f in files])


def evaluated_answers(cfg: Config, model: Any, tokenizer: Any) -> tuple[list[dict[str, Any]], list[Answer]]:
    """export.rows test rows (seeded by evaluate.sample_seed) that fit model.max_length, and the evaluated model's
    greedy answers (evaluate.max_new_tokens, one prompt at a time) and response NLL on them."""
    test = read_split(cfg.paths.curated, "test")
    rows = [test[i] for i in parity_rows(len(test), cfg.export.rows, cfg.evaluate.sample_seed)]
    done = answers(model, tokenizer, rows, cfg.evaluate.max_new_tokens, cfg.model.max_length)
    kept = [i for i, a in enumerate(done) if math.isfinite(a.nll)]  # a row over max_length is not scored
    return [rows[i] for i in kept], [done[i] for i in kept]


def export_gguf(
    cfg: Config,
    merged: Any,
    tokenizer: Any,
    out: Path,
    quant: str,
    rows: list[dict[str, Any]],
    evaluated: list[Answer],
    name: str,
) -> dict[str, Any]:
    """One GGUF file and its Modelfile, read back and compared with the evaluated answers: its parity block."""
    started, path = time.monotonic(), out / GGUF_FILE.format(quant=quant)
    try:
        write_gguf(merged, tokenizer, path, quant, name)
    except ValueError as exc:  # an architecture or tokenizer the writer does not know: said, and the run goes on
        path.unlink(missing_ok=True)
        return {"checked": False, "passed": False, "reason": f"not exported: {exc}"}
    (out / MODELFILE.format(quant=quant)).write_text(modelfile(tokenizer, path.name), encoding="utf-8")
    written = time.monotonic()
    block = verify_gguf(
        path, evaluated, rows, cfg.evaluate.max_new_tokens, cfg.model.max_length, cfg.export.nll_tolerance
    )
    return {**block, "write_seconds": written - started, "verify_seconds": time.monotonic() - written}
