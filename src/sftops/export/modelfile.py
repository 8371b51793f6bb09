"""An Ollama Modelfile for the exported GGUF, its TEMPLATE generated from the chat template training used: each
role's text before and after its content is read off the Jinja template by rendering marker messages, then
written as Ollama's Go template; its stop parameters are the tokens training closes a turn with."""

from __future__ import annotations

from typing import Any

from sftops.chat import render, stop_token_ids

MARK = "\u2063{}\u2063"


def role_affixes(tokenizer: Any) -> dict[str, tuple[str, str]]:
    """Per role, the text the template puts before and after a message's content: what rendering one more message
    adds, split at its content; 'start' is what it writes before any message (BOS), 'generation' the prompt that
    asks for the assistant's turn."""
    roles = ["system", "user", "assistant"]
    messages = [{"role": r, "content": MARK.format(r)} for r in roles]
    first = render(tokenizer, messages[:1])
    second = render(tokenizer, messages[:2])[len(first) :]
    bos = tokenizer.bos_token
    # BOS written once before the conversation, unless every turn opens with it (ChatML's <|im_start|> as BOS)
    start = bos if bos and first.startswith(bos) and not second.startswith(bos) else ""
    affixes, before = {"start": (start, "")}, start
    for i, role in enumerate(roles):
        through = render(tokenizer, messages[: i + 1])
        added = through[len(before) :]
        prefix, _, suffix = added.partition(MARK.format(role))
        affixes[role] = (prefix, suffix)
        before = through
    asked = render(tokenizer, messages[:2], generation_prompt=True)
    affixes["generation"] = (asked[len(render(tokenizer, messages[:2])) :], "")
    return affixes


def default_system(tokenizer: Any, affixes: dict[str, tuple[str, str]]) -> str | None:
    """The system message the chat template writes when a conversation has none (SmolLM2's "You are a helpful
    AI assistant named SmolLM, ..."), for the Modelfile's SYSTEM: Ollama then adds it as the template did."""
    user = MARK.format("user")
    head = render(tokenizer, [{"role": "user", "content": user}]).partition(user)[0]
    start, (prefix, suffix), before_user = affixes["start"][0], affixes["system"], affixes["user"][0]
    extra = head[len(start) : len(head) - len(before_user)]
    if not extra or not (extra.startswith(prefix) and extra.endswith(suffix)):
        return None
    return extra[len(prefix) : len(extra) - len(suffix)]


def _go(text: str) -> str:
    return text.replace("{{", '{{ "{{" }}')


def modelfile(tokenizer: Any, gguf_name: str) -> str:
    a = role_affixes(tokenizer)
    template = (
        _go(a["start"][0])
        + "{{- range .Messages }}"
        + "".join(
            f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}'
            f"{_go(a[role][0])}{{{{ .Content }}}}{_go(a[role][1])}"
            for i, role in enumerate(("system", "user", "assistant"))
        )
        + "{{ end }}{{ end }}"
        + _go(a["generation"][0])
    )
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)]
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    system = default_system(tokenizer, a)
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += ["PARAMETER temperature 0", "PARAMETER top_k 1"]  # greedy, as evaluated
    return "\n".join(lines) + "\n"
