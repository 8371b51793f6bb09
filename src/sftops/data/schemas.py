"""Row schemas -> canonical conversations. One small pure function per input schema; each raises RowError
(a counted kind + the detail) for a row that cannot become a training conversation.

Canonical message: {"role": "system"|"user"|"assistant"|"tool", "content": str}, plus, where given,
"weight" (0 or 1, assistant turns only: 0 = context, not a target), "tool_calls" (assistant), "tool_call_id"
and "name" (tool results). A conversation may carry a list of tool definitions ("tools")."""

from __future__ import annotations

import json
import re
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
# Accepted spellings that mean a canonical role: OpenAI's "developer" instructions are a system turn.
ROLE_ALIASES = {"developer": "system"}
SHAREGPT_ROLES = {
    "system": "system",
    "developer": "system",
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


def _top_key(path: str) -> str | None:
    """The top-level key a mapping path reads from: 'instances' of 'instances[0].output'."""
    parts = _PATH_PART.findall(path)
    return (parts[0][0] or None) if parts else None


def apply_mapping(fields: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    """The row with each schema key taken from where the source's field mapping says it is. A mapping moves a
    field, it does not copy it: the key it reads from is dropped unless it is itself a target (Dolly's
    `input: context` left `context` beside `input`, and from_alpaca joined the passage twice). All values are
    read before any key is dropped, so that a swap (`prompt: completion, completion: prompt`) works."""
    if not mapping:
        return fields
    moved = {key: get_path(fields, path) for key, path in mapping.items()}
    sources = {_top_key(path) for path in mapping.values()} - set(mapping)
    return {**{k: v for k, v in fields.items() if k not in sources}, **moved}


MULTIMODAL = "multimodal row"
MULTIMODAL_FIX = (
    "a text model cannot see images or audio: remove these rows, or list the field in data.sources[].ignore "
    "to train on the text alone"
)
PLACEHOLDER_FIX = (
    "a text model cannot see the image it stands for: remove these rows, or add the placeholder to "
    "data.sources[].ignore to train on it as plain text"
)
IMAGE_PARTS = {"image", "image_url", "input_image", "audio", "input_audio", "video"}
IMAGE_FIELDS = ("images", "image", "image_url", "audios", "audio", "videos", "video")
IMAGE_PLACEHOLDERS = ("<image>", "<|image|>", "<audio>", "<video>")


def _part_text(part: dict[str, Any]) -> str:
    # {"type": "text", "text": ...} (OpenAI) or {"type": "text", "value": ...} (a common export variant)
    return str(part.get("text", part.get("value", "")))


def _text(value: Any, what: str) -> str:
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        # content parts: text parts only; an image part is the multimodal refusal, any other kind is named.
        kinds = {str(p.get("type")) for p in value}
        if kinds & IMAGE_PARTS:
            raise RowError(MULTIMODAL, f"{what} has parts of type {sorted(kinds & IMAGE_PARTS)}; {MULTIMODAL_FIX}")
        if kinds - {"text"}:
            raise RowError(
                "unsupported content",
                f"{what} has parts of type {sorted(kinds - {'text'})}; only text parts are trained",
            )
        value = "".join(_part_text(p) for p in value)
    if not isinstance(value, str):
        raise RowError("wrong type", f"{what} is a {type(value).__name__}, expected text")
    return value


def _weight(value: Any, i: int, role: str) -> int:
    if isinstance(value, bool) or value not in (0, 1):
        raise RowError("invalid weight", f"message {i} has weight {value!r}, expected 0 or 1")
    if role != "assistant":
        raise RowError(
            "weight on a non-assistant turn", f"message {i} ({role}) has a weight; only assistant turns take one"
        )
    return int(value)


def _encoded_twice(arguments: Any) -> bool:
    """Tool-call arguments that are a JSON string holding another JSON string ('"{\\"city\\": ...}"'): an
    export that encoded them twice; the model would learn to write the escapes."""
    if not isinstance(arguments, str):
        return False
    try:
        return isinstance(json.loads(arguments), str)
    except ValueError:
        return False


def _tool_calls(value: Any, i: int) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise RowError("invalid tool call", f"message {i}: 'tool_calls' is not a non-empty list")
    for call in value:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RowError("invalid tool call", f"message {i}: a tool call lacks function.name")
        if _encoded_twice(fn.get("arguments")):
            raise RowError(
                "invalid tool call",
                f"message {i}: the arguments of {fn['name']!r} are JSON encoded twice (a string holding a JSON "
                "string); decode them once, to an object or its JSON text",
            )
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
        role = ROLE_ALIASES.get(m["role"], m["role"]) if isinstance(m["role"], str) else m["role"]
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
        if speaker == "function_call":
            raise RowError(
                "unsupported tool format",
                f"turn {i} is a 'function_call' turn (glaive / LLaMA-Factory tool format): convert the rows to OpenAI "
                "messages, each function_call an assistant turn with tool_calls [{type: function, function: {name, "
                "arguments}}] and each observation a tool turn",
            )
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
    system = fields.get("system") or fields.get("system_prompt")
    head = [{"role": "system", "content": _text(system, "'system'")}] if system else []
    if isinstance(prompt, list) and isinstance(response, list):
        # TRL's conversational prompt/completion: lists of messages.
        return head + from_messages(prompt) + from_messages(response)
    return head + [
        {"role": "user", "content": _text(prompt, f"'{what[0]}'")},
        {"role": "assistant", "content": _text(response, f"'{what[1]}'")},
    ]


def from_alpaca(fields: dict[str, Any]) -> list[Message]:
    """Alpaca (instruction, input, output) and Dolly (instruction, context, response): the input or context
    passage follows the instruction in the user turn."""
    instruction = _text(fields["instruction"], "'instruction'")
    extras = [_text(fields.get(key) or "", f"'{key}'") for key in ("input", "context")]
    # dict.fromkeys: a passage given as both input and context is joined once, never twice
    passages = dict.fromkeys(e for e in extras if e.strip())
    prompt = "\n\n".join([instruction, *passages])
    response_key = "output" if "output" in fields else "response"
    return _pair(fields, prompt, fields[response_key], ("instruction", response_key))


SCHEMAS = {
    # name: (keys that identify it, converter)
    "messages": (("messages",), lambda f: from_messages(f["messages"])),
    "openai": (("messages",), lambda f: from_messages(f["messages"])),
    "sharegpt": (("conversations",), lambda f: from_sharegpt(f["conversations"])),
    "conversation": (("conversation",), lambda f: from_turns(f["conversation"])),
    "alpaca": (("instruction", "output"), from_alpaca),
    "dolly": (("instruction", "response"), from_alpaca),
    "prompt_completion": (
        ("prompt", "completion"),
        lambda f: _pair(f, f["prompt"], f["completion"], ("prompt", "completion")),
    ),
    "prompt_response": (("prompt", "response"), lambda f: _pair(f, f["prompt"], f["response"], ("prompt", "response"))),
    "question_answer": (("question", "answer"), lambda f: _pair(f, f["question"], f["answer"], ("question", "answer"))),
}
AUTO_ORDER = (
    "messages",
    "sharegpt",
    "conversation",
    "alpaca",
    "dolly",
    "prompt_completion",
    "prompt_response",
    "question_answer",
)
# The row keys each schema reads besides its identifying keys: any other key is reported as unused.
_SYSTEM = ("system", "system_prompt")
OPTIONAL_KEYS = {
    "alpaca": ("input", "context", *_SYSTEM),
    "dolly": ("input", "context", *_SYSTEM),
    "prompt_completion": _SYSTEM,
    "prompt_response": _SYSTEM,
    "question_answer": _SYSTEM,
}
PROMPT_LIKE = ("instruction", "prompt", "question", "query", "input", "text", "problem")
RESPONSE_LIKE = ("output", "response", "answer", "completion", "target", "solution", "chosen")


SHOWN_KEYS = 12  # keys named in a reason: a wide export's hundred columns would push the fix out of the line


def key_list(keys: Any) -> str:
    """The row's keys for a reason, sorted, the first SHOWN_KEYS of them and how many more."""
    names = sorted(keys)
    more = f", ... {len(names) - SHOWN_KEYS} more" if len(names) > SHOWN_KEYS else ""
    return "[" + ", ".join(repr(k) for k in names[:SHOWN_KEYS]) + more + "]"


def _paths(fields: dict[str, Any]) -> list[str]:
    """The row's top-level keys, then the keys one level down (in an object, or the first object of a list) as
    mapping paths: 'completions[0].completion', 'instances[0].output'."""
    nested = []
    for key in sorted(fields):
        value = fields[key]
        inner, prefix = (value[0], f"{key}[0]") if isinstance(value, list) and value else (value, key)
        if isinstance(inner, dict):
            nested += [f"{prefix}.{k}" for k in inner if isinstance(k, str)]
    return sorted(fields) + nested


def _last(path: str) -> str:
    return path.rsplit(".", 1)[-1].lower()


def suggest_mapping(fields: dict[str, Any]) -> str:
    """What to write in params.yaml for rows like this, when their keys make the meaning plain: a mapping to a
    known schema, nested paths included (a list of completions, self-instruct's instances); the fix clause."""
    paths = _paths(fields)
    prompt = next((p for p in paths if _last(p) in PROMPT_LIKE), None)
    response = next((p for p in paths if _last(p) in RESPONSE_LIKE and p != prompt), None)
    if "instruction" in fields and response and "." in response:
        passage = response.rsplit(".", 1)[0] + ".input"  # self-instruct: the instance's input beside its output
        if passage in paths:
            return f"in params.yaml write schema: alpaca, fields: {{input: {passage}, output: {response}}}"
    if prompt and response:
        return f"in params.yaml write schema: prompt_completion, fields: {{prompt: {prompt}, completion: {response}}}"
    if prompt is not None and _last(prompt) == "text":
        return (
            "'text' holds pre-training text (whole documents), but SFT needs prompt/response pairs: export each as a "
            "prompt with its response (prompt/completion or messages rows)"
        )
    return (
        "in params.yaml write schema: prompt_completion, fields: {prompt: <the key of the question>, "
        "completion: <the key of the answer>}"
    )


def detect_schema(fields: dict[str, Any]) -> str:
    for name in AUTO_ORDER:
        if all(k in fields for k in SCHEMAS[name][0]):
            return name
    raise RowError(
        "no known schema",
        "expected 'messages', 'conversations' (ShareGPT), 'conversation', instruction/output, instruction/response, "
        f"prompt/completion, prompt/response or question/answer; found keys {key_list(fields)}; "
        f"{suggest_mapping(fields)}",
    )


def refuse_multimodal(fields: dict[str, Any], ignore: tuple[str, ...] = ()) -> None:
    """Images, audio or video in a row (a column, or a placeholder in the text) refused with one reason."""
    for key in IMAGE_FIELDS:
        if key not in ignore and fields.get(key) not in (None, "", []):
            raise RowError(MULTIMODAL, f"the row has a {key!r} field; {MULTIMODAL_FIX}")


def refuse_placeholders(messages: list[Message], ignore: tuple[str, ...] = ()) -> None:
    for i, m in enumerate(messages):
        for tag in IMAGE_PLACEHOLDERS:
            if tag in m["content"] and tag not in ignore:
                raise RowError(MULTIMODAL, f"message {i} ({m['role']}) has the placeholder {tag}; {PLACEHOLDER_FIX}")


PREFERENCE = "preference data"
# The column holding the preferred side of a pair: TRL's and LLaMA-Factory's `chosen`, LLaMA-Factory's newer
# `chosen_messages` (each side the whole conversation).
CHOSEN_KEYS = ("chosen", "chosen_messages")


def refuse_preference_pairs(
    raw: dict[str, Any], schema: str, mapping: dict[str, str], ignore: tuple[str, ...] = ()
) -> None:
    """Pairs of a chosen and a rejected answer (DPO data) refused with the fix: read whole, SFT would either
    find no schema or train on both sides."""
    chosen = next((k for k in CHOSEN_KEYS if k in raw and k not in ignore), None)
    if schema != "auto" or mapping or chosen is None:
        return
    keys = sorted(raw)
    if chosen == "chosen_messages":
        fix = "write schema: messages, fields: {messages: chosen_messages} to train on the chosen conversations"
    elif any(k.lower() in PROMPT_LIKE for k in keys):
        fix = suggest_mapping(raw)
    else:
        fix = "export them as conversations that end with the chosen response"
    raise RowError(
        PREFERENCE,
        f"found keys {key_list(keys)}: SFT trains on one response per prompt and {chosen!r} holds it; {fix}, "
        "or train them with a preference method (DPO)",
    )


def refuse_kto_labels(raw: dict[str, Any], ignore: tuple[str, ...] = ()) -> None:
    """KTO data (a conversation beside a boolean `label`, LLaMA-Factory's kto_en_demo) refused with the fix: a
    row labelled false holds an answer not to give, and SFT would train on it."""
    if isinstance(raw.get("label"), bool) and "label" not in ignore:
        raise RowError(
            PREFERENCE,
            f"found keys {key_list(raw)} with a true/false 'label' (KTO data): SFT would train on the answers labelled "
            "false too; keep only the rows labelled true and list 'label' in data.sources[].ignore, or train them "
            "with a preference method (KTO)",
        )


def _tools(fields: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = fields.get("tools")
    if tools is None:
        return None
    if isinstance(tools, str):  # glaive and LLaMA-Factory's tool data keep the definitions as JSON text
        try:
            tools = json.loads(tools)
        except ValueError:
            raise RowError("invalid tools", "'tools' is text but not JSON; give a list of tool definitions") from None
        if tools == []:
            return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowError("invalid tools", "'tools' is not a list of tool definitions")
    return tools


# Control characters (Unicode category Cc: U+0000-U+001F, U+007F-U+009F) other than tab and newlines, and lone
# surrogates: one regex scan (a per-character loop cost more than the tokenizer at a million rows).
_BAD_CHARACTER = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def _bad_characters(text: str) -> str | None:
    found = _BAD_CHARACTER.search(text)
    if found is None:
        return None
    code = ord(found.group())
    if 0xD800 <= code <= 0xDFFF:
        return f"a lone surrogate U+{code:04X} (not encodable as UTF-8)"
    return f"the control character U+{code:04X}"


# What a reader cannot see: whitespace, the Unicode format characters (category Cf: zero-width spaces and joiners,
# the BOM, bidi marks, tags; listed by range, tests/test_bad_rows.py checks them against unicodedata) and the Hangul
# fillers that render as blanks. A message made only of these is empty (a real row of open-instruct's evaluation
# file answers with a lone U+200B); one compiled fullmatch, no per-character loop, at a million rows.
_CF = (
    "\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064"
    "\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3"
    "\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f"
)
_FILLERS = "\u115f\u1160\u3164\uffa0"
_INVISIBLE = re.compile(f"[\\s{_CF}{_FILLERS}]*")


def is_blank(text: str) -> bool:
    """Nothing visible in the text: only whitespace, format characters or blank fillers."""
    return _INVISIBLE.fullmatch(text) is not None


def validate(messages: list[Message]) -> None:
    """What every conversation must satisfy to be trained on."""
    if not messages:
        raise RowError("empty conversation")
    for i, m in enumerate(messages):
        if m["role"] == "system" and i != 0:
            raise RowError("system turn not first", f"message {i} is a system turn")
        if not m.get("tool_calls") and is_blank(m["content"]):
            raise RowError(
                "empty message",
                f"message {i} ({m['role']}) is empty: nothing visible, only whitespace or invisible "
                "characters (zero-width, BOM); remove the row or give it its text",
            )
        bad = _bad_characters(m["content"])
        if bad:
            raise RowError("invalid characters", f"message {i} ({m['role']}) contains {bad}")
        if m["role"] == "tool" and not (i > 0 and messages[i - 1]["role"] in ("assistant", "tool")):
            raise RowError("tool result without a call", f"message {i} (tool) does not follow an assistant tool call")
    if messages[-1]["role"] != "assistant":
        raise RowError(
            "no final assistant turn", "the conversation ends with a non-assistant turn: no response to learn"
        )
    if not any(m["role"] == "user" for m in messages):
        raise RowError("no user turn")
    if all(m.get("weight", 1) == 0 for m in messages if m["role"] == "assistant"):
        raise RowError("no trainable turn", "every assistant turn has weight 0")


def unused_keys(raw: dict[str, Any], schema: str, mapping: dict[str, str], ignore: tuple[str, ...] = ()) -> list[str]:
    """The row's top-level keys that reach neither the conversation nor a declared mapping nor the ignore list."""
    used = set(SCHEMAS[schema][0]) | set(OPTIONAL_KEYS.get(schema, ())) | {"tools"} | set(ignore)
    used |= {_PATH_PART.findall(path)[0][0] for path in mapping.values() if _PATH_PART.findall(path)}
    return sorted(k for k in raw if k not in used)


def to_conversation(
    fields: dict[str, Any], schema: str = "auto", mapping: dict[str, str] | None = None, ignore: tuple[str, ...] = ()
) -> dict[str, Any]:
    """{"messages": [...], "tools": [...] or None, "unused": [keys]} for a raw row; RowError with the reason when
    it fits no schema or carries images."""
    raw = fields if isinstance(fields, dict) else {}
    refuse_multimodal(raw, ignore)
    refuse_preference_pairs(raw, schema, mapping or {}, ignore)
    refuse_kto_labels(raw, ignore)
    fields = apply_mapping(fields, mapping or {})
    name = detect_schema(fields) if schema == "auto" else schema
    keys, convert = SCHEMAS[name]
    missing = [k for k in keys if k not in fields]
    if missing:
        raise RowError("missing field", f"schema {name!r} needs {missing}; found keys {key_list(fields)}")
    messages = convert(fields)
    validate(messages)
    refuse_placeholders(messages, ignore)
    return {"messages": messages, "tools": _tools(fields), "unused": unused_keys(raw, name, mapping or {}, ignore)}
