"""Content hashes that identify what a result was made from: files, tokenizers, chat templates, configs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def json_sha256(value: Any) -> str:
    """Hash of a JSON value in canonical form (sorted keys), e.g. a whole configuration."""
    return text_sha256(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def chat_template_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    template = tokenizer.chat_template
    return text_sha256(template if isinstance(template, str) else json.dumps(template, sort_keys=True))


def tokenizer_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    """The vocabulary and rules (the fast tokenizer's serialisation), the special tokens and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return json_sha256({"tokenizer": text_sha256(body), "special": tokenizer.special_tokens_map, "template": chat_template_sha256(tokenizer)})
