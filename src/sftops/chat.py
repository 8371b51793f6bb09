"""Turn a conversation into token ids and loss labels: every assistant turn (including the end-of-turn
token the template puts after it) is a target; everything else is masked with IGNORE."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from sftops.errors import ModelError

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_targets(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def response_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character span of each assistant turn in it.

    A turn's span starts where the rendering of the conversation up to it, plus the generation prompt, ends,
    and stops where the rendering including it ends: exactly what the model must produce at inference."""
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        # An assistant turn with weight 0 (OpenAI fine-tuning format) is context, not a target.
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        before = render(tokenizer, messages[:i], generation_prompt=True)
        through = render(tokenizer, messages[: i + 1])
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise ModelError(
                "the chat template does not render conversations prefix by prefix, so the response tokens "
                "cannot be located; use a tokenizer whose template does (or none, for the fallback template)"
            )
        spans.append((len(before), len(through)))
    return text, spans


def encode(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> Encoded:
    text, spans = response_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for token_id, (start, _end) in zip(enc["input_ids"], enc["offset_mapping"]):
        target = any(lo <= start < hi for lo, hi in spans)
        labels.append(token_id if target else IGNORE)
    return Encoded(list(enc["input_ids"]), labels)


def generation_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The prompt for the final assistant turn, as the model sees it at inference."""
    return render(tokenizer, messages[:-1], generation_prompt=True)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS plus the special token(s) the template closes an assistant turn with (e.g. <|im_end|>)."""
    marker = "\u2063sftops\u2063"
    text = render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}])
    tail = text[text.index(marker) + len(marker) :]
    special = set(tokenizer.all_special_ids)
    ids = [tokenizer.eos_token_id] + [t for t in tokenizer(tail, add_special_tokens=False)["input_ids"] if t in special]
    return list(dict.fromkeys(ids))


def encode_rows(
    tokenizer: PreTrainedTokenizerBase, rows: list[dict], max_length: int
) -> tuple[list[Encoded], list[int], dict[str, int]]:
    """Encode curated rows; returns the examples, the indices of the rows they came from, and counts.

    A row longer than max_length is dropped, and so is a row with no target token: neither may enter
    training as a silently truncated response or a zero loss. Both are counted."""
    examples, kept, counts = [], [], {"rows": len(rows), "kept": 0, "dropped_too_long": 0, "dropped_no_target": 0}
    for i, row in enumerate(rows):
        enc = encode(tokenizer, row["messages"])
        if len(enc.input_ids) > max_length:
            counts["dropped_too_long"] += 1
        elif enc.n_targets == 0:
            counts["dropped_no_target"] += 1
        else:
            examples.append(enc)
            kept.append(i)
    counts["kept"] = len(examples)
    return examples, kept, counts
