"""mlora's built-in choice tasks as lm-evaluation-harness tasks, over the same rows.

Each of mlora's choice tasks (``mlora.data.tasks``) is a harness task: ``arc-e`` = ``arc_easy``,
``arc-c`` = ``arc_challenge``, ``boolq`` = ``boolq``, ``obqa`` = ``openbookqa``, ``piqa`` =
``piqa``, ``siqa`` = ``social_iqa``, ``hellaswag`` = ``hellaswag``, ``winogrande`` =
``winogrande``. Scored through the harness, an adapter's own local test rows are read by a
small task YAML that ``include``s the harness's own task definition (its prompt, choices,
target and metrics: ``acc``, and ``acc_norm`` where the harness defines it) and only points its
dataset at the rows. The rows are checked by mlora's reader first (a bad row is one line naming
it) and written in the harness dataset's schema (the few fields that differ are filled in).
Without a local file the harness's own task reads its hub dataset.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlora.config.schema import AdapterConfig
from mlora.core.atomic import atomic_write_text
from mlora.core.errors import MloraError
from mlora.data.tasks import (
    ChoiceQuestion,
    choice_source,
    questions_from_rows,
    read_test_rows,
)

Row = dict[str, Any]


def _boolq(row: Row, question: ChoiceQuestion) -> Row:
    return {**row, "label": question.label}  # super_glue's label where google/boolq has answer


def _winogrande(row: Row, question: ChoiceQuestion) -> Row:
    return {**row, "answer": str(question.label + 1)}  # the harness maps the strings "1" / "2"


def _hellaswag(row: Row, question: ChoiceQuestion) -> Row:
    # the harness builds its prompt from ctx_a + " " + ctx_b; rows with only ctx keep it whole
    # (a file read whole gives every row every column: a missing one is None)
    if row.get("ctx_a") is None or row.get("ctx_b") is None:
        row = {**row, "ctx_a": row["ctx"], "ctx_b": ""}
    return {**row, "label": question.label}


def _same(row: Row, question: ChoiceQuestion) -> Row:
    return row


@dataclass(frozen=True)
class HarnessTask:
    """A harness task: its name, its YAML under ``lm_eval/tasks`` and the row conversion."""

    name: str
    yaml: str
    convert: Callable[[Row, ChoiceQuestion], Row] = _same


HARNESS_TASKS: dict[str, HarnessTask] = {
    "arc-e": HarnessTask("arc_easy", "arc/arc_easy.yaml"),
    "arc-c": HarnessTask("arc_challenge", "arc/arc_challenge.yaml"),
    "boolq": HarnessTask("boolq", "super_glue/boolq/default.yaml", _boolq),
    "obqa": HarnessTask("openbookqa", "openbookqa/openbookqa.yaml"),
    "piqa": HarnessTask("piqa", "piqa/piqa.yaml"),
    "siqa": HarnessTask("social_iqa", "siqa/siqa.yaml"),
    "hellaswag": HarnessTask("hellaswag", "hellaswag/hellaswag.yaml", _hellaswag),
    "winogrande": HarnessTask("winogrande", "winogrande/default.yaml", _winogrande),
}


def harness_yaml(task: HarnessTask) -> Path:
    """The harness's own YAML of ``task`` in the installed lm-eval.

    Raises:
        MloraError: this lm-eval keeps the task elsewhere (naming it).
    """
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / task.yaml
    if not path.is_file():
        raise MloraError(f"lm-eval has no task file {task.yaml} for {task.name} (lm-eval version?)")
    return path


@dataclass(frozen=True)
class PlannedTask:
    """One requested task for one adapter: what the user asked and what the harness runs.

    Attributes:
        asked: the name given (``arc-e``, ``lambada_openai``, ...); results are reported under it.
        harness: the harness task name that runs.
        rows: the local rows file it reads (None: the harness task's own data).
    """

    asked: str
    harness: str
    rows: str | None = None


def plan_task(
    asked: str, adapter: AdapterConfig, adapters: Sequence[AdapterConfig], workdir: Path
) -> PlannedTask:
    """What ``asked`` means for ``adapter``: an mlora choice name is the harness's task over
    local rows of that task (the adapter's own test rows if it trains on it, else those of the
    first adapter of ``adapters`` that does), or over the hub dataset when no adapter has a
    local file; any other name is the harness's task of that name.

    The generated task is named after its rows file, so adapters scored on the same rows run
    the same task (and share their batches).

    Raises:
        DataError: the rows are missing, empty or do not fit the task (file and row named).
    """
    task = HARNESS_TASKS.get(asked)
    if task is None:
        return PlannedTask(asked, asked)
    owners = [adapter] + [a for a in adapters if a.name != adapter.name]
    for owner in owners:
        source = choice_source(owner.test_data, owner.data) if owner.task_name == asked else None
        if source is not None:
            digest = hashlib.sha256(str(Path(source).resolve()).encode()).hexdigest()[:10]
            name = f"mlora_{task.name}_{digest}"
            if not (workdir / f"{name}.yaml").is_file():
                write_local_task(task, name, owner.name, source, asked, workdir)
            return PlannedTask(asked, name, source)
    return PlannedTask(asked, task.name)


def write_local_task(
    task: HarnessTask, name: str, adapter: str, source: str, asked: str, workdir: Path
) -> Path:
    """Write ``workdir/NAME.yaml`` (the harness's task over ``source``'s rows) and the rows.

    Raises:
        DataError: a missing, empty or malformed rows file (file and row named).
    """
    rows = read_test_rows(adapter, source)
    questions = questions_from_rows(asked, rows, source)
    converted = [task.convert(row, q) for row, q in zip(rows, questions, strict=True)]
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / f"{name}.json"
    atomic_write_text(data, json.dumps(converted, ensure_ascii=False, default=str))
    config = {
        "include": str(harness_yaml(task)),
        "task": name,
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "training_split": None,
        "validation_split": None,
        "test_split": "test",
    }
    path = workdir / f"{name}.yaml"
    atomic_write_text(path, json.dumps(config, indent=2) + "\n")  # JSON is YAML
    return path
