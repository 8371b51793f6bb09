"""Conversations -> token ids and loss labels, fast: every conversation is rendered with the tokenizer's chat
template (compiled once), then all texts are tokenised in one batched call, and the labels are the tokens that
start inside the character spans of the assistant turns (weight-0 turns and tool definitions of the OpenAI
format included); then the max_length overflow policy. The only tokeniser: the format stage, train and evaluate
without a cache, the tests and the benchmarks all encode here."""

from __future__ import annotations

import copy
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from sftops.chat import target_spans
from sftops.encoded import IGNORE, Encoded
from sftops.errors import DataError, ModelError

Conversation = dict[str, Any]  # {"messages": [...], "tools": [...] | None}


class Renderer:
    """The tokenizer's chat template, compiled once and rendered with the variables apply_chat_template
    passes (the special tokens), without its per-call overhead: jinja's Template.render walks the template's
    globals (a ChainMap, slow to iterate) twice per call, copying them into the context's dict and listing
    their names; here they are copied once, and each call gets the same variables render() would give."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        from jinja2.runtime import new_context  # jinja2 comes with transformers' chat templates
        from transformers.utils.chat_template_utils import _compile_jinja_template

        if not tokenizer.chat_template:
            raise ModelError("the tokenizer has no chat template (load it with sftops.modeling.load_tokenizer)")
        self.template = _compile_jinja_template(tokenizer.chat_template)
        self.special = dict(tokenizer.special_tokens_map)
        self.globals = dict(self.template.globals)
        self.variables = {**self.globals, "documents": None, **self.special}
        self.new_context = new_context
        self.backend = _own_backend(tokenizer)

    def __call__(self, messages: list[dict], tools: list | None = None, generation_prompt: bool = False) -> str:
        template = self.template
        variables = {**self.variables, "messages": messages, "tools": tools, "add_generation_prompt": generation_prompt}
        context = self.new_context(template.environment, template.name, template.blocks, variables, True, self.globals)
        try:
            return template.environment.concat(template.root_render_func(context))
        except Exception:
            template.environment.handle_exception()  # what render() raises: the error, its traceback in the template
            raise


def response_spans(render: Renderer, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
    tools = conv.get("tools")
    return target_spans(conv["messages"], lambda prefix, gen: render(prefix, tools, generation_prompt=gen))


def _own_backend(tokenizer: PreTrainedTokenizerBase) -> Any:
    """A private copy of a fast tokenizer's Rust backend with padding and truncation off, or None. Asked
    directly, the backend skips transformers' per-row conversion to Python dicts (a quarter of the format
    stage's time); a copy, because the shared backend keeps whatever padding a previous padded call set
    (generation pads its batches) and would pad these rows too."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return None
    own = copy.deepcopy(backend)
    own.no_padding()
    own.no_truncation()
    return own


def _first_token_from(encoding: Any, pos: int, n_chars: int) -> int:
    """Index of the first token whose start offset is at or after character pos, asked of the Rust encoding
    directly (converting every token's offsets to Python tuples cost a tenth of the format stage). A position
    no token covers (whitespace that trim_offsets leaves out) moves on to the next covered one; a token that
    starts before pos is not counted; empty-offset tokens at or after pos are."""
    token = None
    for char in range(pos, n_chars):
        token = encoding.char_to_token(char)
        if token is not None:
            break
    if token is None:
        token = len(encoding.ids)
    elif encoding.token_to_chars(token)[0] < pos:
        token += 1
    while token > 0 and encoding.token_to_chars(token - 1)[0] >= pos:
        token -= 1
    return token


def _token_runs(
    render: Renderer, tokenizer: PreTrainedTokenizerBase, rendered: list[tuple[str, list[tuple[int, int]]]]
) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Each text's token ids (no special tokens added) and, per character span, the run of tokens starting
    inside it: (first, end) token indices. Token starts never decrease along a text, so a span's tokens are
    one run (the test against transformers' apply_chat_template checks this per token)."""
    texts = [text for text, _ in rendered]
    if render.backend is not None:
        encodings = render.backend.encode_batch(texts, add_special_tokens=False)
        return [
            (e.ids, [(_first_token_from(e, lo, len(t)), _first_token_from(e, hi, len(t))) for lo, hi in spans])
            for e, (t, spans) in zip(encodings, rendered)
        ]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for ids, offsets, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], rendered):
        offsets = [tuple(o) for o in offsets]
        out.append((ids, [(bisect_left(offsets, (lo, -1)), bisect_left(offsets, (hi, -1))) for lo, hi in spans]))
    return out


def labels_of(ids: list[int], runs: list[tuple[int, int]]) -> list[int]:
    """ids inside the target runs, IGNORE elsewhere."""
    labels, done = [], 0
    for first, end in runs:
        labels += [IGNORE] * (first - done) + ids[first:end]
        done = end
    return labels + [IGNORE] * (len(ids) - done)


def encode_runs(
    tokenizer: PreTrainedTokenizerBase,
    convs: list[Conversation],
    render: Renderer | None = None,
    batch_size: int = 1024,
) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Every conversation's ids and its target runs, (first, end) token indices: the labels are the ids inside
    the runs and IGNORE elsewhere (the format stage builds them as arrays, a chunk at a time)."""
    render = render or Renderer(tokenizer)
    out: list[tuple[list[int], list[tuple[int, int]]]] = []
    for start in range(0, len(convs), batch_size):
        out += _token_runs(render, tokenizer, [response_spans(render, c) for c in convs[start : start + batch_size]])
    return out


def encode_batch(
    tokenizer: PreTrainedTokenizerBase,
    convs: list[Conversation],
    render: Renderer | None = None,
    batch_size: int = 1024,
) -> list[Encoded]:
    """Every conversation's ids and labels (target: a token starting inside a target turn's span)."""
    return [Encoded(ids, labels_of(ids, runs)) for ids, runs in encode_runs(tokenizer, convs, render, batch_size)]


def runs_of(labels: list[int]) -> list[tuple[int, int]]:
    """The target runs of a labels list: (first, end) of each stretch of non-IGNORE labels."""
    mask = np.concatenate([[False], np.asarray(labels) != IGNORE, [False]])
    edges = np.flatnonzero(mask[1:] != mask[:-1]).tolist()
    return list(zip(edges[::2], edges[1::2]))


def labels_from_runs(ids: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Flat labels of rows laid end to end: ids at the flat positions [starts, ends) of each run, IGNORE
    elsewhere (runs are disjoint; an empty one marks nothing)."""
    n = len(ids)
    inside = np.cumsum(np.bincount(starts, minlength=n + 1)[:n] - np.bincount(ends, minlength=n + 1)[:n]) > 0
    return np.where(inside, ids, np.int32(IGNORE)).astype(np.int32)


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list | None = None, render: Renderer | None = None
) -> Encoded:
    """One conversation's ids and labels, through the batched encoder."""
    return encode_batch(tokenizer, [{"messages": messages, "tools": tools}], render)[0]


# ---- max_length: drop, truncate_prompt or error ------------------------------------------------------------


@dataclass
class Fitted:
    """A conversation's encoding after the overflow policy: None when dropped (reason says why).
    response_tokens_lost counts the target tokens of older exchanges dropped whole to make room (their answers
    were context by then); the final response is never cut."""

    encoded: Encoded | None
    reason: str | None = None
    truncated: bool = False
    response_tokens_lost: int = 0
    kind: str | None = None
    messages: list[dict] | None = None  # the conversation as trained, when truncation changed it
    prompt_tokens_cut: int = 0


def _drop_oldest_exchange(messages: list[dict]) -> list[dict] | None:
    """The conversation without its oldest exchange (the first user turn up to the next user turn), keeping
    the system turn; None when only the final exchange is left."""
    head = messages[:1] if messages[0]["role"] == "system" else []
    body = messages[len(head) :]
    users = [i for i, m in enumerate(body) if m["role"] == "user"]
    if len(users) < 2:
        return None
    return head + body[users[1] :]


ELISION = " [...] "
KEEP_EACH_END = 4  # tokens of a cut passage always kept at its start and its end
CUT_TRIES = 6  # re-encodings after a cut: the marker and re-merged tokens at the cut may need a little more cut


def _cut_middle(tokenizer: PreTrainedTokenizerBase, text: str, n_tokens: int) -> str | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = len(ids) - n_tokens
    if keep < 2 * KEEP_EACH_END:
        return None
    head, tail = ids[: keep // 2], ids[len(ids) - (keep - keep // 2) :]
    return (
        tokenizer.decode(head, skip_special_tokens=False) + ELISION + tokenizer.decode(tail, skip_special_tokens=False)
    )


def _cut_regions(content: str) -> list[tuple[int, int]]:
    """Where a user turn may be cut, best first, as character spans: its longest paragraph alone (every other
    paragraph, the question among them, stays whole), then the passage across paragraphs, everything after the
    first paragraph (the instruction: alpaca's instruction, Dolly's question). A turn of one paragraph is
    cut in its middle."""
    parts = content.split("\n\n")
    starts = [sum(len(p) + 2 for p in parts[:k]) for k in range(len(parts))]
    longest = max(range(len(parts)), key=lambda k: len(parts[k]))
    regions = [(starts[longest], starts[longest] + len(parts[longest]))]
    if len(parts) > 2:
        regions.append((starts[1], len(content)))
    return regions


def _cut_prompt_middle(tokenizer: PreTrainedTokenizerBase, messages: list[dict], n_tokens: int) -> list[dict] | None:
    """The conversation with n_tokens cut, marked by ELISION, from the middle of a region of its longest user
    turn (_cut_regions: never the instruction paragraph, always the start and end of the passage); None when
    no region holds so many tokens."""
    users = [j for j, m in enumerate(messages) if m["role"] == "user"]
    i = max(users, key=lambda j: len(messages[j]["content"]))
    content = messages[i]["content"]
    for lo, hi in _cut_regions(content):
        cut = _cut_middle(tokenizer, content[lo:hi], n_tokens)
        if cut is not None:
            return messages[:i] + [dict(messages[i], content=content[:lo] + cut + content[hi:])] + messages[i + 1 :]
    return None


def _overflow_refusal(enc: Encoded, max_length: int, policy: str, where: str) -> Fitted | None:
    """data.overflow error (raised) or drop (the row dropped, with the setting to change) for a row over
    max_length; None for truncate_prompt."""
    if policy == "error":
        raise DataError(
            f"{where}: {len(enc.input_ids)} tokens > model.max_length {max_length} "
            "(set data.overflow to drop or truncate_prompt, or raise model.max_length)"
        )
    if policy == "drop":
        return Fitted(
            None,
            f"{len(enc.input_ids)} tokens > model.max_length {max_length} "
            "(raise it, or set data.overflow: truncate_prompt)",
            kind="too long",
        )
    return None


def _shortened(
    tokenizer: PreTrainedTokenizerBase, render: Renderer, conv: Conversation, enc: Encoded, max_length: int
) -> tuple[list[dict], Encoded]:
    """The conversation cut toward max_length, with its encoding: the oldest exchanges dropped, then the middle
    of the prompt cut (_cut_prompt_middle). Never the response: what is returned may still be too long."""
    messages = conv["messages"]
    while len(enc.input_ids) > max_length and (shorter := _drop_oldest_exchange(messages)) is not None:
        messages = shorter
        enc = encode_conversation(tokenizer, messages, conv.get("tools"), render)
    marker = len(tokenizer(ELISION, add_special_tokens=False)["input_ids"])
    for attempt in range(CUT_TRIES):
        excess = len(enc.input_ids) - max_length
        if excess <= 0:
            break
        cut = _cut_prompt_middle(tokenizer, messages, excess + marker + attempt * 2)
        if cut is None:
            break
        messages = cut
        enc = encode_conversation(tokenizer, messages, conv.get("tools"), render)
    return messages, enc


def fit(
    tokenizer: PreTrainedTokenizerBase,
    render: Renderer,
    conv: Conversation,
    enc: Encoded,
    max_length: int,
    policy: str,
    where: str,
) -> Fitted:
    """Apply the overflow policy to one encoded conversation. truncate_prompt drops the oldest exchanges, then
    cuts the middle of the longest user turn (its longest paragraph, else the passage after its first
    paragraph: never the instruction, never the passage's start or end). The response is never cut: a row
    whose response, with what must stay of its prompt, cannot fit is dropped as too long. A row with no
    target token is dropped."""
    targets = enc.n_targets
    if len(enc.input_ids) > max_length:
        refused = _overflow_refusal(enc, max_length, policy, where)
        if refused is not None:
            return refused
        messages, short = _shortened(tokenizer, render, conv, enc, max_length)
        if len(short.input_ids) > max_length:
            return Fitted(
                None,
                f"{len(short.input_ids)} tokens > model.max_length {max_length} with the prompt cut as far as "
                "truncate_prompt goes (it never cuts the response); raise model.max_length",
                kind="too long",
            )
        if short.n_targets == 0:  # the targets were all in the older exchanges dropped to make room
            return Fitted(
                None,
                "no supervised token left after truncation",
                kind="no supervised tokens",
                truncated=True,
                response_tokens_lost=targets,
            )
        return Fitted(
            short,
            truncated=True,
            response_tokens_lost=targets - short.n_targets,
            messages=messages if messages is not conv["messages"] else None,
            prompt_tokens_cut=max((len(enc.input_ids) - targets) - (len(short.input_ids) - short.n_targets), 0),
        )
    if targets == 0:
        return Fitted(None, "no supervised token (the template renders no assistant text)", kind="no supervised tokens")
    return Fitted(enc)


def length_summary(values: list[int] | np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    arr = np.asarray(values)
    return {
        "min": int(arr.min()),
        "median": float(np.median(arr)),
        "p90": float(np.percentile(arr, 90)),
        "p99": float(np.percentile(arr, 99)),
        "max": int(arr.max()),
        "mean": float(arr.mean()),
    }


def token_lengths(encoded: list[Encoded]) -> dict[str, list[int]]:
    """Per row: prompt tokens (everything not supervised), response tokens (supervised), total."""
    response = [e.n_targets for e in encoded]
    total = [len(e.input_ids) for e in encoded]
    return {"prompt": [t - r for t, r in zip(total, response)], "response": response, "total": total}
