"""The trainer's step boundary: hooks, metrics sinks, adapters leaving and entering a run.

Each adapter trains on its own segments with its own noise, so one that leaves early ends as a
run of exactly its steps does, one that enters mid-run ends as it would alone, and the others
never notice (SGD, dropout on: equal math gives equal weights up to fp32 rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import load_file

from mlora.config.schema import parse_config
from mlora.model.multi_lora import MultiLoraModel
from mlora.training.adapter_run import AdapterRun
from mlora.training.evaluation_schedule import EvaluationSchedule
from mlora.training.metrics.log_lines import AdapterMetrics
from mlora.training.step_hooks import RunControl, StepBoundary
from mlora.training.trainer import Trainer, prepare_data
from tests.conftest import make_model, make_tokenizer
from tests.helpers import (
    adapter_tensors,
    addition_rows,
    max_relative_difference,
    reverse_rows,
    run_in_memory,
    write_json,
    write_template,
)


def factory():
    return make_model(vocab_size=len(make_tokenizer()), seed=1)


def specs(folder: Path) -> dict[str, dict]:
    template = write_template(folder)
    common = {"prompt": template, "optim": "sgd", "lr": 0.1, "lora_dropout": 0.2}
    return {
        "a": {"name": "a", "data": write_json(folder / "a.json", addition_rows(8)),
              "r": 4, "batch_size": 2, "num_epochs": 2, **common},
        "b": {"name": "b", "data": write_json(folder / "b.json", reverse_rows(6)),
              "r": 2, "batch_size": 2, "micro_batch_size": 1, "num_epochs": 1, **common},
    }  # fmt: skip


def trainer_for(folder: Path, adapters: list[dict], out: Path, **kwargs) -> Trainer:
    tokenizer = make_tokenizer()
    config = parse_config({"cutoff_len": 40, "log_step": 2, "lora": adapters}, "test-config")
    data = prepare_data(config, tokenizer)
    return Trainer(MultiLoraModel(factory()), tokenizer, config, data, out, 7, "tiny", **kwargs)


def alone(folder: Path, spec: dict, out: str) -> dict:
    config = {"cutoff_len": 40, "lora": [spec]}
    trainer = run_in_memory(factory, make_tokenizer(), config, folder / out)
    return adapter_tensors(trainer, spec["name"])


class Recorder:
    """A metrics sink that keeps what it is given."""

    def __init__(self) -> None:
        self.seen: list[AdapterMetrics] = []

    def report(self, metrics: Sequence[AdapterMetrics]) -> None:
        self.seen.extend(metrics)


def test_an_adapter_stopped_early_is_saved_as_it_is_and_the_other_carries_on(
    tmp_path: Path,
) -> None:
    """An evaluation schedule every 2 of a's steps ends a after its step 4 (its first epoch,
    of two): a's saved adapter equals a run of one epoch, b's equals b alone."""
    adapters = specs(tmp_path)
    calls: list[tuple[int, list[str], list[int]]] = []

    def evaluate(due: Sequence[AdapterRun], control: RunControl) -> None:
        calls.append((control.global_step, [r.name for r in due], [r.steps_done for r in due]))
        for run in due:
            if run.name == "a" and run.steps_done == 4:
                control.leave(run, "finished", "stopped early")

    every = {"a": 2, "b": 0}
    schedule = EvaluationSchedule(lambda run: every[run.name], evaluate)
    sink = Recorder()
    out = tmp_path / "out"
    trainer = trainer_for(
        tmp_path, list(adapters.values()), out, step_hooks=[schedule], sinks=[sink]
    )
    trainer.train()
    a, b = trainer.runs
    assert (a.status, a.steps_done, b.status, b.steps_done) == ("finished", 4, "finished", 3)
    # a is due after its steps 2 and 4 (then leaves), b only after its last step (3).
    assert [(names, steps) for _, names, steps in calls] == [
        (["a"], [2]), (["a"], [4]), (["b"], [3])
    ]  # fmt: skip
    one_epoch = alone(tmp_path, {**adapters["a"], "num_epochs": 1}, "a-one-epoch")
    assert max_relative_difference(adapter_tensors(trainer, "a"), one_epoch) <= 1e-5
    saved = load_file(out / "a" / "adapter_model.safetensors")
    assert len(saved) == len(one_epoch)
    b_alone = alone(tmp_path, adapters["b"], "b-alone")
    assert max_relative_difference(adapter_tensors(trainer, "b"), b_alone) <= 1e-5
    # The sink saw every logged interval, with the losses the history keeps.
    for run in (a, b):
        seen = [m for m in sink.seen if m.adapter == run.name]
        assert [m.loss for m in seen] == run.history
        assert seen[-1].adapter_step == run.steps_done
        assert all(m.tokens > 0 and m.lr == 0.1 for m in seen)


def test_an_adapter_entering_mid_run_trains_as_it_would_alone(tmp_path: Path) -> None:
    """b enters after global step 2 (a mid-way through its first epoch); both end as alone."""
    adapters = specs(tmp_path)
    b_config = parse_config({"cutoff_len": 40, "lora": [adapters["b"]]}, "test-config")
    b_rows = prepare_data(b_config, make_tokenizer())["b"]
    entered: list[int] = []

    def bring_b_in(boundary: StepBoundary, control: RunControl) -> None:
        if boundary.global_step == 2:
            entered.append(control.enter(b_config.lora[0], b_rows).steps_done)

    trainer = trainer_for(tmp_path, [adapters["a"]], tmp_path / "out", step_hooks=[bring_b_in])
    trainer.train()
    assert entered == [0]
    a, b = trainer.runs
    assert (a.steps_done, b.steps_done) == (8, 3)
    assert trainer.global_step == 8  # b shared steps 3 to 8 with a (6 micro-batches)
    assert (tmp_path / "out" / "b" / "adapter_model.safetensors").is_file()
    for name in ("a", "b"):
        want = alone(tmp_path, adapters[name], f"{name}-alone")
        assert max_relative_difference(adapter_tensors(trainer, name), want) <= 1e-5, name
