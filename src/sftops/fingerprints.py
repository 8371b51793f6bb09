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


# Digests of large files, computed once per process while a file keeps its size, mtime and inode (as DVC's
# state keys them): train start-up hashes the same gigabytes of curated data for several records otherwise.
# Small files are re-hashed every time: cheap, and a same-size rewrite within the clock's granularity stays seen.
_REMEMBERED: dict[tuple, str] = {}
REMEMBER_FROM_BYTES = 16 << 20


def _stat_key(paths: list[Path], name: str) -> tuple | None:
    stats = [p.stat() if p.exists() else None for p in paths]
    if sum(s.st_size for s in stats if s) < REMEMBER_FROM_BYTES:
        return None
    return (name, *((str(p.resolve()), s and (s.st_size, s.st_mtime_ns, s.st_ino)) for p, s in zip(paths, stats)))


def stream_digest(paths: list[Path], algorithm: str) -> str:
    """One digest of the files' bytes end to end (a missing file adds b"-"), read in 1 MiB blocks."""
    key = _stat_key(paths, algorithm)
    if key is not None and key in _REMEMBERED:
        return _REMEMBERED[key]
    digest = hashlib.new(algorithm)
    for path in paths:
        if not path.exists():
            digest.update(b"-")
            continue
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    if key is not None:
        _REMEMBERED[key] = digest.hexdigest()
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    return stream_digest([Path(path)], "sha256")


def chat_template_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    template = tokenizer.chat_template
    return text_sha256(template if isinstance(template, str) else json.dumps(template, sort_keys=True))


def tokenizer_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    """The vocabulary and rules (the fast tokenizer's serialisation), the special tokens and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return json_sha256({"tokenizer": text_sha256(body), "special": tokenizer.special_tokens_map, "template": chat_template_sha256(tokenizer)})
