"""Each adapter checkpoints on its own ``save_step``; the run manifest ties them together, and
``--resume`` replays an adapter whose newest checkpoint is older than the cut. Checkpoint files
are written on a background thread that the training loop never waits for.

The reference is always the same config trained without interruption (and without a slow or
failing writer): the resumed or slowed runs must end with the same adapters.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path

import pytest
from safetensors.torch import load_file

import mlora.training.checkpoints as checkpoint_module
from mlora.cli.train import main
from mlora.core.atomic import WriteError
from mlora.core.background import BackgroundWriter
from mlora.training.checkpoints import find_resume_point, list_checkpoints, list_cuts
from mlora.training.trainer import Trainer
from tests.helpers import (
    addition_rows,
    max_relative_difference,
    reverse_rows,
    train_killed_then_resumed,
    write_json,
    write_template,
)
from tests.reliability_support import mlora_args, one_error_line, only_records, run_identity

NAMES = ("a", "b")
WAIT = 120  # seconds: only a guard against a hang, never a timing


def write_config(folder: Path, **top: object) -> Path:
    """``a``: 8 optimizer steps of 2 micro-batches, checkpoint every 2 steps; ``b``: 9 steps,
    every 3; dropout on both (the replay must redraw the same masks). Both use SGD: a replayed
    adapter runs its micro-batches in other packs than it did beside ``b`` (the same math,
    rounded differently by the CPU's matmul kernels), and Adam's first, near-sign steps would
    grow those ~1e-7 differences by a CPU-dependent amount."""
    folder.mkdir(parents=True, exist_ok=True)
    template = write_template(folder)
    config = {
        "cutoff_len": 40, "save_total_limit": 10, "log_step": 1,
        "lora": [
            {"name": "a", "data": write_json(folder / "a.json", addition_rows(16)),
             "prompt": template, "r": 4, "batch_size": 2, "micro_batch_size": 1,
             "num_epochs": 1, "lora_dropout": 0.1, "optim": "sgd", "lr": 1e-1, "save_step": 2},
            {"name": "b", "data": write_json(folder / "b.json", reverse_rows(9)),
             "prompt": template, "r": 2, "batch_size": 1, "num_epochs": 1, "lora_dropout": 0.1,
             "optim": "sgd", "momentum": 0.9, "lr": 5e-2, "save_step": 3},
        ],
        **top,
    }  # fmt: skip
    path = folder / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def final_weights(out: Path) -> dict[str, dict]:
    return {name: load_file(out / name / "adapter_model.safetensors") for name in NAMES}


def without_times(metrics_file: Path) -> list[dict]:
    """The rows of a metrics file without the fields that measure wall-clock time."""
    timed = {"run", "time", "seconds", "tokens_per_s", "peak_memory_mib", "mfu"}
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in timed} for row in rows]


def bit_identical(got: Path, want: Path, name: str) -> bool:
    """An adapter that was not replayed runs the same computation as the uninterrupted run."""
    got_tensors, want_tensors = final_weights(got)[name], final_weights(want)[name]
    return got_tensors.keys() == want_tensors.keys() and all(
        got_tensors[key].equal(want_tensors[key]) for key in want_tensors
    )


# A replayed adapter's weights differ from the uninterrupted run's by fp32 rounding only: about
# 10 ulps of each tensor's largest entry after its remaining SGD steps (1.2e-6 measured on an
# AMD EPYC); with SGD nothing amplifies it, so 1e-5 holds on any CPU.
REPLAY_TOLERANCE = 1e-5


def worst_difference(got: Path, want: Path) -> float:
    return max(
        max_relative_difference(g, w)
        for g, w in zip(final_weights(got).values(), final_weights(want).values(), strict=True)
    )


@pytest.fixture(scope="module")
def clean(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config, output) of the uninterrupted reference run."""
    folder = tmp_path_factory.mktemp("schedule")
    config = write_config(folder / "cfg")
    assert main(mlora_args(tiny_model_dir, config, folder / "clean")) == 0
    return config, folder / "clean"


def test_each_adapter_writes_only_on_its_own_steps(clean: tuple[Path, Path]) -> None:
    _, out = clean
    # a: steps 2, 4, 6 (8 is its end: the final adapter); b: 3, 6 (9 is its end).
    assert [step for step, _ in list_checkpoints(out / "a")] == [2, 4, 6]
    assert [step for step, _ in list_checkpoints(out / "b")] == [3, 6]
    # The manifest of each cut names each adapter's newest folder at that global step: at
    # G=6 (b's step 6, a's step 3) a still resumes from its checkpoint-2.
    manifest = json.loads((only_records(out) / "step-6" / "manifest.json").read_text())
    a, b = manifest["adapters"]["a"], manifest["adapters"]["b"]
    assert (a["steps_done"], a["checkpoint"]) == (3, "checkpoint-2")
    assert (b["steps_done"], b["checkpoint"]) == (6, "checkpoint-6")


def test_resume_replays_a_lagging_adapter_and_equals_the_uninterrupted_run(
    clean: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path, caplog
) -> None:
    """Killed before global step 8: the newest cut is G=6, where a (step 3, mid-way through
    nothing) resumes from its checkpoint-2 and replays its 2 micro-batches of step 3."""
    config, _ = clean
    with caplog.at_level(logging.INFO, logger="mlora"):
        want, cut = train_killed_then_resumed(config, tiny_model_dir, tmp_path, 7)
    assert "adapter a: replaying 2 micro-batch(es) from checkpoint-2" in caplog.text
    assert "adapter b: replaying" not in caplog.text  # saved at G=6 exactly
    assert worst_difference(cut, want) <= REPLAY_TOLERANCE
    assert bit_identical(cut, want, "b")


def test_a_slow_writer_never_holds_up_the_loop_and_writes_the_same_files(
    clean: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """The first checkpoint write blocks until the loop has trained two more steps: the loop
    must get there without it, and every file must come out as in the reference run."""
    config, want = clean
    events: list[str] = []
    pending, released = threading.Event(), threading.Event()
    real_write, real_step = checkpoint_module.write_checkpoint, Trainer.train_step

    def slow_write(output_dir, name, snapshot, seed, global_step):  # type: ignore[no-untyped-def]
        if not pending.is_set():
            events.append(f"write {name} at {global_step}: waits")
            pending.set()
            assert released.wait(WAIT), "the training loop waited for the writer"
        events.append(f"written {name} {snapshot['steps_done']}")
        return real_write(output_dir, name, snapshot, seed, global_step)

    def step(self: Trainer, batch: list) -> None:
        if self.global_step == 3:  # b's checkpoint-3 was handed to the writer after step 3
            assert pending.wait(WAIT)
        if pending.is_set() and not released.is_set():
            events.append(f"step {self.global_step + 1}")
            if len(events) == 3:
                released.set()
        real_step(self, batch)

    monkeypatch.setattr(checkpoint_module, "write_checkpoint", slow_write)
    monkeypatch.setattr(Trainer, "train_step", step)
    out = tmp_path / "slow"
    assert main(mlora_args(tiny_model_dir, config, out)) == 0
    assert events[:4] == ["write b at 3: waits", "step 4", "step 5", "written b 3"]
    files = sorted(p.relative_to(want) for p in want.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for name in files:
        # .mlora-lock holds the pid; metrics.jsonl's rows hold wall-clock times and rates
        if name.name not in (".mlora-lock", "metrics.jsonl"):
            assert (out / name).read_bytes() == (want / name).read_bytes(), name
    assert without_times(out / "metrics.jsonl") == without_times(want / "metrics.jsonl")


def test_a_failed_background_write_stops_with_one_line_and_loses_nothing(
    clean: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    config, want = clean
    real = checkpoint_module.write_adapter_files
    failing = "checkpoint-4"

    def write(directory, tensors, adapter_config):  # type: ignore[no-untyped-def]
        if Path(directory).name.startswith(f".{failing}."):  # a's, in its temp folder
            raise WriteError(Path(directory) / "adapter_model.safetensors", os.strerror(28))
        real(directory, tensors, adapter_config)

    monkeypatch.setattr(checkpoint_module, "write_adapter_files", write)
    out = tmp_path / "out"
    assert main(mlora_args(tiny_model_dir, config, out)) == 2
    target = out / "a" / failing / "adapter_model.safetensors"
    assert one_error_line(capsys.readouterr().err) == (
        f"error: cannot write {target}: {os.strerror(28)}"
    )
    assert [step for step, _ in list_checkpoints(out / "a")] == [2]
    assert not list(out.rglob(".*.tmp*"))
    point = find_resume_point(out, run_identity(config, tiny_model_dir))
    assert point.global_step == 6  # the cut of a's step 8 was dropped with the failed write
    monkeypatch.setattr(checkpoint_module, "write_adapter_files", real)
    assert main(mlora_args(tiny_model_dir, config, out, "--resume")) == 0
    assert worst_difference(out, want) <= REPLAY_TOLERANCE
    assert bit_identical(out, want, "b")


def test_sigint_while_a_write_is_pending_leaves_a_resumable_run(
    clean: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """b's checkpoint-3 is still being written when SIGINT arrives; the stop waits for it,
    writes the interrupt cut after it, and --resume ends as the uninterrupted run."""
    config, want = clean
    events: list[str] = []
    pending, released = threading.Event(), threading.Event()
    real_write, real_step = checkpoint_module.write_checkpoint, Trainer.train_step
    real_flush = BackgroundWriter.flush

    def slow_write(output_dir, name, snapshot, seed, global_step):  # type: ignore[no-untyped-def]
        if not pending.is_set():
            events.append("write pending")
            pending.set()
            assert released.wait(WAIT), "nothing waited for the pending write"
            events.append("write done")
        return real_write(output_dir, name, snapshot, seed, global_step)

    def step(self: Trainer, batch: list) -> None:
        if self.global_step == 3:  # b's checkpoint-3 was handed to the writer after step 3
            assert pending.wait(WAIT)
            events.append(f"SIGINT in step {self.global_step + 1}")
            os.kill(os.getpid(), signal.SIGINT)
        real_step(self, batch)

    def flush(self: BackgroundWriter) -> None:
        if events and not released.is_set():
            events.append("flush")
            released.set()
        real_flush(self)

    monkeypatch.setattr(checkpoint_module, "write_checkpoint", slow_write)
    monkeypatch.setattr(Trainer, "train_step", step)
    monkeypatch.setattr(BackgroundWriter, "flush", flush)
    out = tmp_path / "out"
    assert main(mlora_args(tiny_model_dir, config, out)) == 130
    assert events == ["write pending", "SIGINT in step 4", "flush", "write done"]
    line = one_error_line(capsys.readouterr().err)
    records = only_records(out)
    assert f"stopped by SIGINT after global step 4; checkpoint {records / 'step-4'}" in line
    assert [step for step, _ in list_cuts(records)][-1] == 4
    assert (out / "b" / "checkpoint-3").is_dir()
    assert main(mlora_args(tiny_model_dir, config, out, "--resume")) == 0
    # SIGINT saved both adapters at the stop, so nothing is replayed: the same computation.
    assert all(bit_identical(out, want, name) for name in NAMES)


def test_the_checkpoint_module_does_not_reach_the_trainer() -> None:
    """checkpoints.py writes and reads plain state dicts: neither it nor anything it imports
    (transitively, inside mlora) imports the trainer, so the import circle is gone."""
    import ast

    import mlora

    root = Path(mlora.__file__).parent

    def imports(module: str) -> set[str]:
        path = root.joinpath(*module.split(".")[1:])
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        if not path.is_file():  # a name imported from a package, not a module
            return set()
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)  # and each name, in case it is a module of that package:
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        return {m for m in found if m.startswith("mlora.")}

    seen, todo = set(), ["mlora.training.checkpoints"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(imports(module))
    assert "mlora.training.trainer" not in seen and "mlora.api" not in seen
