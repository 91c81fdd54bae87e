"""The ``--harness`` options of ``mlora.py --evaluate`` and ``launch.py evaluate``: score the
trained adapters with lm-evaluation-harness (``mlora.inference.harness_run``)."""

from __future__ import annotations

import argparse

from mlora.core.errors import MloraError


def add_harness_options(parser: argparse.ArgumentParser) -> None:
    """``--harness TASKS`` and the few harness settings that go with it."""
    parser.add_argument(
        "--harness",
        default=None,
        metavar="TASKS",
        help="With --evaluate: score the adapters with lm-evaluation-harness on these "
        "comma-separated tasks (harness names, or mlora's choice tasks arc-e, boolq, ... over "
        "each adapter's own test rows) instead of mlora's evaluation; writes "
        "harness_result.json beside evaluate_result.json. Needs the 'eval' extra.",
    )
    parser.add_argument(
        "--harness_include",
        action="append",
        default=None,
        metavar="DIR",
        help="With --harness: a folder of task YAML files (the harness's --include_path); "
        "may be repeated.",
    )
    parser.add_argument(
        "--harness_limit",
        type=float,
        default=None,
        metavar="N",
        help="With --harness: rows per task (a count, or a fraction below 1).",
    )
    parser.add_argument(
        "--harness_fewshot",
        type=int,
        default=None,
        metavar="K",
        help="With --harness: few-shot examples per prompt (default: each task's own).",
    )


def harness_flags(args: argparse.Namespace) -> list[str]:
    """The ``--harness*`` options of ``args`` as command-line flags again (launch.py ->
    mlora.py)."""
    flags: list[str] = []
    if args.harness is not None:
        flags += ["--harness", args.harness]
    for folder in args.harness_include or ():
        flags += ["--harness_include", folder]
    if args.harness_limit is not None:
        flags += ["--harness_limit", repr(args.harness_limit)]
    if args.harness_fewshot is not None:
        flags += ["--harness_fewshot", str(args.harness_fewshot)]
    return flags


def check_harness_options(args: argparse.Namespace) -> None:
    """Raises MloraError (one line naming the flag) for harness options that cannot run: used
    without ``--evaluate --harness``, a limit <= 0, a negative few-shot count, or no lm-eval."""
    harness = getattr(args, "harness", None)
    evaluate = getattr(args, "evaluate", True)
    given = [
        flag
        for flag, value in (
            ("--harness_include", args.harness_include),
            ("--harness_limit", args.harness_limit),
            ("--harness_fewshot", args.harness_fewshot),
        )
        if value is not None
    ]
    if harness is None:
        if given:
            raise MloraError(f"{given[0]} needs --harness TASKS")
        return
    if not evaluate:
        raise MloraError("--harness needs --evaluate (it scores trained adapters)")
    from mlora.core.launcher_env import env_world_size

    if env_world_size() > 1:
        raise MloraError("--harness runs in one process: start it without torchrun")
    if args.harness_limit is not None and args.harness_limit <= 0:
        raise MloraError(f"--harness_limit must be > 0, got {args.harness_limit}")
    if args.harness_fewshot is not None and args.harness_fewshot < 0:
        raise MloraError(f"--harness_fewshot must be >= 0, got {args.harness_fewshot}")
    from mlora.inference.harness_run import require_lm_eval, split_tasks

    split_tasks(harness)
    require_lm_eval()
