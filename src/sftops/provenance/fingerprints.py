"""Content hashes that identify what a result was made from: files, tokenizers, chat templates, configs."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftops.workspace import cache_root

if TYPE_CHECKING:  # the flow and the data stages use these hashes without loading transformers
    from transformers import PreTrainedTokenizerBase


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def json_sha256(value: Any) -> str:
    """Hash of a JSON value in canonical form (sorted keys), e.g. a whole configuration."""
    return text_sha256(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str))


# Digests of large files, remembered while a file keeps its inode, size and mtime (the signature DVC's own state
# database trusts): train start-up needs the md5 (DVC's directory hash) and the sha256 (the run manifest, the
# tokenised cache's key) of gigabytes of curated data, which the format stage has just hashed. Remembered in this
# process and in a small JSON file in the cache folder (DIGESTS_FILE), outside every DVC output: a record inside
# data/curated would be part of the folder's DVC hash, and the mtimes it must hold differ between two runs that
# write the same bytes, so the same data would get a new DVC version and miss DVC's run-cache. Keyed by (device,
# inode), not path: the format stage writes into a temporary folder that it then renames to data/curated, which
# keeps inodes and mtimes. A DVC checkout writes new files (new inodes, mtimes): they are hashed again, as they
# must be. Small files are hashed every time: cheap, and no same-size rewrite within the clock's granularity can
# be missed; a file of REMEMBER_FROM_BYTES or more takes longer to write than a clock tick. Only a writer that
# puts the old mtime back by hand (touch -r) on a same-size change fools it, as it fools DVC.
_REMEMBERED: dict[str, dict[str, Any]] = {}
REMEMBER_FROM_BYTES = 16 << 20
DIGESTS_FILE = "digests.json"
KEEP_DIGESTS = 4096  # the most recently hashed files the JSON file keeps (about 200 bytes each)
ALGORITHMS = ("md5", "sha256")


def _digest_store() -> Path:
    return cache_root() / DIGESTS_FILE


def _signature(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns]


def _stored() -> dict[str, dict[str, Any]]:
    """The digests other processes recorded ({} when there is no readable file: it is only a shortcut)."""
    try:
        stored = json.loads(_digest_store().read_text())
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def _record(key: str, entry: dict[str, Any]) -> None:
    """Add one entry to the JSON file: written aside and renamed, so a concurrent reader (another torchrun
    process) sees the old or the new file; two writers at once may lose an entry, which only costs a re-hash."""
    _REMEMBERED[key] = entry
    store = _digest_store()
    entries = {k: v for k, v in _stored().items() if k != key}
    entries[key] = entry
    kept = dict(list(entries.items())[-KEEP_DIGESTS:])  # insertion order: the oldest go first
    tmp = store.parent / f".{store.name}.{os.getpid()}.tmp"
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(kept) + "\n")
        os.replace(tmp, store)
    except OSError:  # a read-only cache folder: the digests stay remembered in this process only
        tmp.unlink(missing_ok=True)


def _hash_file(path: Path) -> dict[str, str]:
    """md5 and sha256 of a file in one read, in 1 MiB blocks (bounded memory), each block hashed by both at
    once: hashlib lets go of the GIL on large blocks, so a second thread, on the second core, takes sha256 while
    this one takes md5 (the format stage hashes gigabytes as it finishes)."""
    first, *others = (hashlib.new(name) for name in ALGORITHMS)
    with path.open("rb") as fh, ThreadPoolExecutor(max_workers=len(others)) as pool:
        for block in iter(lambda: fh.read(1 << 20), b""):
            pending = [pool.submit(digest.update, block) for digest in others]
            first.update(block)
            for job in pending:
                job.result()
    return {name: digest.hexdigest() for name, digest in zip(ALGORITHMS, (first, *others))}


def file_digests(path: str | Path) -> dict[str, str]:
    """{"md5", "sha256"} of a file's bytes: remembered ones while the file keeps its inode, size and mtime."""
    path = Path(path)
    stat = path.stat()
    if stat.st_size < REMEMBER_FROM_BYTES:
        return _hash_file(path)
    key, signature = f"{stat.st_dev}:{stat.st_ino}", _signature(stat)
    for entry in (_REMEMBERED.get(key), _stored().get(key)):
        if entry and entry.get("signature") == signature and all(name in entry for name in ALGORITHMS):
            _REMEMBERED[key] = entry
            return {name: entry[name] for name in ALGORITHMS}
    digests = _hash_file(path)
    _record(key, {"signature": signature, "path": str(path.resolve()), **digests})
    return digests


def remember_digests(folder: str | Path) -> None:
    """Hash every large file under `folder` now (the stage that wrote them), so that the stages reading them
    find the digests recorded and do not read the bytes again."""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            file_digests(path)


def file_sha256(path: str | Path) -> str:
    return file_digests(path)["sha256"]


def file_md5(path: str | Path) -> str:
    return file_digests(path)["md5"]


def chat_template_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    template = tokenizer.chat_template
    return text_sha256(template if isinstance(template, str) else json.dumps(template, sort_keys=True))


def tokenizer_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    """The vocabulary and rules (the fast tokenizer's serialisation), the special tokens and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return json_sha256(
        {
            "tokenizer": text_sha256(body),
            "special": tokenizer.special_tokens_map,
            "template": chat_template_sha256(tokenizer),
        }
    )
