"""The one reader (mlora/core/jsonfile.py) against Python's own parser and decoder: whatever they
accept within the nesting bound it reads the same; what it refuses is named by line and column.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlora.core.errors import ConfigError
from mlora.core.jsonfile import (
    MAX_NESTING,
    TextProblem,
    decode_utf8,
    nesting_problem,
    parse_json,
    read_json_file,
)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=12,
)  # fmt: skip


def depth(value: object) -> int:
    """Levels of lists and objects, computed on the parsed value (the reference)."""
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    return 0


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(value=JSON, wrap=st.integers(0, MAX_NESTING + 5), indent=st.sampled_from([None, 1]))
def test_reads_what_json_reads_and_bounds_the_depth_json_has(value, wrap, indent) -> None:
    text = "[" * wrap + json.dumps(value, indent=indent) + "]" * wrap
    reference = json.loads(text)
    if depth(reference) <= MAX_NESTING:
        assert nesting_problem(text) is None
        assert parse_json(text) == reference
    else:
        with pytest.raises(TextProblem, match=f"nested deeper than {MAX_NESTING} levels at line"):
            parse_json(text)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8")), junk=st.binary(min_size=1))
def test_decodes_what_python_decodes_and_names_the_byte_it_does_not(text: str, junk: bytes):
    data = text.encode() + junk
    try:
        expected = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        with pytest.raises(TextProblem) as caught:
            decode_utf8(data)
        if not data.startswith((b"\xff\xfe", b"\xfe\xff")):
            line = data.count(b"\n", 0, exc.start) + 1
            assert f"line {line}," in str(caught.value)
            assert f"(byte {exc.start}: 0x{data[exc.start]:02x})" in str(caught.value)
    else:
        assert decode_utf8(data) == expected.removeprefix("\ufeff")


def test_brackets_inside_strings_are_text_not_nesting() -> None:
    text = json.dumps({"a": "[" * 500 + "{" * 500, "b": '\\"[[[['})
    assert parse_json(text) == json.loads(text)


def test_a_byte_order_mark_is_read_and_a_repeated_key_named(tmp_path) -> None:
    path = tmp_path / "c.json"
    path.write_bytes(b'\xef\xbb\xbf{"lora": []}')
    assert read_json_file(path) == {"lora": []}
    path.write_text('{"lr": 1, "lr": 2}')
    with pytest.raises(ConfigError, match="key 'lr' appears twice in one object"):
        read_json_file(path)
    path.write_text('{"r": ' + "9" * 5000 + "}")
    with pytest.raises(ConfigError, match=r"c\.json: invalid JSON: Exceeds the limit"):
        read_json_file(path)
