"""Run many ``python mlora.py ...`` commands as forks of one process that imported mlora once.

A test that checks what a user sees for 30 bad inputs needs 30 separate processes (exit code,
stderr, working folder), but each fresh interpreter spends seconds importing torch and
transformers before mlora reads its first argument. This script imports them once, then forks
one child per command: the child changes to the command's folder, sends its stdout/stderr to
files and runs ``mlora.py`` as ``__main__``, exactly as the interpreter would (an uncaught
exception prints its traceback and exits 1). Nothing in the parent has run any tensor code
before it forks, so no thread pool is inherited half-initialised.

Used as ``python tests/forked_cli.py < jobs.json`` (a list of ``{"cwd", "argv", "stdout",
"stderr"}``, and optionally ``"env"``: variables for that command alone, e.g. the faults of
``tests/reliability_harness.py``), in the environment the commands should see; prints the exit
codes as JSON.
"""

from __future__ import annotations

import gc
import json
import os
import runpy
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MLORA = str(ROOT / "mlora.py")
PARALLEL = max(2, min(4, os.cpu_count() or 2))


def _child(job: dict) -> None:
    """Runs in the fork: become ``python mlora.py ARGV`` in ``job["cwd"]``; never returns."""
    code = 1
    try:
        os.chdir(job["cwd"])
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        if job.get("env"):  # test faults (tests/reliability_harness.py), this fork only
            os.environ.update(job["env"])
            from tests.reliability_harness import install_from_environment

            install_from_environment()
        sys.argv = [MLORA, *job["argv"]]
        try:
            runpy.run_path(MLORA, run_name="__main__")
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if exit_.code is not None and not isinstance(exit_.code, int):
                print(exit_.code, file=sys.stderr)
        except BaseException:  # what the interpreter does with an uncaught exception
            traceback.print_exc()
            code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run(jobs: list[dict]) -> list[int]:
    """Fork each job (``PARALLEL`` at a time); their exit codes in job order."""
    codes: dict[int, int] = {}
    running: dict[int, int] = {}  # pid -> job index
    pending = list(enumerate(jobs))
    while pending or running:
        while pending and len(running) < PARALLEL:
            index, job = pending.pop(0)
            pid = os.fork()
            if pid == 0:
                _child(job)
            running[pid] = index
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    return [codes[i] for i in range(len(jobs))]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    import datasets  # noqa: F401  (what reading data imports: 0.6 s a fork otherwise)
    import transformers.models.llama.modeling_llama  # noqa: F401  (the tests' tiny base model)

    import mlora.api
    import mlora.cli.train  # noqa: F401  (torch, transformers and mlora, imported once for every fork)

    gc.freeze()  # the imported objects stay out of every fork's collections (fewer page copies)
    print(json.dumps(run(json.load(sys.stdin))))
