"""The one reader of the text files mlora reads: strict UTF-8, bounded JSON, one-line errors.

Every JSON or text file mlora reads goes through here: configs, prompt templates, data files
(json, jsonl and csv are checked here before ``datasets`` parses them), ``adapter_config.json``,
run records, checkpoint state and the embedded adapters of a MeteoRA folder. Here:

- *strict UTF-8*: a byte that is not UTF-8 is named by line, column and offset (a UTF-16 file,
  as Windows editors save "Unicode", is named as such); a leading UTF-8 byte order mark is read;
- *bounded nesting*: JSON nested deeper than ``MAX_NESTING`` levels is refused before it is
  parsed (Python's parser recurses once per level, so ``[[[[...]]]]`` would end in a
  ``RecursionError``, and pyarrow's reader under ``datasets`` crashes on it);
- *strict JSON*: a key repeated in one object is an error (Python's ``json`` keeps the last
  value silently, so ``"lr": 1e-4, ..., "lr": 3e-4`` would train with a value the user may not
  have meant), a number Python refuses to convert is named, and a YAML file (upstream m-LoRA's
  newer config format) is named as such instead of failing as "invalid JSON at line 1".

Functions come in two forms: ``*_problem`` / ``json_value`` return what is wrong as a phrase
(callers add the file name and their context), ``read_json_file`` / ``parse_json_text`` raise a
``ConfigError`` naming the file.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from pathlib import Path
from typing import Any

from mlora.core.errors import ConfigError

YAML_SUFFIXES = (".yaml", ".yml")
MAX_NESTING = 100  # levels of [ and {: far beyond any config or data row, far below recursion
_YAML_FIRST_LINE = re.compile(r"^[A-Za-z_][\w-]*:(\s|$)")
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.S)
_DEPTH_CHANGE = {"[": 1, "{": 1, "]": -1, "}": -1}
_UTF16_MARKS = (b"\xff\xfe", b"\xfe\xff")
UTF8_BOM = "\ufeff"


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class TextProblem(ValueError):
    """What is wrong with a file's text, as a phrase (the caller names the file)."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _line_and_column(text: str | bytes, offset: int) -> tuple[int, int]:
    newline = "\n" if isinstance(text, str) else b"\n"
    line = text.count(newline, 0, offset) + 1  # type: ignore[arg-type]
    return line, offset - (text.rfind(newline, 0, offset) + 1) + 1  # type: ignore[arg-type]


def decode_utf8(data: bytes) -> str:
    """``data`` as text, strictly UTF-8 (a leading byte order mark dropped).

    Raises:
        TextProblem: where the first byte that is not UTF-8 is (line, column, offset, value).
    """
    try:
        return data.decode("utf-8").removeprefix(UTF8_BOM)
    except UnicodeDecodeError as exc:
        if data.startswith(_UTF16_MARKS):
            raise TextProblem("UTF-16 text, not UTF-8 (save it as UTF-8)") from None
        line, column = _line_and_column(data, exc.start)
        raise TextProblem(
            f"not UTF-8 text: line {line}, column {column} (byte {exc.start}: "
            f"0x{data[exc.start]:02x}); save it as UTF-8"
        ) from None


def nesting_problem(text: str) -> str | None:
    """Where JSON ``text`` nests deeper than ``MAX_NESTING`` levels, or None.

    Linear in the text and fast (regular expressions do the scanning); only a text that is too
    deep is walked again to find the line of the first level too many.
    """
    if text.count("[") + text.count("{") <= MAX_NESTING:
        return None
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if max(accumulate(map(_DEPTH_CHANGE.__getitem__, brackets)), default=0) <= MAX_NESTING:
        return None
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        token = match.group()
        if token[0] == '"':
            continue
        depth += _DEPTH_CHANGE[token]
        if depth > MAX_NESTING:
            line, column = _line_and_column(text, match.start())
            return f"JSON nested deeper than {MAX_NESTING} levels at line {line}, column {column}"
    return None  # pragma: no cover - the fast count above and this walk agree


def _looks_like_yaml(text: str) -> bool:
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return bool(lines) and _YAML_FIRST_LINE.match(lines[0]) is not None


def parse_json(text: str) -> Any:
    """Parse JSON text strictly (see the module docstring).

    Raises:
        TextProblem: too deep, invalid JSON (line and column), a repeated key, or a number
            Python will not convert; the phrase names where.
    """
    problem = nesting_problem(text)
    if problem:
        raise TextProblem(problem)
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise TextProblem(f"key {exc.key!r} appears twice in one object (keep one)") from None
    except json.JSONDecodeError as exc:
        raise TextProblem(
            f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except ValueError as exc:  # e.g. an integer longer than Python's 4300-digit limit
        raise TextProblem(f"invalid JSON: {str(exc).splitlines()[0]}") from None


def read_text(path: Path) -> str:
    """A text file's contents, strictly UTF-8.

    Raises:
        OSError: the file cannot be read (callers say so in their words).
        TextProblem: not UTF-8 (where).
    """
    return decode_utf8(Path(path).read_bytes())


def json_value(path: Path) -> tuple[Any, str | None]:
    """``(value, None)`` for a readable, strict UTF-8 JSON file, else ``(None, what is
    wrong)``: the form for files checked before use (adapter folders, run records)."""
    try:
        return parse_json(read_text(path)), None
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    except TextProblem as exc:
        return None, str(exc)


def text_file_problem(path: Path, is_json: bool) -> str | None:
    """What makes a data file unreadable as text (not UTF-8; with ``is_json``, nested too
    deeply), or None; its rows are parsed and checked afterwards by their own reader."""
    try:
        text = read_text(path)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    except TextProblem as exc:
        return str(exc)
    return nesting_problem(text) if is_json else None


def yaml_refusal(path: Path, what: str) -> ConfigError:
    return ConfigError(
        f"{path}: YAML, not JSON: mlora reads {what} written as JSON (upstream m-LoRA's YAML "
        "format, with dispatcher/datasets/adapters/tasks, is not read; see README "
        "'Upstream m-LoRA files')"
    )


def parse_json_text(text: str, source: str | Path, what: str = "config files") -> Any:
    """Parse JSON text strictly.

    Args:
        source: the file the text came from, named in errors.
        what: what the file is, for the YAML message ("config files", "prompt templates").

    Raises:
        ConfigError: nested too deeply, invalid JSON (line and column), a duplicate key, or YAML.
    """
    try:
        return parse_json(text)
    except TextProblem as exc:
        if str(exc).startswith("invalid JSON at") and _looks_like_yaml(text):
            raise yaml_refusal(Path(source), what) from None
        raise ConfigError(f"{source}: {exc}") from None


def read_json_file(path: str | Path, what: str = "config files") -> Any:
    """Read and strictly parse a JSON file.

    Args:
        what: what the file is, plural ("config files", "prompt templates"), for messages.

    Raises:
        ConfigError: missing, unreadable or non-UTF-8 file, a ``.yaml``/``.yml`` file, JSON
            nested too deeply, invalid JSON or a duplicate key.
    """
    path = Path(path)
    one = what.removesuffix("s")
    if path.suffix.lower() in YAML_SUFFIXES:
        raise yaml_refusal(path, what)
    try:
        text = read_text(path)
    except FileNotFoundError:
        raise ConfigError(f"{one} not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {one} {path}: {exc.strerror or exc}") from None
    except TextProblem as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return parse_json_text(text, path, what)
