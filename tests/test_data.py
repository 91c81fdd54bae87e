"""The tokenization contract, file formats, and one-line errors for bad rows."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from mlora.core.errors import DataError
from mlora.data.prompts import load_template
from mlora.data.rows import IGNORE_INDEX, load_rows, tokenize_rows
from tests.conftest import make_tokenizer

ROWS = [
    {"instruction": "Add the numbers.", "input": "2 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "hi there"},
]


def test_contract_ids_truncation_eos_and_masked_prompt() -> None:
    tokenizer = make_tokenizer()
    template = load_template("alpaca")
    cutoff = 400
    out = tokenize_rows(ROWS, tokenizer, template, cutoff)
    for row, got in zip(ROWS, out, strict=True):
        prompt = template.render(row["instruction"], row["input"])
        ids = [
            *tokenizer(prompt + row["output"])["input_ids"][: cutoff - 1],
            tokenizer.eos_token_id,
        ]
        prompt_len = len(tokenizer(prompt)["input_ids"])
        assert got.input_ids == ids
        assert got.labels == [IGNORE_INDEX] * prompt_len + ids[prompt_len:]


def test_train_on_inputs_and_truncation() -> None:
    tokenizer = make_tokenizer()
    template = load_template("alpaca")
    full = tokenize_rows(ROWS, tokenizer, template, 1000, train_on_inputs=True)
    assert all(row.labels == row.input_ids for row in full)
    prompt_len = len(tokenizer(template.render("Say hi."))["input_ids"])
    short = tokenize_rows(ROWS[1:], tokenizer, template, prompt_len + 4)
    assert len(short[0]) == prompt_len + 4
    assert short[0].input_ids[-1] == tokenizer.eos_token_id


def test_rows_whose_prompt_fills_the_cutoff_are_skipped_and_counted(caplog) -> None:
    tokenizer = make_tokenizer()
    template = load_template("alpaca")
    long_row = {"instruction": "x" * 500, "input": "", "output": "y"}
    with caplog.at_level(logging.WARNING, logger="mlora"):
        out = tokenize_rows([long_row, *ROWS], tokenizer, template, 300, source="d.json")
    assert len(out) == 2
    assert "skipped 1 of 3 rows" in caplog.text
    with pytest.raises(DataError, match="no usable rows"):
        tokenize_rows([long_row], tokenizer, template, 300, source="d.json")


@pytest.mark.parametrize("suffix", ["json", "jsonl", "csv", "parquet"])
def test_local_formats(tmp_path: Path, suffix: str) -> None:
    import pandas as pd

    path = tmp_path / f"rows.{suffix}"
    frame = pd.DataFrame(ROWS)
    {
        "json": lambda: path.write_text(json.dumps(ROWS)),
        "jsonl": lambda: frame.to_json(path, orient="records", lines=True),
        "csv": lambda: frame.to_csv(path, index=False),
        "parquet": lambda: frame.to_parquet(path),
    }[suffix]()
    rows = load_rows(str(path))
    assert [r["output"] for r in rows] == ["5", "hi there"]
    assert tokenize_rows(rows, make_tokenizer(), load_template("alpaca"), 400)


def test_missing_field_names_file_and_row(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([*ROWS, {"instruction": "no output here"}]))
    with pytest.raises(DataError, match=r"bad.json: row 2 is missing the field 'output'"):
        tokenize_rows(
            load_rows(str(path)), make_tokenizer(), load_template("alpaca"), 400, source=str(path)
        )


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data file not found: .*nope\.json"):
        load_rows(str(tmp_path / "nope.json"))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match=r"empty\.json: the dataset is empty"):
        load_rows(str(empty))


def test_template_file_and_unknown_template(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(
        json.dumps(
            {
                "prompt_input": "Q: {instruction} {input}\nA:",
                "prompt_no_input": "Q: {instruction}\nA:",
            }
        )
    )
    assert load_template(str(path)).render("hi", "there") == "Q: hi there\nA:"
    with pytest.raises(Exception, match=r"unknown prompt template 'nope'"):
        load_template("nope")
