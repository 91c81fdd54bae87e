"""Small local JSON / JSON-lines data read with the stdlib, without importing ``datasets``.

Importing ``datasets`` and building an Arrow table costs seconds; a small run's data file is
a few KiB. For a file under ``FAST_LIMIT`` whose rows are plain (a list of objects, or one
object per line; every column of one type: text, booleans, integers, floats, lists of text, or
messages: lists of objects of text with the same fields), the rows are exactly what
``datasets.load_dataset("json", ...).to_list()`` gives: every row has every column, in order
of first appearance, ``None`` where a row lacks one. Anything else (a larger file, bad JSON,
mixed column types, duplicate keys, deeper nesting, text that starts like a date, which Arrow
reads as a timestamp) returns None and the caller takes the
``datasets`` path, which is then the one that reads the rows and words the errors.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from mlora.core.jsonfile import TextProblem, read_text

FAST_LIMIT = 96 * 1024  # bytes
INT64 = range(-(2**63), 2**63)
ISO_DATE = re.compile(r"\s*\d{4}-\d{1,2}-\d{1,2}")  # Arrow infers timestamps from these


class _NotPlain(Exception):
    """The file is not in the plain shape read here: ``datasets`` reads it."""


def small_json_rows(path: Path) -> list[dict[str, Any]] | None:
    """The rows of a small plain JSON / JSON-lines file as ``datasets`` gives them, or None
    where ``datasets`` must read it (see the module docstring)."""
    try:
        if path.stat().st_size > FAST_LIMIT:
            return None
        text = read_text(path)
        rows = _parse(text)
        if not rows or not all(isinstance(row, dict) for row in rows):
            return None
        columns = list(dict.fromkeys(key for row in rows for key in row))
        orders = {column: _column_kind([row.get(column) for row in rows]) for column in columns}
    except (OSError, TextProblem, _NotPlain, ValueError, RecursionError):
        return None
    return [{column: _value(row.get(column), orders[column]) for column in columns} for row in rows]


def _parse(text: str) -> list[Any]:
    """The rows of a JSON list, or of JSON lines (one value per non-blank line).

    Raises:
        _NotPlain: neither, or duplicate keys / NaN / Infinity (Arrow reads those its own way).
    """
    try:
        value = json.loads(text, object_pairs_hook=_object, parse_constant=_constant)
    except json.JSONDecodeError:
        return [_loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(value, list):
        raise _NotPlain("one JSON value that is not a list")
    return value


def _loads(text: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_object, parse_constant=_constant)
    except json.JSONDecodeError as exc:
        raise _NotPlain(str(exc)) from None


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        raise _NotPlain("a key repeated in one object")
    return value


def _constant(name: str) -> Any:
    raise _NotPlain(f"{name} is not JSON")


def _kind(value: Any) -> str:
    """The column type a value asks for (``"empty"``: an empty list, which fits either list)."""
    if isinstance(value, str):
        _check_text(value)
        return "text"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        if value not in INT64:
            raise _NotPlain("an integer beyond int64")
        return "int"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _NotPlain("a float that is not finite")
        return "float"
    if isinstance(value, list):
        if not value:
            return "empty"
        if all(isinstance(item, str) for item in value):
            for item in value:
                _check_text(item)
            return "texts"
        if all(isinstance(item, dict) for item in value):
            return "messages"
    raise _NotPlain(f"a value of another shape: {type(value).__name__}")


def _check_text(text: str) -> None:
    """Raises:
    _NotPlain: text that starts like an ISO 8601 date: Arrow's JSON reader turns such columns
        into timestamps (``datasets`` gives ``datetime`` objects), so ``datasets`` decides."""
    if ISO_DATE.match(text):
        raise _NotPlain("text that Arrow may read as a timestamp")


def _column_kind(values: list[Any]) -> list[str] | None:
    """Check one column holds one type; for messages (objects of text with the same fields)
    returns their fields in the order Arrow keeps (the first message's), else None.

    Raises:
        _NotPlain: mixed types (Arrow converts or refuses them: ``datasets`` decides).
    """
    kinds = {_kind(v) for v in values if v is not None} - {"empty"}
    if len(kinds) > 1:
        raise _NotPlain(f"a column of mixed types ({', '.join(sorted(kinds))})")
    if kinds != {"messages"}:
        return None
    messages = [m for v in values if v for m in v]
    for message in messages:
        for text in message.values():
            if isinstance(text, str):
                _check_text(text)
    fields = {frozenset(m) for m in messages}
    if len(fields) != 1 or not all(isinstance(x, str) for m in messages for x in m.values()):
        raise _NotPlain("messages of different fields or with non-text values")
    return list(messages[0])


def _value(value: Any, order: list[str] | None) -> Any:
    """A value as Arrow gives it back: messages' fields in the column's one order."""
    if order is None or not value:
        return value
    return [{key: message[key] for key in order} for message in value]
