"""Small local JSON files read without ``datasets`` give exactly the rows ``datasets`` gives.

The reference is ``load_rows`` through ``datasets`` (the fast path turned off). Plain files
must take the fast path and match it row for row, key order included; files the fast path
leaves to ``datasets`` (mixed types, duplicate keys, bad JSON) still give its rows and errors.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mlora.core.errors import DataError
from mlora.data import json_rows
from mlora.data.prompts import load_template
from mlora.data.rows import load_rows, tokenize_rows
from tests.conftest import make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
PLAIN: dict[str, list[dict[str, Any]]] = {
    "alpaca": [
        {"instruction": "add", "input": "1 2", "output": "3"},
        {"output": "x", "instruction": "no input"},  # another key order, a missing key
        {"instruction": "ü ✓ 中", "input": None, "output": ""},
    ],
    "typed": [{"n": 1, "f": 0.5, "b": True, "t": ["a"]}, {"n": -(2**40), "t": [], "b": False}],
    "messages": [
        {"messages": MESSAGES},
        {"messages": [{"content": "q", "role": "user"}, {"content": "a", "role": "assistant"}]},
    ],
    "nulls": [{"a": None}, {"a": None, "b": "x"}],
}
LEFT_TO_DATASETS = {
    "ints and floats": '[{"a": 1}, {"a": 2.5}]',
    "ints and text": '[{"a": 1}, {"a": "x"}]',
    "messages of other fields": '[{"m": [{"role": "user"}]}, {"m": [{"role": "u", "x": "y"}]}]',
    "an object value": '[{"a": {"x": 1}}]',
    "one row per line, one of them a list": '{"a": "x"}\n[1]\n',
    "dates (Arrow reads timestamps)": '{"instruction": "when", "output": "2020-01-01"}\n',
    "a date in a message": '[{"m": [{"role": "user", "content": "2020-01-01 10:00:00"}]}]',
    "a date in a list": '[{"t": ["x", "2020-1-2"]}]',
}


def reference(path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``load_rows`` through ``datasets`` (the row list, or the error's text)."""
    with monkeypatch.context() as patch:
        patch.setattr(json_rows, "FAST_LIMIT", -1)
        try:
            return [list(row.items()) for row in load_rows(str(path))]
        except DataError as exc:
            return str(exc)


def fast(path: Path) -> Any:
    try:
        return [list(row.items()) for row in load_rows(str(path))]
    except DataError as exc:
        return str(exc)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("name", list(PLAIN))
def test_plain_files_take_the_fast_path_with_the_same_rows(name, suffix, tmp_path, monkeypatch):
    rows = PLAIN[name]
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert json_rows.small_json_rows(path) is not None
    assert fast(path) == reference(path, monkeypatch)


@pytest.mark.parametrize("name", list(LEFT_TO_DATASETS))
def test_other_files_are_left_to_datasets(name, tmp_path, monkeypatch) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(LEFT_TO_DATASETS[name], encoding="utf-8")
    assert json_rows.small_json_rows(path) is None
    assert fast(path) == reference(path, monkeypatch)


@pytest.mark.parametrize(
    "text",
    ['[{"instruction": "a", "output": "b"}, {"instruction": "c"', '[{"a": "x", "a": "y"}]'],
    ids=["bad JSON", "a repeated key"],
)
def test_bad_files_give_the_datasets_paths_error(text, tmp_path, monkeypatch) -> None:
    path = tmp_path / "rows.json"
    path.write_text(text, encoding="utf-8")
    assert json_rows.small_json_rows(path) is None
    assert fast(path) == reference(path, monkeypatch)


def test_a_bad_row_is_the_same_one_line_on_both_paths(tmp_path, monkeypatch) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    errors = []
    for limit in (json_rows.FAST_LIMIT, -1):
        monkeypatch.setattr(json_rows, "FAST_LIMIT", limit)
        with pytest.raises(DataError) as caught:
            rows = load_rows(str(path))
            tokenize_rows(rows, make_tokenizer(), load_template("alpaca"), 64, source=str(path))
        errors.append(str(caught.value))
    assert errors[0] == errors[1] == f"{path}: row 1 is missing the field 'output'"


def test_the_fast_path_does_not_import_datasets(tmp_path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(PLAIN["alpaca"]), encoding="utf-8")
    code = (
        "import sys; from mlora.data.rows import load_rows; "
        f"rows = load_rows({str(path)!r}); "
        "print(len(rows), 'datasets' in sys.modules, 'pyarrow' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["3", "False", "False"]
