"""Reading the JSON files users write (configs, templates): strict, with one-line errors.

Strict means a key repeated in one object is an error (Python's ``json`` keeps the last value
silently, so ``"lr": 1e-4, ..., "lr": 3e-4`` would train with a value the user may not have
meant), and a YAML file (upstream m-LoRA's newer config format) is named as such instead of
failing as "invalid JSON at line 1".
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mlora.core.errors import ConfigError

YAML_SUFFIXES = (".yaml", ".yml")
_YAML_FIRST_LINE = re.compile(r"^[A-Za-z_][\w-]*:(\s|$)")


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _looks_like_yaml(text: str) -> bool:
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return bool(lines) and _YAML_FIRST_LINE.match(lines[0]) is not None


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
        ConfigError: invalid JSON (line and column), a duplicate key, or YAML.
    """
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise ConfigError(
            f"{source}: key {exc.key!r} appears twice in one object (keep one)"
        ) from None
    except json.JSONDecodeError as exc:
        if _looks_like_yaml(text):
            raise yaml_refusal(Path(source), what) from None
        raise ConfigError(
            f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None


def read_json_file(path: str | Path, what: str = "config files") -> Any:
    """Read and strictly parse a JSON file.

    Args:
        what: what the file is, plural ("config files", "prompt templates"), for messages.

    Raises:
        ConfigError: missing, unreadable or non-UTF-8 file, a ``.yaml``/``.yml`` file, invalid
            JSON or a duplicate key.
    """
    path = Path(path)
    one = what.removesuffix("s")
    if path.suffix.lower() in YAML_SUFFIXES:
        raise yaml_refusal(path, what)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{one} not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {one} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return parse_json_text(text, path, what)
