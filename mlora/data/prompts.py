"""Prompt templates: turn an alpaca-style row into the prompt text the model sees.

A template is a JSON object with ``prompt_input`` (used when the row has an ``input``) and
``prompt_no_input``, each with ``{instruction}`` / ``{input}`` placeholders — the upstream
m-LoRA / alpaca-lora format, so existing template files keep working. Upstream's older format
(``prompt`` / ``prompt_no_input`` ending in ``{output}``, TUDB-Labs/mLoRA 2023-2024) is read too:
the text before ``{output}`` is the prompt.
"""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlora.core.errors import ConfigError
from mlora.core.jsonfile import read_json_file

OUTPUT_PLACEHOLDER = "{output}"
OLDER_FORMAT_NOTE = (
    "older upstream template format read: the text before {output} is the prompt; upstream "
    "also trained on the prompt tokens (set train_on_inputs: true for that) and ended each row "
    "with the text after {output}, mlora ends it with EOS"
)
_noted: set[str] = set()  # templates whose note was logged (several stages load a template)

logger = logging.getLogger("mlora")

_ALPACA = {
    "description": "Template used by Alpaca-LoRA.",
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    ),
}
BUILTIN_TEMPLATES = {"alpaca": _ALPACA}


@dataclass(frozen=True)
class PromptTemplate:
    """Renders prompts; the output text is appended after the prompt for training."""

    prompt_input: str
    prompt_no_input: str

    def render(self, instruction: str, input: str = "") -> str:
        if input:
            return self.prompt_input.format(instruction=instruction, input=input)
        return self.prompt_no_input.format(instruction=instruction)


PLACEHOLDERS = {"prompt_input": {"instruction", "input"}, "prompt_no_input": {"instruction"}}


def placeholder_problem(text: str, known: set[str]) -> str | None:
    """What is wrong with a template string's ``{placeholders}`` (unknown, or broken braces)."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as exc:
        return f"{exc} (write a literal brace as {{{{ or }}}})"
    unknown = [name for name in fields if name not in known]
    if unknown:
        return f"unknown placeholder {{{unknown[0]}}} (it may use {', '.join(sorted(known))})"
    return None


def load_template(name_or_path: str) -> PromptTemplate:
    """A built-in template by name, or a template JSON file.

    Raises:
        ConfigError: unknown name and no such file, an unreadable or non-UTF-8 file, a file
            without the two prompt keys, or a placeholder other than ``{instruction}`` /
            ``{input}`` (naming the file and the key).
    """
    if name_or_path in BUILTIN_TEMPLATES:
        raw = BUILTIN_TEMPLATES[name_or_path]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            known = ", ".join(BUILTIN_TEMPLATES)
            raise ConfigError(
                f"unknown prompt template {name_or_path!r}: "
                f"not a built-in ({known}) and no such file"
            )
        raw = read_json_file(path, "prompt templates")
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a prompt template must be a JSON object")
    raw = _older_format(raw, name_or_path)
    for key, known in PLACEHOLDERS.items():
        if key not in raw:
            raise ConfigError(f"prompt template {name_or_path}: missing string key {key!r}")
        if not isinstance(raw[key], str):
            raise ConfigError(f"prompt template {name_or_path}: key {key!r} is of the wrong type")
        problem = placeholder_problem(raw[key], known)
        if problem:
            raise ConfigError(f"prompt template {name_or_path}: key {key!r}: {problem}")
    return PromptTemplate(raw["prompt_input"], raw["prompt_no_input"])


def _older_format(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Upstream's older ``prompt`` / ``prompt_no_input`` texts ending in ``{output}`` as the
    current two prompts (the text before ``{output}``); other templates unchanged.

    Raises:
        ConfigError: an older-format text without ``{output}``.
    """
    if "prompt_input" not in raw and isinstance(raw.get("prompt"), str):
        raw = {**raw, "prompt_input": raw["prompt"]}
    elif not any(
        OUTPUT_PLACEHOLDER in str(raw.get(k)) for k in ("prompt_input", "prompt_no_input")
    ):
        return raw
    cut = {}
    for key in ("prompt_input", "prompt_no_input"):
        text = raw.get(key)
        if isinstance(text, str):
            if OUTPUT_PLACEHOLDER not in text:
                shown = "prompt" if key == "prompt_input" and "prompt" in raw else key
                raise ConfigError(
                    f"prompt template {source}: key {shown!r} has no {OUTPUT_PLACEHOLDER} "
                    "(the older upstream format ends each text with it)"
                )
            cut[key] = text[: text.index(OUTPUT_PLACEHOLDER)]
    if source not in _noted:
        _noted.add(source)
        logger.info("%s: %s", source, OLDER_FORMAT_NOTE)
    return {**raw, **cut}
