"""Score a config's trained adapters with lm-evaluation-harness, one result per adapter.

``launch.py evaluate --harness TASKS`` / ``mlora.py --evaluate --harness TASKS``: the base model
loads once with every selected adapter ``DIR/NAME`` attached (``--model mlora``, see
``mlora.inference.harness_model``), and the harness's own evaluation (``simple_evaluate``: its
tasks, prompts, metrics and aggregation) runs once per adapter over that one session. The
requests of the first run are answered by all adapters that run the same tasks, their rows side
by side in the same batches; the later runs find their answers ready. The results go to
``harness_result.json`` beside ``evaluate_result.json``.

TASKS are harness task names (from lm-eval, or from YAML files in ``--harness_include``) and
mlora's choice task names (``arc-e``, ... see ``mlora.inference.harness_tasks``): an adapter
trained on that choice task with a local test file is scored on its own rows by the harness's
definition of the task.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlora.config.schema import AdapterConfig, TrainConfig
from mlora.core.errors import MloraError, first_line

if TYPE_CHECKING:  # torch loads with the model, not for the checks before it
    import torch

logger = logging.getLogger("mlora")

HARNESS_RESULT_NAME = "harness_result.json"
EXTRA = "eval"
# the parts of the harness's result that describe the scores (its configs and samples stay out)
RESULT_KEYS = ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better",
               "n-samples")  # fmt: skip


def require_lm_eval(flag: str = "--harness") -> None:
    """Raises MloraError in one line naming the extra when lm-eval is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise MloraError(
            f"{flag} needs lm-evaluation-harness: pip install 'mlora[{EXTRA}]' (or lm-eval)"
        ) from None


def split_tasks(value: str | Sequence[str]) -> list[str]:
    """``a,b`` (or a list) as task names, without blanks and repeats.

    Raises:
        MloraError: no task named.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    tasks = list(dict.fromkeys(t.strip() for t in items if t.strip()))
    if not tasks:
        raise MloraError("--harness: name at least one task (comma-separated)")
    return tasks


def harness_result_path(evaluate_result: Path) -> Path:
    """``harness_result.json`` in the folder of ``evaluate_result.json``."""
    return evaluate_result.with_name(HARNESS_RESULT_NAME)


def task_manager(names: set[str], include_path: Sequence[str] = ()) -> Any:
    """The harness's ``TaskManager`` that knows ``names``: the include folders alone when they
    have them all, else with lm-eval's own tasks (indexing those takes seconds).

    Raises:
        MloraError: a name no folder and no lm-eval task defines (checked before any model).
    """
    from lm_eval.tasks import TaskManager

    folders = [str(p) for p in include_path] or None
    manager = TaskManager(include_path=folders, include_defaults=False)
    if not names <= set(manager.all_tasks):
        manager = TaskManager(include_path=folders)
    missing = sorted(names - set(manager.all_tasks))
    if missing:
        raise MloraError(f"--harness: unknown task {missing[0]!r} (lm-eval has no such task)")
    return manager


def check_tasks_load(manager: Any, names: set[str]) -> None:
    """Build the tasks once (their data downloaded or read), so that data that cannot be had
    (offline, a missing file) stops the run before the model loads.

    Raises:
        MloraError: one line naming what could not be read.
    """
    try:
        manager.load(sorted(names))
    except OSError as exc:  # offline hub, missing or unreadable file (ConnectionError included)
        raise MloraError(f"--harness: task data could not be loaded: {first_line(exc)}") from None


def run_tasks(
    session: Any,
    tasks: dict[str, list[Any]],
    include_path: Sequence[str] = (),
    limit: float | None = None,
    num_fewshot: int | None = None,
    manager: Any = None,
) -> dict[str, dict[str, Any]]:
    """The harness's results for each adapter label of ``tasks`` (``{label: [PlannedTask]}``).

    Labels with the same task list share their batches; every label gets its own
    ``simple_evaluate`` (its own metrics, exactly the harness's; no bootstrap stderr).
    """
    from lm_eval import simple_evaluate

    from mlora.inference.harness_model import MloraLM

    if manager is None:
        manager = task_manager({t.harness for p in tasks.values() for t in p}, include_path)
    groups: dict[tuple[str, ...], list[str]] = {}
    for label, planned in tasks.items():
        groups.setdefault(tuple(t.harness for t in planned), []).append(label)
    out: dict[str, dict[str, Any]] = {}
    try:
        for task_names, labels in groups.items():
            session.scoring = labels
            for label in labels:
                results = simple_evaluate(
                    model=MloraLM(session=session, adapter=label),
                    tasks=list(task_names),
                    task_manager=manager,
                    limit=limit,
                    num_fewshot=num_fewshot,
                    bootstrap_iters=0,
                    log_samples=False,
                )
                out[label] = _reported(results or {}, tasks[label])
    finally:
        session.scoring = list(session.labels)
    return out


def _reported(results: dict[str, Any], planned: list[Any]) -> dict[str, Any]:
    """The harness's scores of one adapter, each task under the name the user gave."""
    asked = {t.harness: t.asked for t in planned}
    report: dict[str, Any] = {}
    for key in RESULT_KEYS:
        if isinstance(results.get(key), dict):
            report[key] = {asked.get(k, k): v for k, v in results[key].items()}
    report["tasks"] = {t.asked: {"harness_task": t.harness, "rows": t.rows} for t in planned}
    return json.loads(json.dumps(report, default=str))  # numpy numbers and the like as JSON


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """One line per adapter, task and metric (the harness's stderr columns left out)."""
    lines = [("adapter", "task", "metric", "value")]
    for label, report in results.items():
        for task, metrics in report.get("results", {}).items():
            for key, value in metrics.items():
                if "stderr" in key or not isinstance(value, int | float) or key == "alias":
                    continue
                lines.append((label, task, key, f"{value:.4f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines
    )


def evaluate_harness(
    config: TrainConfig,
    base_model: str,
    output_dir: str | Path,
    tasks: str | Sequence[str],
    adapters: Sequence[str] | None = None,
    include_path: Sequence[str] = (),
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    quantize: str | None = None,
    attn_implementation: str | None = None,
    show: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run the harness's ``tasks`` on the trained adapters ``output_dir/NAME`` of ``config``.

    Args:
        adapters: only these (default: every adapter of the config).
        include_path: folders of task YAML files (the harness's ``--include_path``).
        limit: rows per task (a count, or a fraction below 1), as the harness's ``--limit``.
        num_fewshot: the harness's ``--num_fewshot``.
        batch_size: requests per pass (each answered by every adapter in the pass).
        dtype: the base's dtype (None: float32).

    Returns:
        ``{adapter: {"results": {task: {metric: value}}, ...}}``, also written to
        ``harness_result.json`` beside the config's ``evaluate_result``.

    Raises:
        MloraError: no lm-eval, an unknown adapter or task, a missing trained adapter, bad
            rows (one line each, checked before the model loads).
    """
    require_lm_eval()
    import torch

    from mlora.inference.evaluation import result_path
    from mlora.inference.harness_model import load_session
    from mlora.inference.harness_tasks import plan_task
    from mlora.inference.trained import check_trained
    from mlora.training.preflight import check_output_file

    task_names = split_tasks(tasks)
    selected = _select(config, adapters)
    folders = {a.name: Path(output_dir) / a.name for a in selected}
    check_trained(folders, hint=" (train it first, or pass --dir)")
    for folder in include_path:
        if not Path(folder).is_dir():
            raise MloraError(f"--harness_include: no folder {folder}")
    target = harness_result_path(result_path(config, output_dir))
    check_output_file(target)
    with tempfile.TemporaryDirectory(prefix="mlora-harness-") as work:
        planned = {
            a.name: [plan_task(t, a, config.lora, Path(work)) for t in task_names] for a in selected
        }
        names = {t.harness for tasks_of in planned.values() for t in tasks_of}
        manager = task_manager(names, [*include_path, work])  # before the model loads
        check_tasks_load(manager, names)
        session = load_session(
            base_model, folders, dtype=dtype or torch.float32,
            device=None if device is None else str(device),
            trust_remote_code=trust_remote_code, quantize=quantize,
            attn_implementation=attn_implementation, batch_size=batch_size,
        )  # fmt: skip
        session.model.set_packing(config.packing)
        results = run_tasks(session, planned, limit=limit, num_fewshot=num_fewshot, manager=manager)
    if show:
        print(format_table(results))
    from mlora.core.atomic import atomic_write_text

    atomic_write_text(target, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    logger.info("harness results of %d adapter(s) in %s", len(results), target)
    return results


def _select(config: TrainConfig, names: Sequence[str] | None) -> list[AdapterConfig]:
    """The config's adapters named in ``names`` (default: all), in that order.

    Raises:
        ConfigError: an unknown name.
    """
    from mlora.core.errors import ConfigError

    wanted = [n.strip() for n in names or () if n.strip()]
    if not wanted:
        return list(config.lora)
    known = [a.name for a in config.lora]
    for name in wanted:
        if name not in known:
            raise ConfigError(
                f"{config.source}: unknown adapter {name!r} (adapters: {', '.join(known)})"
            )
    return [config.adapter(name) for name in wanted]
