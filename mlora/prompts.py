"""Prompt templates: turn an alpaca-style row into the prompt text the model sees.

A template is a JSON object with ``prompt_input`` (used when the row has an ``input``) and
``prompt_no_input``, each with ``{instruction}`` / ``{input}`` placeholders — the upstream
m-LoRA / alpaca-lora format, so existing template files keep working.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlora.errors import ConfigError

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


def load_template(name_or_path: str) -> PromptTemplate:
    """A built-in template by name, or a template JSON file.

    Raises:
        ConfigError: unknown name and no such file, or a file without the two prompt keys.
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
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    missing = [k for k in ("prompt_input", "prompt_no_input") if not isinstance(raw.get(k), str)]
    if missing:
        raise ConfigError(f"prompt template {name_or_path}: missing string key {missing[0]!r}")
    return PromptTemplate(raw["prompt_input"], raw["prompt_no_input"])
