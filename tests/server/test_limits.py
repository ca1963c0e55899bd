"""The server's body bounds as functions: JSON nesting depth (vectorised) against Python's own
parse, and parse_json's refusals."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastserve.server.limits import json_depth, parse_json

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='ab"\\\\[]{}\\n ', max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=20,
)


def depth(value) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


@settings(max_examples=300, deadline=None, derandomize=True)
@given(JSON, st.booleans())
def test_depth_equals_the_parsed_structure(value, ascii_only):
    raw = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert json_depth(raw) == depth(value)


def test_depth_of_hand_made_bodies():
    assert json_depth(b"") == 0 and json_depth(b"5") == 0
    assert json_depth(b'{"a": "[[[[", "b": [1]}') == 2
    assert json_depth(b'["\\\\", ["x"]]') == 2  # an escaped backslash ends before the quote
    assert json_depth(b'["\\"[[", 1]') == 1  # an escaped quote does not end the string
    assert json_depth(b"[" * 100_000 + b"]" * 100_000) == 100_000


def test_parse_json_refusals():
    assert parse_json(b'{"a": [1, 2]}', 4) == {"a": [1, 2]}
    for raw, words in [
        (b"[[[[1]]]]", "nested 4 levels deep"),
        (b'{"t": NaN}', "NaN is not valid JSON"),
        (b'{"t": Infinity}', "Infinity"),
        (b'{"s": 1' + b"0" * 5000 + b"}", "Invalid JSON body"),
        (b"\xff", "Invalid JSON body"),
        (b'{"a": ', "Invalid JSON body"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_json(raw, 3)
