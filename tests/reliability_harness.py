"""Runs ``mlora.py`` in this process and kills it with a real SIGKILL at a chosen moment.

Used by tests/test_reliability_resume.py as ``python tests/reliability_harness.py ARGS...`` with
``MLORA_TEST_KILL`` set to ``step:N`` (before global step N + 1 starts) or ``write:N`` (inside
the N-th atomic file write, after its data is on disk and before it is renamed into place).
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str) -> None:
    if not spec:
        return
    kind, _, value = spec.partition(":")
    target = int(value)
    if kind == "write":
        real_fsync = os.fsync
        count = 0

        def fsync(fd: int) -> None:
            nonlocal count
            real_fsync(fd)
            if sys._getframe(1).f_globals.get("__name__") == "mlora.atomic":
                count += 1
                if count == target:
                    _die()

        os.fsync = fsync
    elif kind == "step":
        from mlora.trainer import Trainer

        real_step = Trainer.train_step

        def train_step(self, step):  # type: ignore[no-untyped-def]
            if self.global_step == target:
                _die()
            return real_step(self, step)

        Trainer.train_step = train_step  # type: ignore[method-assign]
    else:
        raise SystemExit(f"bad MLORA_TEST_KILL {spec!r}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    install(os.environ.get("MLORA_TEST_KILL", ""))
    sys.argv = [str(ROOT / "mlora.py"), *sys.argv[1:]]
    runpy.run_path(str(ROOT / "mlora.py"), run_name="__main__")
