"""Training data: load each adapter's rows, render prompts, tokenize and mask labels.

The contract (tests and users rely on it): ``ids = tokenizer(prompt + output)`` truncated to
``cutoff_len - 1``, then EOS appended; labels are -100 over the first ``len(tokenizer(prompt))``
tokens unless ``train_on_inputs``. Rows whose prompt fills the whole cutoff have nothing to learn
and are skipped with a warning that counts them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlora.core.errors import DataError, first_line
from mlora.core.hub import before_hub_access, no_usage_counter
from mlora.core.integrity import json_type
from mlora.core.jsonfile import TextProblem, read_text, text_file_problem
from mlora.data.json_rows import small_json_rows
from mlora.data.prompts import PromptTemplate

IGNORE_INDEX = -100
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
TEXT_FORMATS = ("json", "csv")  # read as text: checked by the one reader first
REQUIRED_FIELDS = ("instruction", "output")


def dataset_load_errors() -> tuple[type[BaseException], ...]:
    """What ``datasets.load_dataset`` raises on a bad source: its own ``DatasetsError``s
    (a file it cannot parse, a dataset not found), pyarrow's ``ArrowException``s, ``OSError``
    (missing or unreadable file, offline, the hub's HTTP errors) and ``ValueError`` (bad JSON,
    CSV or encoding), and ``StopIteration``, where its json reader finds no first row in a file
    that holds no JSON value. Anything else is a bug: a traceback. (Imported here, on failure
    only: ``datasets`` is slow to import.)"""
    import pyarrow
    from datasets.exceptions import DatasetsError

    return (DatasetsError, pyarrow.ArrowException, OSError, ValueError, StopIteration)


logger = logging.getLogger("mlora")


@dataclass(frozen=True)
class TokenizedRow:
    """One training row: token ids and labels (-100 where no loss is taken), the index of its
    task among a MeteoRA adapter's embedded adapters (its ``task_field``; -1: none), and, for
    DPO, the reference model's summed log-prob of its completion (set before training)."""

    input_ids: list[int]
    labels: list[int]
    task: int = -1
    reference_logp: float | None = None
    completion_start: int = 0  # preference rows: where the completion starts

    @property
    def completion_tokens(self) -> int:
        """Labelled tokens from ``completion_start`` on: a preference completion's log-prob
        sums over these (ORPO also labels the chosen row's prompt, for its NLL term)."""
        start = max(1, self.completion_start)
        return sum(label != IGNORE_INDEX for label in self.labels[start:])

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        """Positions whose next token carries a label: the tokens this row's loss sums over."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


def pad_token_id(tokenizer: Any) -> int:
    """The id that pads batches: the tokenizer's pad token, else EOS (LLaMA-style tokenizers
    have none; padded positions are masked, so any id works)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_rows(source: str) -> list[dict[str, Any]]:
    """Read a local json/jsonl/csv/parquet file, or a hub dataset by name, as a list of dicts
    (through ``datasets``, except small plain JSON files: ``mlora.data.json_rows``).

    Raises:
        DataError: missing file, unreadable file, unsupported extension or an empty dataset.
    """
    path = local_data_path(source)
    if path is not None:
        fmt = LOCAL_FORMATS[path.suffix.lower()]
        problem = fmt in TEXT_FORMATS and text_file_problem(path, is_json=fmt == "json")
        if problem:  # before datasets: its readers fail obscurely or crash on these
            raise DataError(f"{source}: {problem}")
        if is_empty_data_file(path):  # datasets' json reader ends in StopIteration on these
            raise DataError(f"{source}: the dataset is empty")
        small = small_json_rows(path) if fmt == "json" else None
        if small is not None:  # the rows datasets would give, without importing it
            return small
        loader_args: dict[str, Any] = {"path": fmt, "data_files": str(path)}
    else:
        fmt, loader_args = "hub", {"path": source}
    import datasets

    datasets.disable_progress_bars()
    if path is None:
        before_hub_access(f"data {source}")
    quiet = logging.getLogger("datasets")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # its own error log would be a second line on stderr
    try:
        with no_usage_counter():  # no request beyond the data itself
            dataset = datasets.load_dataset(**loader_args, split="train")
    except dataset_load_errors() as exc:  # the user needs one line naming the file
        if path is not None and is_empty_data_file(path):
            raise DataError(f"{source}: the dataset is empty") from None
        where = json_problem_location(path) if path is not None and fmt == "json" else None
        raise DataError(f"{source}: {where}" if where else f"cannot load data {source}: "
                        f"{first_line(exc)}") from None  # fmt: skip
    finally:
        quiet.setLevel(level)
    try:
        rows = dataset.to_list()
    except UnicodeDecodeError as exc:  # a binary format's string column holding other bytes
        raise DataError(f"{source}: a text column holds bytes that are not UTF-8 ({exc.reason}); "
                        "write it as UTF-8") from None  # fmt: skip
    if not rows:
        raise DataError(f"{source}: the dataset is empty")
    return rows


def is_local_source(source: str) -> bool:
    """Whether ``source`` names a local file (existing, or with a data file extension) rather
    than a hub dataset."""
    path = Path(source)
    return path.exists() or path.suffix.lower() in LOCAL_FORMATS


def local_data_path(source: str, what: str = "data") -> Path | None:
    """The local data file ``source`` names, or None for a hub dataset name.

    Args:
        what: how the error names the file (e.g. ``adapter 'a': test_data``).

    Raises:
        DataError: a local file that is missing or of an unsupported format.
    """
    if not is_local_source(source):
        return None
    path = Path(source)
    if path.is_dir():
        raise DataError(f"{what}: {source} is a directory, not a data file")
    if not path.is_file():
        raise DataError(f"{what} file not found: {source}")
    if path.suffix.lower() not in LOCAL_FORMATS:
        raise DataError(f"{source}: unsupported data format (use {', '.join(LOCAL_FORMATS)})")
    return path


def is_empty_data_file(path: Path) -> bool:
    """No rows at all: an empty file or an empty JSON list (datasets reports it obscurely)."""
    if path.stat().st_size > 1024:
        return False
    return path.read_text(encoding="utf-8", errors="replace").strip() in ("", "[]", "{}")


def row_problem(row: Any) -> str | None:
    """What is wrong with one alpaca-style row (a missing field, a field of the wrong type)."""
    if not isinstance(row, dict):
        return f"is {json_type(row)}, not an object with 'instruction' and 'output'"
    for key in REQUIRED_FIELDS:
        if row.get(key) is None:
            return f"is missing the field {key!r}"
    for key in (*REQUIRED_FIELDS, "input"):
        if row.get(key) is not None and not isinstance(row[key], str):
            return f"field {key!r} is of the wrong type ({json_type(row[key])}, not a string)"
    return None


def _check_row(row: dict[str, Any], source: str, index: int) -> None:
    problem = row_problem(row)
    if problem:
        raise DataError(f"{source}: row {index} {problem}")


def json_problem_location(path: Path) -> str | None:
    """Where a JSON or JSON-lines data file goes wrong (``line N: ...`` / ``row N ...``), or
    None: read only after ``datasets`` failed on it, to name the line instead of its error."""
    try:
        text = read_text(path)
    except TextProblem as exc:
        return str(exc)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as whole:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if number == 1 and whole.lineno > 1:  # one JSON document, broken further down
                    return f"invalid JSON at line {whole.lineno}, column {whole.colno}: {whole.msg}"
                return f"line {number}: invalid JSON at column {exc.colno}: {exc.msg}"
            except ValueError as exc:  # a number Python will not convert
                return f"line {number}: {first_line(exc)}"
    except ValueError as exc:  # a number Python will not convert
        return first_line(exc)
    if not isinstance(rows, list):
        return f"must hold a list of rows (or one row per line), not {json_type(rows)}"
    alpaca = (
        bool(rows) and isinstance(rows[0], dict) and not rows[0].keys().isdisjoint(REQUIRED_FIELDS)
    )  # other formats: their rows are checked where they are tokenized
    for index, row in enumerate(rows):
        problem = row_problem(row) if alpaca or not isinstance(row, dict) else None
        if problem:
            return f"row {index} {problem}"
    return None


def row_task(
    row: dict[str, Any], index: int, task_field: str | None, names: Sequence[str], source: str
) -> int:
    """The index in ``names`` of the task ``row[task_field]`` names (-1 without a task field).

    Raises:
        DataError: the field is missing or names no task (file, row and choices named).
    """
    if task_field is None:
        return -1
    value = row.get(task_field)
    if value is None:
        raise DataError(f"{source}: row {index} is missing the field {task_field!r}")
    if value not in names:
        raise DataError(
            f"{source}: row {index}: {task_field!r} is {value!r}, not one of the embedded "
            f"adapters ({', '.join(names)})"
        )
    return list(names).index(value)


def tokenize_rows(
    rows: list[dict[str, Any]],
    tokenizer: Any,
    template: PromptTemplate,
    cutoff_len: int,
    train_on_inputs: bool = False,
    source: str = "<data>",
    task_field: str | None = None,
    task_names: Sequence[str] = (),
) -> list[TokenizedRow]:
    """Tokenize alpaca-style rows following the contract in the module docstring.

    Args:
        task_field, task_names: MeteoRA: each row's ``task_field`` names one of ``task_names``;
            its index becomes the row's ``task`` (the gate's label).

    Raises:
        DataError: a row missing ``instruction`` or ``output`` (file and row named), a task
            label missing or unknown, or no row left.
    """
    for index, row in enumerate(rows):
        _check_row(row, source, index)
    tasks = [row_task(r, i, task_field, task_names, source) for i, r in enumerate(rows)]
    prompts = [template.render(r["instruction"], r.get("input") or "") for r in rows]
    full = tokenizer([p + r["output"] for p, r in zip(prompts, rows, strict=True)])["input_ids"]
    prompt_lens = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    eos = tokenizer.eos_token_id
    out: list[TokenizedRow] = []
    skipped = 0
    for ids, prompt_len, task in zip(full, prompt_lens, tasks, strict=True):
        if not train_on_inputs and prompt_len >= cutoff_len - 1:
            skipped += 1
            continue
        ids = [*ids[: cutoff_len - 1], eos]
        masked = 0 if train_on_inputs else prompt_len
        out.append(TokenizedRow(ids, [IGNORE_INDEX] * masked + ids[masked:], task))
    if skipped:
        logger.warning(
            "%s: skipped %d of %d rows whose prompt fills cutoff_len=%d (nothing left to learn)",
            source,
            skipped,
            len(rows),
            cutoff_len,
        )
    if not out:
        raise DataError(
            f"{source}: no usable rows (all {len(rows)} prompts are longer than cutoff_len)"
        )
    return out
