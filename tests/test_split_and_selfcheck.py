"""Property tests: the split is stable when rows are added and groups rows by prompt; the mask self-check
passes on any conversation the encoder handles correctly and names the row when the mask or prompt is wrong;
the contamination check against an independent count."""

import json
import random

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sftops.config import Config, ModelConfig
from sftops.data.chunks import conversation_and_prompt
from sftops.data.selfcheck import MaskError, self_check
from sftops.data.split import ContaminationIndex, contamination, split_of
from sftops.data.store import read_split
from sftops.data.tokenize import encode_batch
from sftops.encoded import IGNORE, Encoded
from sftops.modeling import load_tokenizer
from sftops.stages.format import run_format
from sftops.stages.ingest import run_ingest

WORDS = st.text(alphabet="abcdefghij klmnop,.?!", min_size=1, max_size=30).filter(lambda s: s.strip())
PROMPTS = st.lists(WORDS, min_size=1, max_size=40, unique=True)


def pair(prompt, response="r"):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def assign_split(messages: list[dict], seed: int, val: float, test: float) -> str:
    return split_of(conversation_and_prompt(messages)[1], seed, val, test)  # as format's pass 1 splits a row


@settings(max_examples=60, deadline=None)
@given(old=PROMPTS, new=PROMPTS, seed=st.integers(0, 2**31), test=st.floats(0.01, 0.5), val=st.floats(0.0, 0.4))
def test_adding_rows_never_moves_an_existing_row(old, new, seed, test, val):
    before = {p: assign_split(pair(p), seed, val, test) for p in old}
    after = {p: assign_split(pair(p), seed, val, test) for p in new + old}
    assert all(after[p] == s for p, s in before.items())


@settings(max_examples=60, deadline=None)
@given(prompt=WORDS, responses=st.lists(WORDS, min_size=2, max_size=5), seed=st.integers(0, 2**31))
def test_rows_sharing_a_prompt_share_a_split(prompt, responses, seed):
    variants = [prompt, prompt.upper(), f"  {prompt}!! "]  # the same prompt after normalisation
    splits = {assign_split(pair(v, r), seed, 0.2, 0.3) for v in variants for r in responses}
    assert len(splits) == 1


def test_existing_rows_keep_their_split_through_the_stage_when_rows_are_added(tmp_path, tiny_model):
    def stage(n: int, folder: str) -> dict[str, str]:
        rows = [{"prompt": f"question number {i}", "completion": f"answer {i}"} for i in range(n)]
        (tmp_path / f"{folder}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        cfg = Config.model_validate(
            {
                "data": {
                    "sources": [{"name": "qa", "path": str(tmp_path / f"{folder}.jsonl")}],
                    "near_duplicate_threshold": None,
                },
                "model": {"base": str(tiny_model), "max_length": 64},
                "paths": {"raw": str(tmp_path / folder / "raw"), "curated": str(tmp_path / folder / "curated")},
            }
        )
        run_ingest(cfg)
        run_format(cfg)
        return {
            r["messages"][0]["content"]: s for s in ("train", "val", "test") for r in read_split(cfg.paths.curated, s)
        }

    small, large = stage(60, "small"), stage(150, "large")
    assert len(small) == 60 and len(large) == 150
    assert all(large[p] == s for p, s in small.items())


def test_contamination_flags_test_prompts_by_ngram_overlap():
    train = ["the cat sat on the mat and looked at the dog", "what is two plus two"]
    test = [
        "the cat sat on the mat and looked at the bird",
        "a completely different question about cars",
        "what is two plus two",
    ]
    flagged = dict(contamination(train, test, n=3, threshold=0.5))
    # counted by hand: the first test prompt has 11 words, 9 3-grams, all but "at the bird" in train
    assert flagged == {0: 8 / 9, 2: 1.0}


def set_based_contamination(train, test, n, threshold):
    """The reference: every train n-gram tuple in one set, each test prompt's distinct tuples against it."""

    def grams(text):
        words = text.split()
        if len(words) < n:
            return {tuple(words)} if words else set()
        return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}

    seen = set().union(*map(grams, train))
    overlaps = ((i, len(grams(p) & seen) / len(grams(p))) for i, p in enumerate(test) if grams(p))
    return [(i, overlap) for i, overlap in overlaps if overlap >= threshold]


def random_prompts(rng, count, vocabulary, templates):
    """Prompts of 0 to 20 words over a small vocabulary (shared n-grams, repeated n-grams inside a prompt),
    a third of them cut from shared templates with words replaced (partial overlaps)."""
    prompts = []
    for _ in range(count):
        if rng.random() < 0.3:
            words = list(rng.choice(templates))[: rng.randrange(0, 21)]
            for k in rng.sample(range(len(words)), k=min(len(words), rng.randrange(0, 4))):
                words[k] = rng.choice(vocabulary)
        else:
            words = [rng.choice(vocabulary) for _ in range(rng.randrange(0, 21))]
        prompts.append(" ".join(words))
    return prompts


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_streaming_contamination_index_matches_the_set_based_check(n):
    rng = random.Random(n)
    vocabulary = [f"w{i}" for i in range(12)]
    templates = [[rng.choice(vocabulary) for _ in range(20)] for _ in range(5)]
    train = random_prompts(rng, 900, vocabulary, templates)
    test = random_prompts(rng, 300, vocabulary + ["unseen", "new"], templates)
    test += ["", "w1", "w1 w2", " ".join(vocabulary[:n])]  # empty, short and exactly-n-word prompts
    train.append("w1")
    for threshold in (0.1, 0.5, 1.0):
        expected = set_based_contamination(train, test, n, threshold)
        assert contamination(train, test, n, threshold) == expected
        index = ContaminationIndex(test, n, chunk=37)  # the test side hashed in chunks too
        for lo, hi in ((0, 1), (1, 400), (400, 401), (401, len(train))):  # other chunk sizes, same result
            index.add_train(train[lo:hi])
        arrow = ContaminationIndex(test, n)  # as pass 2 adds them: Arrow columns, of several chunks
        arrow.add_train(pa.chunked_array([pa.array(train[:300]), pa.array(train[300:])]))
        assert arrow.flagged(threshold) == expected
        assert index.flagged(threshold) == expected
    assert any(0 < overlap < 1 for _, overlap in set_based_contamination(train, test, n, 0.1))
    assert (
        contamination(train, [], n, 0.5)
        == contamination(train, ["", " "], n, 0.5)
        == contamination([], test, n, 0.5)
        == []
    )


@pytest.fixture(scope="module")
def tiny_tok(tiny_model):
    return load_tokenizer(ModelConfig(base=str(tiny_model)))


TURN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz ,.?!", min_size=1, max_size=40).filter(lambda s: s.strip())


@st.composite
def conversations(draw):
    n = draw(st.integers(1, 3))
    messages = [{"role": "system", "content": draw(TURN)}] if draw(st.booleans()) else []
    for i in range(n):
        messages.append({"role": "user", "content": draw(TURN)})
        weight = 1 if i == n - 1 else draw(st.sampled_from([0, 1]))
        messages.append({"role": "assistant", "content": draw(TURN), "weight": weight})
    return {"messages": messages, "tools": None}


@settings(max_examples=40, deadline=None)
@given(conv=conversations())
def test_mask_self_check_passes_on_the_encoders_output(tiny_tok, conv):
    [enc] = encode_batch(tiny_tok, [conv])
    assert self_check(tiny_tok, [("row 1", conv, enc)]) == 1


@settings(max_examples=40, deadline=None)
@given(conv=conversations(), shift=st.sampled_from([-1, 1]))
def test_mask_self_check_names_the_row_when_the_mask_is_off_by_one(tiny_tok, conv, shift):
    [enc] = encode_batch(tiny_tok, [conv])
    mask = [label != IGNORE for label in enc.labels]
    moved = mask[-shift:] + mask[:-shift]  # the mask rotated by one token, right or left
    bad = Encoded(enc.input_ids, [t if m else IGNORE for t, m in zip(enc.input_ids, moved)])
    with pytest.raises(MaskError, match="mask self-check failed on src.jsonl#line9"):
        self_check(tiny_tok, [("src.jsonl#line9", conv, bad)])


def test_mask_self_check_catches_a_token_straddling_the_prompt_and_the_response(tiny_tok):
    # A generation prompt that ends with a space: the tokenizer merges it with the first word ("Ġthe"),
    # a token that starts in the prompt, so the first word of the response would never be learned.
    tiny_tok = load_tokenizer(ModelConfig(base=tiny_tok.name_or_path))
    tiny_tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'A: ' + m['content'] + eos_token }}"
        "{% else %}{{ 'Q: ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}"
    )
    conv = {
        "messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the cat sat"}],
        "tools": None,
    }
    [enc] = encode_batch(tiny_tok, [conv])
    with pytest.raises(
        MaskError, match="row 3: supervised run 0 decodes to ' cat sat</s>', expected 'the cat sat</s>'"
    ):
        self_check(tiny_tok, [("row 3", conv, enc)])


def test_mask_self_check_catches_a_doubled_bos(tiny_tok):
    tiny_tok = load_tokenizer(ModelConfig(base=tiny_tok.name_or_path))
    tiny_tok.chat_template = "{{ bos_token }}" + tiny_tok.chat_template  # the fallback already starts with BOS
    conv = {
        "messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the cat sat"}],
        "tools": None,
    }
    [enc] = encode_batch(tiny_tok, [conv])
    with pytest.raises(MaskError, match="two BOS tokens"):
        self_check(tiny_tok, [("row 4", conv, enc)])


def test_split_fractions_follow_the_config():
    splits = [split_of(f"prompt {i}", 3, 0.1, 0.2) for i in range(4000)]
    assert abs(splits.count("test") / 4000 - 0.2) < 0.03 and abs(splits.count("val") / 4000 - 0.1) < 0.03


def test_the_background_thread_of_pass_2_keeps_order_and_raises_its_error_in_the_caller():
    from sftops.data.curate import InBackground

    seen = []
    with InBackground(seen.append) as background:
        for i in range(100):
            background.put(i)
    assert seen == list(range(100))

    def fails(item):
        if item == 3:
            raise ValueError("item 3 is bad")
        seen.append(item)

    seen.clear()
    with pytest.raises(ValueError, match="item 3 is bad"):
        with InBackground(fails) as background:
            for i in range(10):
                background.put(i)
    assert seen == [0, 1, 2]  # nothing after the error
    with pytest.raises(KeyError):  # the caller's own error is kept, and the thread does not hang
        with InBackground(seen.append):
            raise KeyError("caller")
