"""One adapter's rows in whatever format they come, tokenized (``mlora.data.formats``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mlora.core.errors import DataError
from mlora.data.formats import resolve_format, tokenize_sft_rows
from mlora.data.preference import tokenize_pairs
from mlora.data.prompts import PromptTemplate
from mlora.data.rows import TokenizedRow, tokenize_rows


def tokenize_dataset(
    rows: list[dict[str, Any]],
    tokenizer: Any,
    template: PromptTemplate,
    cutoff_len: int,
    data_format: str = "auto",
    train_on_inputs: bool = False,
    source: str = "<data>",
    task_field: str | None = None,
    task_names: Sequence[str] = (),
) -> tuple[str, list[TokenizedRow]]:
    """``(format, rows)``: the format (``data_format``, or detected for ``"auto"``) and the
    tokenized rows; preference pairs as consecutive (chosen, rejected) rows.

    Raises:
        DataError: rows that do not fit the format (file and row named), a ``task_field``
            with rows other than alpaca's.
    """
    fmt = resolve_format(rows, data_format, source)
    if fmt == "alpaca":
        return fmt, tokenize_rows(
            rows, tokenizer, template, cutoff_len, train_on_inputs, source, task_field, task_names
        )
    if task_field is not None:
        raise DataError(f"{source}: task_field needs alpaca rows (these are {fmt} rows)")
    if fmt == "preference":
        return fmt, tokenize_pairs(rows, tokenizer, cutoff_len, source)
    return fmt, tokenize_sft_rows(rows, fmt, tokenizer, cutoff_len, train_on_inputs, source)
