"""Cheap checks that a file mlora is about to read is whole, before anything expensive loads.

A truncated ``.safetensors`` or a JSON file of the wrong shape would otherwise surface as a
``SafetensorError`` or ``KeyError`` traceback from deep inside a load, often after the base
model has loaded. Each check reads only headers (never the tensors) and returns what is wrong as
a short phrase, or ``None`` when the file looks whole; callers name the file in their message.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from mlora.core.jsonfile import TextProblem, decode_utf8, json_value, parse_json

HEADER_SIZE_BYTES = 8
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a ``.safetensors`` file (its header and its size), or None."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(HEADER_SIZE_BYTES), "little")
            if size < HEADER_SIZE_BYTES or length > min(MAX_HEADER_BYTES, size - HEADER_SIZE_BYTES):
                return f"truncated or not a safetensors file ({size} bytes)"
            header = parse_json(decode_utf8(handle.read(length)))
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    except TextProblem:
        return "not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return "not a safetensors file (its header is not a JSON object)"
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(offset) is int for offset in offsets)
        ):
            return f"not a safetensors file (tensor {key!r} has no data_offsets)"
        end = max(end, offsets[1])
    expected = HEADER_SIZE_BYTES + length + end
    if size != expected:
        return f"truncated: {size} bytes, its header describes {expected}"
    return None


def torch_file_problem(path: Path) -> str | None:
    """What is wrong with a ``torch.save`` file (a zip archive since torch 1.6), or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            if not archive.namelist():
                return "an empty archive"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    except zipfile.BadZipFile:
        return "truncated or not a torch file"
    return None


def json_problem(path: Path) -> tuple[Any, str | None]:
    """``(value, None)`` for a readable UTF-8 JSON file, else ``(None, what is wrong)``
    (the one reader's ``json_value``: strict UTF-8, bounded nesting, no repeated keys)."""
    return json_value(path)


def shape_problem(value: Any, fields: dict[str, type | tuple[type, ...]]) -> str | None:
    """What is wrong with a JSON object that must hold ``fields`` of the given types, or None."""
    if not isinstance(value, dict):
        return f"must be a JSON object, not {json_type(value)}"
    for key, kind in fields.items():
        if key not in value:
            return f"missing the key {key!r}"
        if not isinstance(value[key], kind) or (
            isinstance(value[key], bool)
            and bool not in (kind if isinstance(kind, tuple) else (kind,))
        ):
            return f"key {key!r} is of the wrong type ({json_type(value[key])})"
    return None


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"
