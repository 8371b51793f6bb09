"""Conversations and the chat template: where each target
assistant turn lies in the rendered text (every assistant turn, with the end-of-turn token the template puts
after it, unless its weight is 0), the generation prompt and the stop tokens. Tokenising is sftops.data.tokenize."""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from sftops.errors import ModelError


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def is_target(message: dict) -> bool:
    """An assistant turn is a target unless its weight is 0 (OpenAI fine-tuning format: context only)."""
    return message["role"] == "assistant" and message.get("weight", 1) != 0


def target_spans(
    messages: list[dict], render_prefix: Callable[[list[dict], bool], str]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each target assistant turn in it.

    A turn's span starts where the rendering of the conversation before it, plus the generation prompt, ends,
    and stops where the rendering through it ends: exactly what the model must produce at inference.
    `render_prefix(messages, generation_prompt)` renders with the chat template."""
    text = render_prefix(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if not is_target(message):
            continue
        before = render_prefix(messages[:i], True)
        through = text if i == len(messages) - 1 else render_prefix(messages[: i + 1], False)
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise ModelError(
                "the chat template does not render conversations prefix by prefix, so the response tokens "
                "cannot be located; use a tokenizer whose template does (or none, for the fallback template)"
            )
        spans.append((len(before), len(through)))
    return text, spans


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
