"""IncrementalDetokenizer: deltas concatenate to decode(ids), never half a UTF-8 character, never a
stop-string prefix; stop strings across tokens; include_stop_str_in_output; min_tokens."""

from __future__ import annotations

import random

import pytest

from fastserve.data.tokenizer import Tokenizer
from fastserve.engine.detokenizer import IncrementalDetokenizer
from fastserve.engine.request import Request, SamplingParams

TEXTS = [
    "hello world, the quick brown fox jumps over the lazy dog. " * 3,
    "Ünïcödé 中文 emoji 🎉 naïve café, über straße",
    "def f(x):\n    return x ** 2\n",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS * 5, vocab_size=300)


def stream(detok: IncrementalDetokenizer, ids, final=True) -> list[str]:
    deltas = [detok.add([t]) for t in ids]
    if final:
        deltas.append(detok.flush())
    return deltas


def char_tokens(tok: Tokenizer, text: str) -> list[int]:
    """One or more tokens per character (ASCII chars are single tokens), so strings span tokens."""
    return [t for c in text for t in tok.encode(c)]


@pytest.mark.parametrize("text", TEXTS + ["🎉🎉 中文中文 x", "a\n\nb"])
def test_deltas_concatenate_to_decode(tok, text):
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, tok.encode("prompt: "))
    deltas = stream(detok, ids)
    assert "".join(deltas) == text == detok.text
    assert all("\ufffd" not in d for d in deltas)  # never half a character


def test_multibyte_character_split_across_tokens(tok):
    ids = tok.encode("中")
    assert len(ids) > 1 and tok.decode(ids[:1]) == "\ufffd"  # the premise: bytes in pieces
    detok = IncrementalDetokenizer(tok)
    deltas = stream(detok, ids, final=False)
    assert deltas == [""] * (len(ids) - 1) + ["中"]


def test_random_ids_including_invalid_utf8_and_specials(tok):
    rng = random.Random(0)
    for trial in range(40):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        skip = trial % 2 == 0
        prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(0, 8))]
        detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
        assert "".join(stream(detok, ids)) == tok.decode(ids, skip_special_tokens=skip)


def test_special_tokens(tok):
    ids = tok.encode("ab") + [tok.eos_token_id]
    assert "".join(stream(IncrementalDetokenizer(tok), ids)) == "ab"
    kept = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert "".join(stream(kept, ids)) == "ab<|eos|>"


def check_stop_stream(tok, text, stop, include=False, min_tokens=0, ids=None):
    ids = ids if ids is not None else char_tokens(tok, text)
    detok = IncrementalDetokenizer(
        tok, stop=stop, include_stop_str_in_output=include, min_tokens=min_tokens
    )
    emitted = ""
    for t in ids:
        emitted += detok.add([t])
        # before min_tokens a stop string is plain text; after, it never reaches the output
        if not include and min_tokens == 0:
            assert not any(s in emitted for s in stop)
    emitted += detok.flush()
    assert emitted == detok.text
    return detok, emitted


def test_stop_string_spanning_tokens(tok):
    detok, out = check_stop_stream(tok, "abc STOP xyz", ["STOP"])
    assert detok.stop_hit == "STOP" and out == "abc "
    detok, out = check_stop_stream(tok, "abc STOP xyz", ["STOP"], include=True)
    assert detok.stop_hit == "STOP" and out == "abc STOP"


def test_stop_prefix_is_held_then_released(tok):
    detok = IncrementalDetokenizer(tok, stop=["STOP"])
    got = [detok.add([t]) for t in char_tokens(tok, "aSTx")]
    assert got == ["a", "", "", "STx"]  # "S", "ST" could start "STOP": held back
    detok = IncrementalDetokenizer(tok, stop=["STOP"])
    assert [detok.add([t]) for t in char_tokens(tok, "aST")] == ["a", "", ""]
    assert detok.flush() == "ST" and detok.stop_hit is None  # finished for another reason


def test_earliest_stop_wins_and_later_tokens_ignored(tok):
    detok, out = check_stop_stream(tok, "xabcde", ["bcd", "abcd", "e"])
    assert detok.stop_hit == "abcd" and out == "x"  # both complete at "d"; "abcd" starts first
    assert detok.add(tok.encode("more")) == "" and detok.text == "x"


def test_stop_in_multibyte_text(tok):
    detok, out = check_stop_stream(tok, "x 中文🎉 y", ["文🎉"], ids=tok.encode("x 中文🎉 y"))
    assert detok.stop_hit == "文🎉" and out == "x 中"


def test_min_tokens_suppresses_early_stop_strings(tok):
    # "ab" completes at token 2; with min_tokens=2 it cannot match there, only later
    detok, out = check_stop_stream(tok, "abcab!", ["ab"], min_tokens=2)
    assert detok.stop_hit == "ab" and out == "abc"
    detok, out = check_stop_stream(tok, "abcab!", ["ab"], min_tokens=1)
    assert out == ""


def test_from_request_and_prompt_context(tok):
    params = SamplingParams(stop=["fox"], include_stop_str_in_output=True, min_tokens=0)
    req = Request("r", tok.encode("the quick "), params)
    detok = IncrementalDetokenizer.from_request(tok, req)
    out = "".join(stream(detok, tok.encode("brown fox jumps")))
    assert out == "brown fox" and detok.stop_hit == "fox"


def test_prompt_ending_mid_character(tok):
    zh = tok.encode("中文")
    cut = 1  # the prompt ends inside "中"; the output starts with the rest of its bytes
    prompt, output = tok.encode("hi ") + zh[:cut], zh[cut:] + tok.encode("ab")
    detok = IncrementalDetokenizer(tok, prompt)
    assert "".join(stream(detok, output)) == tok.decode(output)
