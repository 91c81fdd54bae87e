"""The shapes training data comes in, told apart by their fields, and tokenized the way TRL does.

==================  ==================================  =========================================
format              fields (one row)                    loss on
==================  ==================================  =========================================
alpaca              instruction, input?, output         output + EOS (``mlora.data.rows``)
messages            messages (or ShareGPT's             the assistant turns (``mlora.data.chat``)
                    conversations: from / value)
prompt_completion   prompt, completion (text, or        the completion (+ EOS when plain text)
                    lists of messages)
text                text                                every token (+ EOS)
preference          prompt, chosen, rejected            chosen and rejected completions, in pairs
                                                        (``mlora.data.preference``)
==================  ==================================  =========================================

The token ids and labels equal what TRL's ``SFTTrainer`` builds from the same rows with the same
tokenizer (``assistant_only_loss=True`` for ``messages``, ``completion_only_loss`` for
prompt-completion; ``train_on_inputs`` turns either off), truncated to ``cutoff_len`` from the
end (TRL's ``keep_start``). Rows left with no token to learn are skipped with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from mlora.core.errors import DataError
from mlora.core.integrity import json_type
from mlora.data.chat import (
    chat_ids,
    chat_text,
    is_conversation,
    normalize_messages,
    require_chat_template,
    tokenize_conversation,
)
from mlora.data.rows import IGNORE_INDEX, TokenizedRow

DATA_FORMATS = ("alpaca", "messages", "prompt_completion", "text", "preference")
# The fields that tell a format apart, checked in this order on the first row.
FORMAT_FIELDS = (
    ("messages", ("messages",)),
    ("messages", ("conversations",)),
    ("preference", ("chosen",)),
    ("preference", ("rejected",)),
    ("prompt_completion", ("completion",)),
    ("text", ("text",)),
    ("alpaca", ("instruction",)),
    ("alpaca", ("output",)),
)
CHAT_FORMATS = ("messages",)

logger = logging.getLogger("mlora")


def detect_format(rows: Sequence[Any], source: str) -> str:
    """The format of ``rows``, from the fields of the first row.

    Raises:
        DataError: a first row that is no object or has no field of a known format.
    """
    first = rows[0] if rows else None
    if not isinstance(first, dict):
        raise DataError(f"{source}: row 0 is {json_type(first)}, not an object")
    for fmt, fields in FORMAT_FIELDS:
        if all(field in first for field in fields):
            return fmt
    raise DataError(
        f"{source}: row 0 has none of the fields of a known data format (alpaca: instruction/"
        "output; messages; prompt/completion; text; prompt/chosen/rejected)"
    )


def resolve_format(rows: Sequence[Any], requested: str, source: str) -> str:
    """``requested`` (a ``data_format`` key), or the detected format for ``"auto"``."""
    return detect_format(rows, source) if requested == "auto" else requested


def is_conversational(rows: Sequence[dict[str, Any]], fmt: str) -> bool:
    """Whether rows of ``fmt`` are rendered by the chat template (generation then uses it)."""
    if fmt in CHAT_FORMATS:
        return True
    field = {"prompt_completion": "prompt", "preference": "chosen"}.get(fmt)
    return field is not None and bool(rows) and is_conversation(rows[0].get(field))


def required_field(row: Any, field: str, where: str, conversational: bool | None) -> Any:
    """``row[field]``: text, or messages when ``conversational`` (None: either).

    Raises:
        DataError: a missing field, or one of the wrong kind (``where`` names file and row).
    """
    if not isinstance(row, dict):
        raise DataError(f"{where} is {json_type(row)}, not an object")
    value = row.get(field)
    if value is None:
        raise DataError(f"{where} is missing the field {field!r}")
    if conversational is None:
        conversational = is_conversation(value)
    if conversational:
        return normalize_messages(value, f"{where}: field {field!r}")
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {field!r} is of the wrong type ({json_type(value)}, not a string"
            + (")" if conversational is False else " or a list of messages)")
        )
    return value


def common_prefix_length(ids: Sequence[int], other: Sequence[int]) -> int:
    """Leading tokens two sequences share (TRL: where a completion starts when the prompt alone
    tokenizes differently from the prompt followed by the completion)."""
    count = 0
    for a, b in zip(ids, other, strict=False):
        if a != b:
            break
        count += 1
    return count


def with_eos(text: str, tokenizer: Any) -> str:
    """Plain text ends with the EOS token's text (TRL's ``add_eos``), once."""
    eos = tokenizer.eos_token
    return text if text.endswith(eos) else text + eos


def prompt_completion_ids(tokenizer: Any, prompt: Any, completion: Any) -> tuple[list[int], int]:
    """``(ids of prompt + completion, where the completion starts)`` as TRL tokenizes them.

    Conversational: ``prompt`` rendered with the generation prompt, then ``prompt + completion``;
    plain: ``tokenizer(prompt)`` and ``tokenizer(prompt + completion + EOS)``.
    """
    if isinstance(prompt, list):
        prompt_ids = chat_ids(tokenizer, prompt, add_generation_prompt=True)["input_ids"]
        full = chat_ids(tokenizer, [*prompt, *completion])["input_ids"]
    else:
        prompt_ids = tokenizer(text=prompt)["input_ids"]
        full = tokenizer(text=prompt + with_eos(completion, tokenizer))["input_ids"]
    return list(full), common_prefix_length(prompt_ids, full)


def masked_row(ids: Sequence[int], mask: Sequence[int], cutoff_len: int) -> TokenizedRow:
    """A row whose labels are the ids where ``mask`` is 1, cut to ``cutoff_len`` tokens."""
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
    return TokenizedRow(list(ids[:cutoff_len]), labels[:cutoff_len])


def tokenize_sft_rows(
    rows: Sequence[Any],
    fmt: str,
    tokenizer: Any,
    cutoff_len: int,
    train_on_inputs: bool = False,
    source: str = "<data>",
) -> list[TokenizedRow]:
    """Tokenize ``messages``, ``prompt_completion`` or ``text`` rows (see the module docstring).

    Raises:
        DataError: a row missing its fields or with fields of the wrong kind, an unknown role,
            a conversation without an assistant turn, conversational rows with a tokenizer
            without chat template (file and row named), or no row left to learn from.
    """
    out, skipped = [], 0
    conversational = is_conversational(rows, fmt)
    if conversational:
        require_chat_template(tokenizer, source)
    for index, row in enumerate(rows):
        where = f"{source}: row {index}"
        if fmt == "messages":
            field = "conversations" if isinstance(row, dict) and "conversations" in row else (
                "messages"
            )  # fmt: skip
            messages = required_field(row, field, where, True)
            rendered = tokenize_conversation(tokenizer, messages, where, not train_on_inputs)
            ids, mask = rendered.input_ids, rendered.mask
        elif fmt == "prompt_completion":
            prompt = required_field(row, "prompt", where, conversational)
            completion = required_field(row, "completion", where, conversational)
            ids, start = prompt_completion_ids(tokenizer, prompt, completion)
            mask = [int(train_on_inputs or i >= start) for i in range(len(ids))]
        elif fmt == "text":
            text = required_field(row, "text", where, False)
            ids = list(tokenizer(text=with_eos(text, tokenizer))["input_ids"])
            mask = [1] * len(ids)
        else:
            raise ValueError(f"not an SFT format handled here: {fmt}")
        row_out = masked_row(ids, mask, cutoff_len)
        if row_out.num_supervised == 0:
            skipped += 1
            continue
        out.append(row_out)
    if skipped:
        logger.warning(
            "%s: skipped %d of %d rows with no token to learn within cutoff_len=%d",
            source, skipped, len(rows), cutoff_len,
        )  # fmt: skip
    if not out:
        raise DataError(f"{source}: no usable rows (none has a token to learn within cutoff_len)")
    return out


def generation_examples(
    rows: Sequence[dict[str, Any]], fmt: str, tokenizer: Any, source: str = "<data>"
) -> tuple[list[str], list[str]]:
    """``(prompts, references)``: what generation is asked for each row, rendered as in
    training, and the answer it should give. ``messages``: the conversation up to its last
    assistant turn with the generation prompt, and that turn; ``prompt_completion``: the prompt
    (with the generation prompt when conversational) and the completion; ``text``: none.

    Raises:
        DataError: as ``tokenize_sft_rows`` (rows it already read, so not in practice).
    """
    prompts: list[str] = []
    references: list[str] = []
    if fmt == "text":
        return prompts, references
    conversational = is_conversational(rows, fmt)
    for index, row in enumerate(rows):
        where = f"{source}: row {index}"
        if fmt == "messages":
            field = "conversations" if "conversations" in row else "messages"
            messages = required_field(row, field, where, True)
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt: Any = messages[:last]
            reference = messages[last]["content"]
        else:
            prompt = required_field(row, "prompt", where, conversational)
            completion = required_field(row, "completion", where, conversational)
            reference = completion[-1]["content"] if conversational else completion
        prompts.append(chat_text(tokenizer, prompt) if isinstance(prompt, list) else prompt)
        references.append(reference)
    return prompts, references
