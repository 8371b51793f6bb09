"""The base model's evaluation, cached on disk by (model, data, eval params): re-evaluating a new fine-tune of
the same base on the same test split (or regression suite) does not score and generate with the base model again.

The cache lives in $SFTOPS_CACHE_DIR (default: .sftops-cache/ in the project folder, see workspace.py), one JSON
file per key: base-eval/<sha256>.json. Deleting the folder is always safe."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

from sftops.config import ModelConfig
from sftops.modeling import check_base, resolve_base
from sftops.provenance.fingerprints import file_sha256, json_sha256
from sftops.workspace import cache_root


def cache_dir() -> Path:
    return cache_root() / "base-eval"


def model_fingerprint(model: dict[str, Any]) -> dict[str, Any]:
    """The base model config, with the commit its hub revision resolves to (a hub id alone does not fix the
    weights: its branches move; the model folder's manifest records the commit, older ones are resolved now), or
    the content hash of its files when it is a local folder or package."""
    place = Path(resolve_base(model["base"]))
    files = {}
    if place.is_dir():
        chosen = (
            [place / model["gguf_file"]]
            if model.get("gguf_file")
            else sorted(p for p in place.iterdir() if p.is_file())
        )
        files = {p.name: file_sha256(p) for p in chosen if p.exists()}
        return {"config": model, "files": files}
    return {"config": model, "commit": check_base(ModelConfig.model_validate(model)), "files": files}


def cache_key(
    model: dict[str, Any], data_sha256: str, tokenizer_sha256: str, eval_params: dict[str, Any], device: str
) -> str:
    """sha256 of everything the base model's scores and outputs depend on; data_sha256: the test split file's
    sha256, or a regression suite's (its rows as evaluated)."""
    key = {
        "model": model_fingerprint(model),
        "test_data": data_sha256,
        "tokenizer": tokenizer_sha256,
        "eval": eval_params,
        "device": device,
        "libraries": {pkg: version(pkg) for pkg in ("torch", "transformers")},
    }
    return json_sha256(key)


def load(key: str) -> dict[str, Any] | None:
    path = cache_dir() / f"{key}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def store(key: str, value: dict[str, Any]) -> Path:
    path = cache_dir() / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value), encoding="utf-8")
    tmp.replace(path)  # atomic: a crashed run never leaves a half-written entry
    return path
