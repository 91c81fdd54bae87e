"""Built-in multiple-choice tasks: each benchmark's schema mapped to (question, choices, label).

A task is named in an adapter's ``task_name``. Its questions come from a local file of the
task's own schema (``test_data``, else a local ``data`` file; json/jsonl/csv/parquet read
through ``datasets``), or, when neither is a local file, from the hub dataset's evaluation split
through ``datasets`` (online).
Scoring (``mlora.inference.evaluation``) compares the model's log-likelihood of each choice text
written after the adapter's prompt template rendered with the question.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlora.core.errors import DataError, first_line
from mlora.core.hub import before_hub_access
from mlora.data.rows import (
    dataset_load_errors,
    is_empty_data_file,
    is_local_source,
    load_rows,
    local_data_path,
)


@dataclass(frozen=True)
class ChoiceQuestion:
    """One multiple-choice question: the prompt text, the candidate answers and the right one."""

    question: str
    choices: tuple[str, ...]
    label: int


def _lettered(row: dict[str, Any], question_key: str) -> ChoiceQuestion:
    """ARC / OpenBookQA: ``choices = {text: [...], label: ["A", ...]}``, ``answerKey``."""
    choices = row["choices"]
    labels = [str(x) for x in choices["label"]]
    return ChoiceQuestion(
        row[question_key], tuple(choices["text"]), labels.index(str(row["answerKey"]))
    )


def _boolq(row: dict[str, Any]) -> ChoiceQuestion:
    question = f"{row['passage']}\nQuestion: {row['question']}?"
    answer = row["answer"]
    if isinstance(answer, str):  # csv files carry booleans as text
        answer = answer.strip().lower() in ("true", "1", "yes")
    return ChoiceQuestion(question, ("no", "yes"), int(bool(answer)))


def _piqa(row: dict[str, Any]) -> ChoiceQuestion:
    return ChoiceQuestion(row["goal"], (row["sol1"], row["sol2"]), int(row["label"]))


def _siqa(row: dict[str, Any]) -> ChoiceQuestion:
    question = f"{row['context']} {row['question']}"
    choices = (row["answerA"], row["answerB"], row["answerC"])
    return ChoiceQuestion(question, choices, int(row["label"]) - 1)  # labels are "1".."3"


def _hellaswag(row: dict[str, Any]) -> ChoiceQuestion:
    question = f"{row['activity_label']}: {row['ctx']}"
    return ChoiceQuestion(question, tuple(row["endings"]), int(row["label"]))


def _winogrande(row: dict[str, Any]) -> ChoiceQuestion:
    choices = (row["option1"], row["option2"])
    return ChoiceQuestion(row["sentence"], choices, int(row["answer"]) - 1)  # "1" / "2"


@dataclass(frozen=True)
class ChoiceTask:
    """Where a task's data lives on the hub, the fields a row needs, and how to read one.

    Attributes:
        hub_path, hub_config, split: ``datasets.load_dataset(hub_path, hub_config, split=split)``.
        fields: the row fields the schema needs (checked before anything loads a model).
        convert: row -> ChoiceQuestion.
    """

    hub_path: str
    hub_config: str | None
    split: str
    fields: tuple[str, ...]
    convert: Callable[[dict[str, Any]], ChoiceQuestion]

    @property
    def hub_name(self) -> str:
        return self.hub_path + (f" ({self.hub_config})" if self.hub_config else "")


CHOICE_TASKS: dict[str, ChoiceTask] = {
    "arc-e": ChoiceTask(
        "allenai/ai2_arc",
        "ARC-Easy",
        "test",
        ("question", "choices", "answerKey"),
        lambda r: _lettered(r, "question"),
    ),
    "arc-c": ChoiceTask(
        "allenai/ai2_arc",
        "ARC-Challenge",
        "test",
        ("question", "choices", "answerKey"),
        lambda r: _lettered(r, "question"),
    ),
    "boolq": ChoiceTask(
        "google/boolq", None, "validation", ("question", "passage", "answer"), _boolq
    ),
    "obqa": ChoiceTask(
        "allenai/openbookqa",
        "main",
        "test",
        ("question_stem", "choices", "answerKey"),
        lambda r: _lettered(r, "question_stem"),
    ),
    "piqa": ChoiceTask("ybisk/piqa", None, "validation", ("goal", "sol1", "sol2", "label"), _piqa),
    "siqa": ChoiceTask(
        "allenai/social_i_qa",
        None,
        "validation",
        ("context", "question", "answerA", "answerB", "answerC", "label"),
        _siqa,
    ),
    "hellaswag": ChoiceTask(
        "Rowan/hellaswag",
        None,
        "validation",
        ("activity_label", "ctx", "endings", "label"),
        _hellaswag,
    ),
    "winogrande": ChoiceTask(
        "allenai/winogrande",
        "winogrande_xl",
        "validation",
        ("sentence", "option1", "option2", "answer"),
        _winogrande,
    ),
}


def read_test_rows(adapter: str, source: str, key: str = "test_data") -> list[dict[str, Any]]:
    """The rows of a data file (or hub dataset), with one-line errors naming adapter and key.

    Raises:
        DataError: the file is missing, empty or unreadable.
    """
    path = local_data_path(source, f"adapter {adapter!r}: {key}")
    if path is not None and is_empty_data_file(path):
        raise DataError(f"adapter {adapter!r}: {key} {source} is empty (no rows)")
    return load_rows(source)


def _load_hub(
    task_name: str, task: ChoiceTask, adapter: str, split: str | None = None
) -> list[dict[str, Any]]:
    import datasets

    datasets.disable_progress_bars()
    before_hub_access(f"task {task_name} ({task.hub_path})")
    try:
        dataset = datasets.load_dataset(task.hub_path, task.hub_config, split=split or task.split)
    except dataset_load_errors() as exc:  # offline, missing, renamed: the user needs one line
        raise DataError(
            f"adapter {adapter!r}: task {task_name!r} needs a local data file in the "
            f"{task.hub_name} schema (fields: {', '.join(task.fields)}) or the hub dataset, "
            f"which could not be loaded: {first_line(exc)}"
        ) from None
    return dataset.to_list()


def questions_from_rows(
    task_name: str, rows: list[dict[str, Any]], source: str
) -> list[ChoiceQuestion]:
    """Map rows of a task's schema to questions.

    Raises:
        DataError: a row missing a field, or with a label outside its choices (file and row named).
    """
    task = CHOICE_TASKS[task_name]
    questions = []
    for index, row in enumerate(rows):
        missing = [f for f in task.fields if row.get(f) in (None, "")]
        if missing:
            raise DataError(
                f"{source}: row {index} is missing the field {missing[0]!r} "
                f"(task {task_name} expects the {task.hub_name} schema: {', '.join(task.fields)})"
            )
        try:
            question = task.convert(row)
        except (KeyError, ValueError, TypeError) as exc:
            raise DataError(
                f"{source}: row {index} does not fit task {task_name} ({type(exc).__name__}: {exc})"
            ) from None
        if not 0 <= question.label < len(question.choices) or not all(question.choices):
            raise DataError(f"{source}: row {index} has no valid answer among its choices")
        questions.append(question)
    return questions


def choice_source(test_data: str | None, data: str) -> str | None:
    """The local file a choice task is read from: ``test_data``, else a local ``data`` file.

    ``None`` means the hub dataset's evaluation split.
    """
    if test_data is not None:
        return test_data
    return data if is_local_source(data) else None


def load_choice_questions(task_name: str, source: str | None, adapter: str) -> list[ChoiceQuestion]:
    """The questions of ``task_name``: from the local file ``source``, or (``None``) the hub.

    Raises:
        DataError: a missing/empty/malformed local file, or no local file and the hub unreachable.
    """
    task = CHOICE_TASKS[task_name]
    if source is not None:
        return questions_from_rows(task_name, read_test_rows(adapter, source), source)
    rows = _load_hub(task_name, task, adapter)
    if not rows:
        raise DataError(f"adapter {adapter!r}: {task.hub_name} split {task.split!r} is empty")
    return questions_from_rows(task_name, rows, task.hub_name)


def training_rows(task_name: str, data: str, adapter: str) -> list[dict[str, Any]]:
    """A choice task's training data as alpaca rows: the question, then the right choice.

    This is the format the task is scored in (the choice's likelihood after the prompt), so an
    adapter trained on it learns exactly what evaluation measures. ``data`` is a local file of
    the task's schema; anything else means the hub dataset's ``train`` split.

    Raises:
        DataError: as ``load_choice_questions``.
    """
    task = CHOICE_TASKS[task_name]
    if is_local_source(data):
        questions = questions_from_rows(task_name, read_test_rows(adapter, data, "data"), data)
    else:
        rows = _load_hub(task_name, task, adapter, split="train")
        questions = questions_from_rows(task_name, rows, f"{task.hub_name} train")
    return [
        {"instruction": q.question, "input": "", "output": q.choices[q.label]} for q in questions
    ]
