"""Preference pairs (TRL's ``prompt`` / ``chosen`` / ``rejected``) as two training rows each.

Each pair becomes two ``TokenizedRow``s, chosen then rejected, kept next to each other (the
dispatcher moves whole pairs): ``prompt + chosen`` and ``prompt + rejected`` with labels on the
completion only. Tokenized as TRL's ``DPOTrainer`` does: plain text gets EOS appended to both
completions; conversational rows render the prompt with the generation prompt, and the
completion starts where the prompt's ids and the full ids diverge (the smaller of the two);
rows are cut to ``cutoff_len`` from the end (``keep_start``), and a pair whose prompt fills
``cutoff_len`` is dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from mlora.core.errors import DataError
from mlora.data.chat import chat_ids, is_conversation, require_chat_template
from mlora.data.formats import common_prefix_length, required_field, with_eos
from mlora.data.rows import IGNORE_INDEX, TokenizedRow

PAIR_ROWS = 2  # chosen, rejected

logger = logging.getLogger("mlora")


def pair_ids(
    tokenizer: Any, prompt: Any, chosen: Any, rejected: Any
) -> tuple[list[int], list[int], list[int]]:
    """``(prompt ids, chosen ids, rejected ids)`` after TRL's ``DPOTrainer.tokenize_fn``."""
    if isinstance(prompt, list):
        prompt_ids = chat_ids(tokenizer, prompt, add_generation_prompt=True)["input_ids"]
        full_chosen = chat_ids(tokenizer, [*prompt, *chosen])["input_ids"]
        full_rejected = chat_ids(tokenizer, [*prompt, *rejected])["input_ids"]
    else:
        prompt_ids = tokenizer(text=prompt)["input_ids"]
        full_chosen = tokenizer(text=prompt + with_eos(chosen, tokenizer))["input_ids"]
        full_rejected = tokenizer(text=prompt + with_eos(rejected, tokenizer))["input_ids"]
    start = min(
        common_prefix_length(prompt_ids, full_chosen),
        common_prefix_length(prompt_ids, full_rejected),
    )
    return list(prompt_ids[:start]), list(full_chosen[start:]), list(full_rejected[start:])


def completion_row(prompt_ids: list[int], completion: list[int], cutoff_len: int) -> TokenizedRow:
    ids = prompt_ids + completion
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion
    return TokenizedRow(ids[:cutoff_len], labels[:cutoff_len], completion_start=len(prompt_ids))


def with_chosen_prompt_labels(rows: Sequence[TokenizedRow]) -> list[TokenizedRow]:
    """Pairs whose chosen rows also label their prompt: ORPO's NLL term covers the prompt and
    the response (TRL's ``ORPOTrainer``); the log-probs still start at ``completion_start``."""
    return [
        replace(row, labels=list(row.input_ids)) if i % PAIR_ROWS == 0 else row
        for i, row in enumerate(rows)
    ]


def read_pair(row: Any, where: str) -> tuple[Any, Any, Any]:
    """A row's ``(prompt, chosen, rejected)``: all text, or all lists of messages.

    Raises:
        DataError: a missing field (``rejected``, ...), or text mixed with messages.
    """
    chosen = required_field(row, "chosen", where, None)
    conversational = isinstance(chosen, list)
    prompt = required_field(row, "prompt", where, conversational)
    rejected = required_field(row, "rejected", where, conversational)
    return prompt, chosen, rejected


def tokenize_pairs(
    rows: Sequence[Any], tokenizer: Any, cutoff_len: int, source: str = "<data>"
) -> list[TokenizedRow]:
    """Rows ``[chosen 0, rejected 0, chosen 1, rejected 1, ...]`` of preference pairs.

    Raises:
        DataError: a row without ``prompt`` / ``chosen`` / ``rejected`` or of mixed kinds, an
            unknown role, conversational rows and no chat template (file and row named), or
            no pair left within ``cutoff_len``.
    """
    if rows and isinstance(rows[0], dict) and is_conversation(rows[0].get("chosen")):
        require_chat_template(tokenizer, source)
    out: list[TokenizedRow] = []
    skipped = 0
    for index, row in enumerate(rows):
        prompt, chosen, rejected = read_pair(row, f"{source}: row {index}")
        prompt_ids, chosen_ids, rejected_ids = pair_ids(tokenizer, prompt, chosen, rejected)
        if len(prompt_ids) >= cutoff_len or not chosen_ids or not rejected_ids:
            skipped += 1
            continue
        out += [
            completion_row(prompt_ids, chosen_ids, cutoff_len),
            completion_row(prompt_ids, rejected_ids, cutoff_len),
        ]
    if skipped:
        logger.warning(
            "%s: skipped %d of %d preference pairs whose prompt fills cutoff_len=%d",
            source, skipped, len(rows), cutoff_len,
        )  # fmt: skip
    if not out:
        raise DataError(f"{source}: no usable preference pairs within cutoff_len={cutoff_len}")
    return out
