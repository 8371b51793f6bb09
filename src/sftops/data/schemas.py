"""Row schemas -> canonical conversations. One small pure function per input schema; each raises RowError
(a counted kind + the detail) for a row that cannot become a training conversation.

Canonical message: {"role": "system"|"user"|"assistant"|"tool", "content": str}, plus, where given,
"weight" (0 or 1, assistant turns only: 0 = context, not a target), "tool_calls" (assistant), "tool_call_id"
and "name" (tool results). A conversation may carry a list of tool definitions ("tools")."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "observation": "tool",
}

Message = dict[str, Any]
_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


class RowError(ValueError):
    """This row cannot become a training conversation. `kind` is the category counted in the stats;
    the message (kind: detail) is what the rejected file records for the row."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def get_path(row: Any, path: str) -> Any:
    """A nested field by a dotted path with list indices: 'instances[0].output'."""
    node = row
    for key, index in _PATH_PART.findall(path):
        try:
            node = node[int(index)] if index else node[key]
        except (KeyError, IndexError, TypeError):
            raise RowError("mapped field missing", f"no {path!r} in the row") from None
    return node


def apply_mapping(fields: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    """The row with each schema key taken from where the source's field mapping says it is."""
    if not mapping:
        return fields
    return {**fields, **{key: get_path(fields, path) for key, path in mapping.items()}}


def _text(value: Any, what: str) -> str:
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        # OpenAI content parts: text parts only.
        kinds = {p.get("type") for p in value}
        if kinds - {"text"}:
            raise RowError("unsupported content", f"{what} has parts of type {sorted(map(str, kinds - {'text'}))}")
        value = "".join(str(p.get("text", "")) for p in value)
    if not isinstance(value, str):
        raise RowError("wrong type", f"{what} is a {type(value).__name__}, expected text")
    return value


def _weight(value: Any, i: int, role: str) -> int:
    if isinstance(value, bool) or value not in (0, 1):
        raise RowError("invalid weight", f"message {i} has weight {value!r}, expected 0 or 1")
    if role != "assistant":
        raise RowError("weight on a non-assistant turn", f"message {i} ({role}) has a weight; only assistant turns take one")
    return int(value)


def _tool_calls(value: Any, i: int) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise RowError("invalid tool call", f"message {i}: 'tool_calls' is not a non-empty list")
    for call in value:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RowError("invalid tool call", f"message {i}: a tool call lacks function.name")
    return value


def from_messages(messages: Any) -> list[Message]:
    """Chat messages with role/content (OpenAI fine-tuning JSONL included: weight, tool_calls, tool turns)."""
    if not isinstance(messages, list):
        raise RowError("wrong type", f"'messages' is a {type(messages).__name__}, expected a list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RowError("message not an object", f"message {i} is a {type(m).__name__}")
        if "role" not in m:
            raise RowError("missing field", f"message {i} lacks 'role'")
        role = m["role"]
        if role not in ROLES:
            raise RowError("unknown role", f"message {i} has role {role!r} (allowed: {', '.join(ROLES)})")
        msg: Message = {"role": role}
        if role == "assistant" and m.get("tool_calls") is not None:
            msg["tool_calls"] = _tool_calls(m["tool_calls"], i)
            msg["content"] = _text(m.get("content") or "", f"message {i} content")
        elif "content" not in m:
            raise RowError("missing field", f"message {i} lacks 'content'")
        else:
            msg["content"] = _text(m["content"], f"message {i} content")
        if "weight" in m:
            msg["weight"] = _weight(m["weight"], i, role)
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if isinstance(m.get(key), str):
                    msg[key] = m[key]
        out.append(msg)
    return out


def from_sharegpt(conversations: Any) -> list[Message]:
    """ShareGPT: 'conversations' as [{"from": "human"|"gpt"|"system", "value": ...}]."""
    if not isinstance(conversations, list):
        raise RowError("wrong type", f"'conversations' is a {type(conversations).__name__}, expected a list")
    out = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise RowError("message not an object", f"turn {i} is a {type(turn).__name__}")
        if "from" not in turn or "value" not in turn:
            raise RowError("missing field", f"turn {i} lacks 'from' or 'value'")
        speaker = turn["from"]
        if speaker not in SHAREGPT_ROLES:
            raise RowError("unknown role", f"turn {i} is from {speaker!r} (allowed: {', '.join(SHAREGPT_ROLES)})")
        out.append({"role": SHAREGPT_ROLES[speaker], "content": _text(turn["value"], f"turn {i} value")})
    return out


def from_turns(turns: Any) -> list[Message]:
    """chatterbot-style: a list of strings, alternating user and assistant, starting with the user."""
    if not isinstance(turns, list):
        raise RowError("wrong type", "'conversation' is not a list of turns")
    return [
        {"role": "user" if i % 2 == 0 else "assistant", "content": _text(t, f"turn {i}")} for i, t in enumerate(turns)
    ]


def _pair(fields: dict[str, Any], prompt: Any, response: Any, what: tuple[str, str]) -> list[Message]:
    system = fields.get("system")
    head = [{"role": "system", "content": _text(system, "'system'")}] if system else []
    if isinstance(prompt, list) and isinstance(response, list):
        # TRL's conversational prompt/completion: lists of messages.
        return head + from_messages(prompt) + from_messages(response)
    return head + [
        {"role": "user", "content": _text(prompt, f"'{what[0]}'")},
        {"role": "assistant", "content": _text(response, f"'{what[1]}'")},
    ]


def from_alpaca(fields: dict[str, Any]) -> list[Message]:
    instruction = _text(fields["instruction"], "'instruction'")
    extra = _text(fields.get("input") or "", "'input'")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return _pair(fields, prompt, fields["output"], ("instruction", "output"))


SCHEMAS = {
    # name: (keys that identify it, converter)
    "messages": (("messages",), lambda f: from_messages(f["messages"])),
    "openai": (("messages",), lambda f: from_messages(f["messages"])),
    "sharegpt": (("conversations",), lambda f: from_sharegpt(f["conversations"])),
    "conversation": (("conversation",), lambda f: from_turns(f["conversation"])),
    "alpaca": (("instruction", "output"), from_alpaca),
    "prompt_completion": (("prompt", "completion"), lambda f: _pair(f, f["prompt"], f["completion"], ("prompt", "completion"))),
    "question_answer": (("question", "answer"), lambda f: _pair(f, f["question"], f["answer"], ("question", "answer"))),
}
AUTO_ORDER = ("messages", "sharegpt", "conversation", "alpaca", "prompt_completion", "question_answer")


def detect_schema(fields: dict[str, Any]) -> str:
    for name in AUTO_ORDER:
        if all(k in fields for k in SCHEMAS[name][0]):
            return name
    raise RowError(
        "no known schema",
        "expected 'messages', 'conversations' (ShareGPT), 'conversation', instruction/output, prompt/completion "
        f"or question/answer (or a field mapping in params.yaml); found keys {sorted(fields)}",
    )


def _tools(fields: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = fields.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowError("invalid tools", "'tools' is not a list of tool definitions")
    return tools


def _bad_characters(text: str) -> str | None:
    for ch in text:
        if 0xD800 <= ord(ch) <= 0xDFFF:
            return f"a lone surrogate U+{ord(ch):04X} (not encodable as UTF-8)"
        if ch not in "\n\r\t" and unicodedata.category(ch) == "Cc":
            return f"the control character U+{ord(ch):04X}"
    return None


def validate(messages: list[Message]) -> None:
    """What every conversation must satisfy to be trained on."""
    if not messages:
        raise RowError("empty conversation")
    for i, m in enumerate(messages):
        if m["role"] == "system" and i != 0:
            raise RowError("system turn not first", f"message {i} is a system turn")
        if not m["content"].strip() and not m.get("tool_calls"):
            raise RowError("empty message", f"message {i} ({m['role']}) is empty or whitespace")
        bad = _bad_characters(m["content"])
        if bad:
            raise RowError("invalid characters", f"message {i} ({m['role']}) contains {bad}")
        if m["role"] == "tool" and not (i > 0 and messages[i - 1]["role"] in ("assistant", "tool")):
            raise RowError("tool result without a call", f"message {i} (tool) does not follow an assistant tool call")
    if messages[-1]["role"] != "assistant":
        raise RowError("no final assistant turn", "the conversation ends with a non-assistant turn: no response to learn")
    if not any(m["role"] == "user" for m in messages):
        raise RowError("no user turn")
    if all(m.get("weight", 1) == 0 for m in messages if m["role"] == "assistant"):
        raise RowError("no trainable turn", "every assistant turn has weight 0")


def to_conversation(fields: dict[str, Any], schema: str = "auto", mapping: dict[str, str] | None = None) -> dict[str, Any]:
    """{"messages": [...], "tools": [...] or None} for a raw row; RowError with the reason when it fits no schema."""
    fields = apply_mapping(fields, mapping or {})
    name = detect_schema(fields) if schema == "auto" else schema
    keys, convert = SCHEMAS[name]
    missing = [k for k in keys if k not in fields]
    if missing:
        raise RowError("missing field", f"schema {name!r} needs {missing}; found keys {sorted(fields)}")
    messages = convert(fields)
    validate(messages)
    return {"messages": messages, "tools": _tools(fields)}
