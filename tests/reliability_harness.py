"""Runs ``mlora.py`` in this process with a test-only fault injected; never used by mlora itself.

Used by tests/test_reliability_*.py as ``python tests/reliability_harness.py ARGS...`` (ARGS are
``mlora.py``'s). Faults, from environment variables:

``MLORA_TEST_KILL`` — a real SIGKILL to this process at a chosen moment:
    ``step:N``  before global step N + 1 starts (between steps);
    ``optim:N`` inside the N-th optimizer step of the run (counted over all adapters): in the
                middle of a global step, after its backward, with some adapters updated and
                others not;
    ``write:N`` inside the N-th atomic file write, after its data is on disk and before it is
                renamed into place (inside a checkpoint folder that is still a temp folder).

    ``step`` and ``optim`` first wait for the checkpoint writes already queued on the background
    writer, so the moment is the same on a fast and a slow machine (a kill while a write is in
    flight is what ``write:N`` and the tests' kills from outside are for).

``MLORA_TEST_SIGNAL`` — ``SIGNAL@PHASE``: this process sends itself SIGINT or SIGTERM once, in
a phase of the run:
    ``load``       as the base model starts loading;
    ``step:N``     inside global step N + 1 (before its forward);
    ``write:TEXT`` inside the first atomic file write whose temporary path contains TEXT (on
                   the background writer thread: a checkpoint folder, a final adapter);
    ``eval``       as ``--evaluate`` scores its first rows.

``MLORA_TEST_KILL_RANK`` — under torchrun, only the process of this rank is killed.

``MLORA_TEST_STEP_SECONDS`` — every global step takes at least this long (a sleep before it),
so a kill from outside at a moment shorter than the remaining steps lands in the middle of the
run, never after its end.

``MLORA_TEST_FSDP_REPORT`` — a folder: under ``--fsdp`` each rank writes ``rank<R>.json`` with
the base parameter bytes it held before and after ``load_sharded_base`` (a probe, not a fault).

``MLORA_TEST_FAIL`` — ``ERRNO:TEXT`` (e.g. ``ENOSPC:a/.adapter_model``): the first atomic write
whose temporary file path contains TEXT fails with that OSError while flushing to disk, as a
full disk or a revoked permission would.
"""

from __future__ import annotations

import errno
import os
import runpy
import signal
import stat
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


_writers: list = []


def _track_writers() -> None:
    """Remember every background checkpoint writer, so a kill can wait for its queued jobs."""
    from mlora.core.background import BackgroundWriter

    real_init = BackgroundWriter.__init__

    def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        real_init(self, *args, **kwargs)
        _writers.append(self)

    BackgroundWriter.__init__ = init  # type: ignore[method-assign]


def _die(drain: bool = False) -> None:
    if drain:
        for writer in _writers:
            writer.close()  # waits for its queued writes (without raising their error)
    os.kill(os.getpid(), signal.SIGKILL)


def _from_atomic() -> bool:
    return sys._getframe(2).f_globals.get("__name__") == "mlora.core.atomic"


def _is_file(fd: int) -> bool:
    """Only file writes count (not the folder fsync that makes a rename durable)."""
    return stat.S_ISREG(os.fstat(fd).st_mode)


def install_kill(spec: str) -> None:
    kind, _, value = spec.partition(":")
    target = int(value)
    count = 0
    if kind == "write":
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            nonlocal count
            real_fsync(fd)
            if _from_atomic() and _is_file(fd):
                count += 1
                if count == target:
                    _die()

        os.fsync = fsync
    elif kind == "step":
        from mlora.training.trainer import Trainer

        _track_writers()

        real_step = Trainer.train_step

        def train_step(self, step):  # type: ignore[no-untyped-def]
            if self.global_step == target:
                _die(drain=True)
            return real_step(self, step)

        Trainer.train_step = train_step  # type: ignore[method-assign]
    elif kind == "optim":
        import torch

        _track_writers()
        for cls in (torch.optim.AdamW, torch.optim.SGD):
            real = cls.step

            def step(self, *args, _real=real, **kwargs):  # type: ignore[no-untyped-def]
                nonlocal count
                count += 1
                if count == target:
                    _die(drain=True)
                return _real(self, *args, **kwargs)

            cls.step = step  # type: ignore[method-assign]
    else:
        raise SystemExit(f"bad MLORA_TEST_KILL {spec!r}")


def install_failure(spec: str) -> None:
    name, _, text = spec.partition(":")
    code = getattr(errno, name)
    real_fsync = os.fsync
    fired = False

    def fsync(fd: int) -> None:
        nonlocal fired
        path = os.readlink(f"/proc/self/fd/{fd}")
        if not fired and _from_atomic() and _is_file(fd) and text in path:
            fired = True
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    os.fsync = fsync


def install_signal(spec: str) -> None:
    name, _, phase = spec.partition("@")
    sig = signal.Signals[name]
    kind, _, value = phase.partition(":")
    sent = False

    def send() -> None:
        nonlocal sent
        if not sent:
            sent = True
            os.kill(os.getpid(), sig)

    if kind == "load":
        from mlora.model.loading import BaseLoad

        real_load = BaseLoad.load

        def load(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            send()
            return real_load(self, *args, **kwargs)

        BaseLoad.load = load  # type: ignore[method-assign]
    elif kind == "step":
        from mlora.training.trainer import Trainer

        real_step = Trainer.train_step

        def train_step(self, step):  # type: ignore[no-untyped-def]
            if self.global_step == int(value):
                send()
            return real_step(self, step)

        Trainer.train_step = train_step  # type: ignore[method-assign]
    elif kind == "write":
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            real_fsync(fd)
            if _from_atomic() and _is_file(fd) and value in os.readlink(f"/proc/self/fd/{fd}"):
                send()

        os.fsync = fsync
    elif kind == "eval":
        import mlora.inference.evaluation as evaluation

        real_score = evaluation.score_rows

        def score_rows(*args, **kwargs):  # type: ignore[no-untyped-def]
            send()
            return real_score(*args, **kwargs)

        evaluation.score_rows = score_rows
    else:
        raise SystemExit(f"bad MLORA_TEST_SIGNAL {spec!r}")


def install_from_environment() -> None:
    """Install the faults the environment asks for (this process, or a fork of the CLI)."""
    kill_rank = os.environ.get("MLORA_TEST_KILL_RANK")
    if os.environ.get("MLORA_TEST_KILL") and kill_rank in (None, os.environ.get("RANK", "0")):
        install_kill(os.environ["MLORA_TEST_KILL"])
    if os.environ.get("MLORA_TEST_FAIL"):
        install_failure(os.environ["MLORA_TEST_FAIL"])
    if os.environ.get("MLORA_TEST_SIGNAL"):
        install_signal(os.environ["MLORA_TEST_SIGNAL"])
    if os.environ.get("MLORA_TEST_STEP_SECONDS"):
        install_step_seconds(float(os.environ["MLORA_TEST_STEP_SECONDS"]))
    if os.environ.get("MLORA_TEST_FSDP_REPORT"):
        install_fsdp_report(os.environ["MLORA_TEST_FSDP_REPORT"])


def _held_bytes(model) -> int:  # type: ignore[no-untyped-def]
    """Parameter bytes with storage on this rank (a sharded parameter: its local shard)."""
    total = 0
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if local.device.type != "meta":
            total += local.numel() * local.element_size()
    return total


def install_step_seconds(seconds: float) -> None:
    import time

    from mlora.training.trainer import Trainer

    real_step = Trainer.train_step

    def train_step(self, step):  # type: ignore[no-untyped-def]
        time.sleep(seconds)
        return real_step(self, step)

    Trainer.train_step = train_step  # type: ignore[method-assign]


def install_fsdp_report(folder: str) -> None:
    import json

    import mlora.api

    real = mlora.api.load_sharded_base

    def load_sharded_base(model, state):  # type: ignore[no-untyped-def]
        before = _held_bytes(model)
        full = sum(p.numel() * p.element_size() for p in model.parameters())
        result = real(model, state)
        report = {"before": before, "after": _held_bytes(model), "full": full}
        Path(folder, f"rank{state.rank}.json").write_text(json.dumps(report))
        return result

    mlora.api.load_sharded_base = load_sharded_base


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    install_from_environment()
    sys.argv = [str(ROOT / "mlora.py"), *sys.argv[1:]]
    runpy.run_path(str(ROOT / "mlora.py"), run_name="__main__")
