"""The mask self-check, run by the format stage on a sample of rows every time: each conversation's labels are
re-derived independently of the encoder and must agree, or the stage fails naming the row.

1. The supervised tokens, run by run, decode to exactly each target assistant turn's text followed by the
   template's end-of-turn text, and each run contains EOS or the end-of-turn token (the model learns to stop).
2. The tokens before the final response equal the tokenised inference prompt: tokenizer.apply_chat_template
   of the conversation without its final turn, with the generation prompt (no doubled BOS, no missing header).
3. The sequence does not start with two BOS tokens."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from sftops.chat import is_target, stop_token_ids
from sftops.data.tokenize import Conversation
from sftops.encoded import IGNORE, Encoded
from sftops.errors import ModelError

_MARKER = "\u2063sftops-marker\u2063"


def end_of_turn_text(tokenizer: PreTrainedTokenizerBase) -> str:
    """What the template writes right after an assistant turn's text (e.g. '<|im_end|>\\n', or EOS + '\\n'),
    read off a rendering with a marker as the content; apply_chat_template is the reference."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARKER}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    return text[text.index(_MARKER) + len(_MARKER) :]


def _runs(labels: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    prev_target = False
    for label in labels:
        if label != IGNORE:
            if not prev_target:
                runs.append([])
            runs[-1].append(label)
        prev_target = label != IGNORE
    return runs


def check_row(
    tokenizer: PreTrainedTokenizerBase, conv: Conversation, enc: Encoded, eot: str, stops: set[int]
) -> str | None:
    """Why this row's encoding is wrong, or None when it passes."""
    messages, tools = conv["messages"], conv.get("tools")
    bos = tokenizer.bos_token_id
    if bos is not None and enc.input_ids[:2] == [bos, bos]:
        return "the sequence starts with two BOS tokens"
    runs = _runs(enc.labels)
    turns = [m for m in messages if is_target(m)]
    if len(runs) != len(turns):
        return f"{len(runs)} supervised runs for {len(turns)} target assistant turns"
    for k, (run, turn) in enumerate(zip(runs, turns)):
        if not stops & set(run):
            return f"supervised run {k} has no EOS/end-of-turn token: the model would not learn to stop"
        if turn.get("tool_calls"):
            continue  # the template renders the calls its own way; the run boundaries were checked above
        decoded = tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        expected = turn["content"] + eot
        if decoded != expected:
            return f"supervised run {k} decodes to {decoded[:80]!r}, expected {expected[:80]!r}"
    if is_target(messages[-1]):
        prompt = tokenizer.apply_chat_template(messages[:-1], tools=tools, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        # where the final supervised run starts
        first_final = max(
            i for i, label in enumerate(enc.labels) if label != IGNORE and (i == 0 or enc.labels[i - 1] == IGNORE)
        )
        if enc.input_ids[:first_final] != prompt_ids:
            return (
                "the training prompt differs from the inference prompt (apply_chat_template with the generation prompt)"
            )
    return None


def self_check(tokenizer: PreTrainedTokenizerBase, rows: list[tuple[str, Conversation, Encoded]]) -> int:
    """Check every (where, conversation, encoding); raise MaskError naming the first failing row.
    Returns the number of rows checked."""
    eot, stops = end_of_turn_text(tokenizer), set(stop_token_ids(tokenizer))
    for where, conv, enc in rows:
        problem = check_row(tokenizer, conv, enc, eot, stops)
        if problem:
            raise MaskError(f"mask self-check failed on {where}: {problem}")
    return len(rows)


class MaskError(ModelError):
    """The loss mask or the prompt rendering is wrong for a row: training on it would teach the wrong thing."""
