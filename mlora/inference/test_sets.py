"""Each adapter's test data, read and tokenized on the host before the model loads.

What ``mlora.inference.evaluation`` scores: a ``casual`` (or conversational, text, preference)
adapter's ``test_data`` rows tokenized as in training, with the prompts generation is asked and
the answers expected; a choice task's questions, one scoring row per choice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mlora.config.schema import AdapterConfig, TrainConfig
from mlora.core.errors import ConfigError, DataError
from mlora.data.chat import special_tokens_for
from mlora.data.dataset import tokenize_dataset
from mlora.data.formats import generation_examples
from mlora.data.prompts import load_template
from mlora.data.rows import IGNORE_INDEX, TokenizedRow
from mlora.data.tasks import CHOICE_TASKS, choice_source, load_choice_questions, read_test_rows
from mlora.inference.preference_eval import preference_units
from mlora.training.objectives import Objective, check_objective_fits

logger = logging.getLogger("mlora")

# Tokens generated beyond an adapter's longest reference answer: enough to see what the model
# says instead; an answer that long can no longer match after strip() anyway.
ANSWER_SLACK_TOKENS = 8


@dataclass
class TestSet:
    """One adapter's prepared test data (tokenized on the host, before the model loads).

    Attributes:
        units: the scoring rows of each test row: one for ``casual``, one per choice otherwise.
        prompts: ``casual`` only: each test row's rendered prompt, for generation.
        references: the expected answers (``casual``: outputs; choices: the right choice text).
        choices: choice tasks only: each question's candidate texts.
        labels: choice tasks only: index of each question's right choice.
        max_new_tokens: ``casual`` only: generation length (longest reference + slack).
    """

    adapter: str
    task: str
    batch_size: int
    units: list[list[TokenizedRow]]
    prompts: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    choices: list[tuple[str, ...]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    max_new_tokens: int = 0
    objective: Objective | None = None  # preference adapters: units are (chosen, rejected)

    @property
    def is_choice(self) -> bool:
        return self.task in CHOICE_TASKS


def has_test_data(adapter: AdapterConfig) -> bool:
    """Choice tasks always have some (a local file or the hub); ``casual`` needs ``test_data``."""
    return adapter.task_name in CHOICE_TASKS or adapter.test_data is not None


def select_adapters(config: TrainConfig, names: Sequence[str] | None = None) -> list[AdapterConfig]:
    """The adapters to evaluate: ``names`` (in that order), else every one with test data.

    Raises:
        ConfigError: an unknown name, a named adapter without ``test_data``, or none to evaluate.
    """
    names = [n.strip() for n in names or () if n.strip()]
    if names:
        known = [a.name for a in config.lora]
        chosen = []
        for name in names:
            if name not in known:
                raise ConfigError(
                    f"{config.source}: unknown adapter {name!r} (adapters: {', '.join(known)})"
                )
            adapter = config.adapter(name)
            if not has_test_data(adapter):
                raise ConfigError(f"{config.source}: adapter {name!r} has no test_data to evaluate")
            chosen.append(adapter)
        return chosen
    chosen = [a for a in config.lora if has_test_data(a)]
    if not chosen:
        raise ConfigError(f"{config.source}: no adapter has test_data to evaluate")
    for adapter in config.lora:
        if not has_test_data(adapter):
            logger.info("adapter %s: no test_data, not evaluated", adapter.name)
    return chosen


def token_count(row: TokenizedRow) -> int:
    """Supervised next-token positions of a row (the first token is never predicted)."""
    return sum(1 for label in row.labels[1:] if label != IGNORE_INDEX)


def _casual_test_set(adapter: AdapterConfig, tokenizer: Any, cutoff_len: int) -> TestSet:
    if adapter.test_data is None:
        raise ValueError(f"adapter {adapter.name!r} has no test_data to evaluate")
    source = adapter.test_data
    rows = read_test_rows(adapter.name, source)
    template = load_template(adapter.prompt)
    fmt, units = tokenize_dataset(
        rows, tokenizer, template, cutoff_len, adapter.data_format, adapter.train_on_inputs,
        source=source,
    )  # fmt: skip
    if fmt == "preference" or adapter.objective != "sft":
        check_objective_fits(adapter, fmt)
        return TestSet(
            adapter=adapter.name,
            task=adapter.task_name,
            batch_size=adapter.evaluate_batch_size,
            units=preference_units(units),
            objective=Objective.from_config(adapter),
        )
    if fmt == "alpaca":
        prompts = [template.render(r["instruction"], r.get("input") or "") for r in rows]
        references = [row["output"] for row in rows]
    else:  # rendered as in training: the chat template for conversations
        prompts, references = generation_examples(rows, fmt, tokenizer, source)
    answers = tokenizer(references, add_special_tokens=False)["input_ids"] if references else []
    return TestSet(
        adapter=adapter.name,
        task=adapter.task_name,
        batch_size=adapter.evaluate_batch_size,
        units=[[row] for row in units],
        prompts=prompts,
        references=references,
        max_new_tokens=max((len(ids) for ids in answers), default=0) + ANSWER_SLACK_TOKENS,
    )


def choice_rows(
    tokenizer: Any, prompt: str, choices: Sequence[str], cutoff_len: int, where: str
) -> list[TokenizedRow]:
    """One scoring row per choice: ``tokenizer(prompt + choice)``, labels on the choice only.

    The same contract as training data (joint tokenization, the first ``len(tokenizer(prompt))``
    tokens masked) without EOS. Rows longer than ``cutoff_len`` lose tokens from the left, so
    the choice itself is always scored whole.

    Raises:
        DataError: a choice that adds no token after the prompt (``where`` names the row).
    """
    special = special_tokens_for(prompt)  # a chat-rendered prompt: no special tokens added
    prompt_len = len(tokenizer(str(prompt), **special)["input_ids"])
    rows = []
    for ids in tokenizer([prompt + c for c in choices], **special)["input_ids"]:
        if len(ids) <= prompt_len:
            raise DataError(f"{where}: a choice adds no token after the prompt")
        labels = [IGNORE_INDEX] * prompt_len + ids[prompt_len:]
        rows.append(TokenizedRow(ids[-cutoff_len:], labels[-cutoff_len:]))
    return rows


def _choice_test_set(adapter: AdapterConfig, tokenizer: Any, cutoff_len: int) -> TestSet:
    source = choice_source(adapter.test_data, adapter.data)
    if source is not None and source == adapter.data and adapter.test_data is None:
        logger.warning(
            "adapter %s: no test_data, evaluating %s on its data file %s",
            adapter.name,
            adapter.task_name,
            source,
        )
    questions = load_choice_questions(adapter.task_name, source, adapter.name)
    template = load_template(adapter.prompt)
    where = source or CHOICE_TASKS[adapter.task_name].hub_name
    units = [
        choice_rows(
            tokenizer, template.render(q.question), q.choices, cutoff_len, f"{where}: row {i}"
        )
        for i, q in enumerate(questions)
    ]
    return TestSet(
        adapter=adapter.name,
        task=adapter.task_name,
        batch_size=adapter.evaluate_batch_size,
        units=units,
        references=[q.choices[q.label] for q in questions],
        choices=[q.choices for q in questions],
        labels=[q.label for q in questions],
    )


def prepare_test_sets(
    config: TrainConfig, tokenizer: Any, adapters: Sequence[str] | None = None
) -> list[TestSet]:
    """Load and tokenize the test data of the selected adapters (before any model loads).

    Raises:
        ConfigError / DataError: unknown adapter, no test data, a missing, empty or malformed file.
    """
    sets = []
    for adapter in select_adapters(config, adapters):
        build = _choice_test_set if adapter.task_name in CHOICE_TASKS else _casual_test_set
        sets.append(build(adapter, tokenizer, config.cutoff_len))
    return sets
