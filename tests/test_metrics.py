"""D/metrics.jsonl: one row per adapter per optimizer step, run rows, exactly once across
SIGKILL and --resume, and the values checked against independent references (the trainer's
returned loss history, an SGD step's size, the scheduler's formula, parameter counts)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from mlora import api
from mlora.config.schema import parse_config
from mlora.core.errors import MloraError
from mlora.hardware.peak_flops import peak_flops
from mlora.model.multi_lora import MultiLoraModel
from mlora.training.metrics.metrics_file import (
    MetricsFile,
    MetricsFileError,
    metrics_path,
    read_metrics,
)
from mlora.training.metrics.sinks import MetricsFileSink
from mlora.training.metrics.throughput import FlopsEstimate
from mlora.training.trainer import Trainer, prepare_data
from tests.conftest import make_model, make_tokenizer
from tests.helpers import adapter_tensors, addition_rows, reverse_rows, write_json, write_template
from tests.reliability_support import HARNESS, NAMES, mlora_args, run_mlora, write_run_config


def steps_of(rows: list[dict], adapter: str) -> list[dict]:
    return [row for row in rows if row["kind"] == "step" and row["adapter"] == adapter]


def two_adapter_config(folder: Path, log_step: int = 1, **extra: object) -> dict:
    template = write_template(folder)
    return {
        "cutoff_len": 40,
        "log_step": log_step,
        "lora": [
            {"name": "add", "data": write_json(folder / "add.json", addition_rows(12)),
             "prompt": template, "r": 4, "batch_size": 2, "num_epochs": 2, "lr": 1e-2,
             "scheduler_type": "cosine", "warmup_steps": 3},
            {"name": "rev", "data": write_json(folder / "rev.json", reverse_rows(8)),
             "prompt": template, "r": 4, "batch_size": 4, "num_epochs": 3, "lr": 5e-3},
        ],
        **extra,
    }  # fmt: skip


def with_validation(raw: dict, every: int = 2) -> dict:
    """``add`` holds 3 of its rows out and validates on them every ``every`` steps (and at its
    end); ``rev`` has no validation."""
    raw["lora"][0].update(val_set_size=3, eval_steps=every)
    return raw


def validation_curve(output_dir: Path, adapter: str) -> list[list[float]]:
    """The trainer's own record of an adapter's validations (``DIR/NAME/validation.json``,
    whose losses tests/test_validation.py shows equal to PEFT's)."""
    record = json.loads((output_dir / adapter / "validation.json").read_text(encoding="utf-8"))
    return record["curve"]


def train_config(tmp_path: Path, model_dir: Path, raw: dict, out: str = "out") -> Trainer:
    path = tmp_path / f"{out}.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return api.train(path, str(model_dir), tmp_path / out, log=False)


def test_rows_are_the_loss_history_the_trainer_returns(tiny_model_dir: Path, tmp_path: Path):
    """log_step 1: each step's row holds the very loss the trainer returns for that step; every
    step 1..N of each adapter is there once, with its rows, tokens and epoch."""
    trainer = train_config(tmp_path, tiny_model_dir, two_adapter_config(tmp_path))
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert {row["run"] for row in rows} == {trainer.run_id}
    for run in trainer.runs:
        mine = steps_of(rows, run.name)
        assert [row["step"] for row in mine] == list(range(1, run.queue.total_steps + 1))
        assert [row["loss"] for row in mine] == run.history  # same float32 values
        per_epoch = run.queue.steps_per_epoch
        assert [row["epoch"] for row in mine] == [s / per_epoch for s in range(1, len(mine) + 1)]
        epoch_rows = run.queue.rows
        assert sum(row["rows"] for row in mine) == len(epoch_rows) * run.config.num_epochs
        tokens = sum(len(r) for r in epoch_rows) * run.config.num_epochs
        assert sum(row["tokens"] for row in mine) == tokens
        supervised = sum(r.num_supervised for r in epoch_rows) * run.config.num_epochs
        assert sum(row["supervised_tokens"] for row in mine) == supervised
        assert all(row["grad_norm"] > 0 for row in mine)
    global_steps = [row["global_step"] for row in rows if row["kind"] == "run"]
    assert global_steps == list(range(1, trainer.global_step + 1))
    assert all(row["tokens_per_s"] > 0 and row["peak_memory_mib"] > 0 for row in rows
               if row["kind"] == "run")  # fmt: skip
    if "MLORA_PEAK_TFLOPS" not in os.environ:  # a CPU has no known peak: no MFU
        assert all(row["mfu"] is None for row in rows if row["kind"] == "run")


def test_validation_losses_ride_on_their_step_rows(tiny_model_dir: Path, tmp_path: Path):
    """val_set_size + eval_steps: the row of each step after which the adapter validated holds
    that validation's loss (every eval_steps and at the end); no other row has one."""
    trainer = train_config(tmp_path, tiny_model_dir, with_validation(two_adapter_config(tmp_path)))
    out = tmp_path / "out"
    rows = read_metrics(metrics_path(out))
    add = steps_of(rows, "add")
    total = trainer.runs[0].queue.total_steps
    validated = [[row["step"], row["val_loss"]] for row in add if "val_loss" in row]
    assert [step for step, _ in validated] == [*range(2, total + 1, 2), *[total] * (total % 2)]
    assert validated == validation_curve(out, "add")
    assert all(math.isfinite(loss) and loss > 0 for _, loss in validated)
    assert not any("val_loss" in row for row in steps_of(rows, "rev"))
    assert [row["loss"] for row in add] == trainer.runs[0].history  # still every step's loss


def test_a_log_interval_averages_its_steps(tiny_model_dir: Path, tmp_path: Path):
    """log_step 3: rows still come one per step; each history entry (what the log line says)
    is the mean of the step rows of its interval."""
    trainer = train_config(tmp_path, tiny_model_dir, two_adapter_config(tmp_path, log_step=3))
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    ends = [row["global_step"] for row in rows if row["kind"] == "run"]
    assert ends == [*range(3, trainer.global_step, 3), trainer.global_step]
    for run in trainer.runs:
        mine = steps_of(rows, run.name)
        assert [row["step"] for row in mine] == list(range(1, run.queue.total_steps + 1))
        means, start = [], 0
        for end in ends:
            losses = [row["loss"] for row in mine if start < row["global_step"] <= end]
            if losses:
                means.append(math.fsum(losses) / len(losses))
            start = end
        assert means == pytest.approx(run.history, rel=1e-6)


def test_learning_rate_rows_follow_the_cosine_formula(tiny_model_dir: Path, tmp_path: Path):
    """The lr a step used: linear warm-up then half a cosine (the formula, written out)."""
    train_config(tmp_path, tiny_model_dir, two_adapter_config(tmp_path))
    rows = steps_of(read_metrics(tmp_path / "out" / "metrics.jsonl"), "add")
    total, warmup, peak = len(rows), 3, 1e-2
    for row in rows:
        index = row["step"] - 1  # the schedule's value while the step ran
        if index < warmup:
            want = peak * index / warmup
        else:
            want = peak * 0.5 * (1 + math.cos(math.pi * (index - warmup) / (total - warmup)))
        assert row["lr"] == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_grad_norm_is_the_size_of_an_sgd_step(tmp_path: Path):
    """Plain SGD moves the weights by lr x gradient: ||after - before|| / lr is the norm."""
    tokenizer = make_tokenizer()
    template = write_template(tmp_path)
    raw = {"cutoff_len": 40, "lora": [
        {"name": "a", "data": write_json(tmp_path / "a.json", addition_rows(4)),
         "prompt": template, "r": 4, "batch_size": 4, "micro_batch_size": 2, "num_epochs": 1,
         "optim": "sgd", "momentum": 0.0, "lr": 0.5, "lora_dropout": 0.1,
         "scheduler_type": "constant"}]}  # fmt: skip
    config = parse_config(raw, "c")
    model = MultiLoraModel(make_model(vocab_size=len(tokenizer)).double())
    trainer = Trainer(model, tokenizer, config, prepare_data(config, tokenizer), tmp_path, 3)
    trainer.row_sinks.add(MetricsFileSink())
    before = adapter_tensors(trainer, "a")
    trainer.train()
    after = adapter_tensors(trainer, "a")
    moved = math.sqrt(sum(((after[k] - before[k]) ** 2).sum().item() for k in before))
    (row,) = steps_of(read_metrics(metrics_path(tmp_path)), "a")
    assert moved > 0
    assert row["grad_norm"] == pytest.approx(moved / 0.5, rel=1e-6)


@pytest.mark.parametrize(
    ("device_name", "override", "peak"),
    [
        (None, "0.5", 0.5e12),  # MLORA_PEAK_TFLOPS gives the peak
        ("NVIDIA H100 80GB HBM3", None, 66.9e12),  # a known device: NVIDIA's fp32 (non-TF32)
    ],
)
def test_mfu_from_the_flops_rule_and_the_given_peak(
    tiny_model_dir, tmp_path, monkeypatch, device_name, override, peak
):
    """MFU = (4 N per token + 4 H V per supervised token + 6 n per adapter token) / (seconds x
    peak), with N counted here from the model's own linear layers; the peak from
    MLORA_PEAK_TFLOPS, or from the device's name (the CPU backend is told it is an H100)."""
    from mlora.hardware.backends.base import Backend

    if override is not None:
        monkeypatch.setenv("MLORA_PEAK_TFLOPS", override)
    monkeypatch.setattr(Backend, "device_name", lambda self: device_name)
    trainer = train_config(tmp_path, tiny_model_dir, two_adapter_config(tmp_path))
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    hf = trainer.model.model
    frozen = sum(
        module.weight.numel()
        for name, module in hf.named_modules()
        if isinstance(module, torch.nn.Linear) and "lora" not in name and name != "lm_head"
    )
    head = hf.lm_head.weight.numel()
    adapters = {run.name: sum(p.numel() for p in run.params) for run in trainer.runs}
    estimate = trainer.meter.estimate
    assert (estimate.base_params, estimate.head_params) == (frozen, head)
    assert estimate.adapter_params == adapters
    by_step = {}
    for row in rows:
        if row["kind"] == "step":
            by_step.setdefault(row["global_step"], []).append(row)
    checked = 0
    for row in (r for r in rows if r["kind"] == "run"):
        steps = by_step.get(row["global_step"], [])
        if any(s["adapter"] == "rev" for s in steps) or not steps:
            continue  # rev's 4-row steps: its rows span passes (checked through tokens only)
        flops = sum(
            4 * frozen * s["tokens"] + 4 * head * s["supervised_tokens"]
            + 6 * adapters[s["adapter"]] * s["tokens"]
            for s in steps
        )  # fmt: skip
        assert row["tokens"] == sum(s["tokens"] for s in steps)
        assert row["mfu"] == pytest.approx(flops / (row["seconds"] * peak), rel=1e-9)
        checked += 1
    assert checked >= 3


def test_peak_flops_table_and_a_bad_override(monkeypatch):
    assert peak_flops(None, torch.float32) is None  # a CPU: no MFU
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H100 PCIe", torch.float16) == pytest.approx(756e12)
    monkeypatch.setenv("MLORA_PEAK_TFLOPS", "fast")
    with pytest.raises(MloraError, match="MLORA_PEAK_TFLOPS must be a number > 0"):
        peak_flops(None, torch.float32)


def row_keys(rows: list[dict]) -> list[tuple]:
    return [(r["adapter"], r["step"], r["global_step"]) for r in rows if r["kind"] == "step"]


def test_sigkill_then_resume_logs_every_step_exactly_once(tiny_model_dir: Path, tmp_path: Path):
    """Killed inside an optimizer step, rows past the last checkpoint already written: after
    --resume every adapter's steps are each there once, with the uninterrupted run's values."""
    config = write_run_config(tmp_path / "cfg")  # three adapters, accumulation, save_step 2
    clean, out = tmp_path / "clean", tmp_path / "out"
    api.train(config, str(tiny_model_dir), clean, seed=5, device="cpu", log=False)
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    args = mlora_args(tiny_model_dir, config, out, *(["--report_to", "tensorboard"] * tensorboard))
    first = run_mlora(args, script=HARNESS, MLORA_TEST_KILL="optim:9")
    assert first.returncode == -signal.SIGKILL, first.stderr
    killed_rows = row_keys(read_metrics(metrics_path(out)))
    if tensorboard:  # events past the checkpoint were written too: the resume must purge them
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        (group,) = (out / "tensorboard").iterdir()
        events = EventAccumulator(str(group / "acc")).Reload().Scalars("train/loss")
        assert len(events) == len([k for k in killed_rows if k[0] == "acc"]) > 2
    last = run_mlora([*args, "--resume"])
    assert last.returncode == 0, last.stderr

    want = read_metrics(metrics_path(clean))
    got = read_metrics(metrics_path(out))
    assert len(set(row_keys(got))) == len(row_keys(got))  # no step twice
    assert row_keys(got) == row_keys(want)
    assert max(k[2] for k in killed_rows) > 4  # the first kill had rows past its checkpoint
    for mine, theirs in zip(
        [r for r in got if r["kind"] == "step"], [r for r in want if r["kind"] == "step"],
        strict=True,
    ):  # fmt: skip
        for key in ("rows", "tokens", "supervised_tokens", "epoch", "lr"):
            assert mine[key] == theirs[key], (mine, theirs)
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
    if tensorboard:  # the resume purged the events past its checkpoint: each step once
        for name in NAMES:
            events = EventAccumulator(str(group / name)).Reload().Scalars("train/loss")
            mine = steps_of(got, name)
            assert [e.step for e in events] == [row["step"] for row in mine]
            assert [e.value for e in events] == pytest.approx([r["loss"] for r in mine], 1e-6)


def test_sigkill_then_resume_keeps_each_validation_once(tiny_model_dir: Path, tmp_path: Path):
    """A validating adapter killed mid-run (a real SIGKILL, rows and validations past the last
    checkpoint already written), then --resume: each validation is on its step's row once,
    with the uninterrupted run's loss."""
    raw = with_validation(two_adapter_config(tmp_path, save_step=3), every=2)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(raw), encoding="utf-8")
    clean, out = tmp_path / "clean", tmp_path / "out"
    api.train(config, str(tiny_model_dir), clean, seed=5, device="cpu", log=False)
    args = mlora_args(tiny_model_dir, config, out)
    first = run_mlora(args, script=HARNESS, MLORA_TEST_KILL="optim:15")  # in step 9; cut at 6
    assert first.returncode == -signal.SIGKILL, first.stderr
    killed = read_metrics(metrics_path(out))
    assert any("val_loss" in row and row["global_step"] > 6 for row in killed)  # past a cut
    last = run_mlora([*args, "--resume"])
    assert last.returncode == 0, last.stderr

    def validations(rows: list[dict]) -> list[tuple[str, int]]:
        return [(r["adapter"], r["step"]) for r in rows if r["kind"] == "step" and "val_loss" in r]

    got, want = read_metrics(metrics_path(out)), read_metrics(metrics_path(clean))
    assert row_keys(got) == row_keys(want)  # every step once
    assert validations(got) == validations(want)  # every validation once, on its step
    assert [r["val_loss"] for r in steps_of(got, "add") if "val_loss" in r] == pytest.approx(
        [r["val_loss"] for r in steps_of(want, "add") if "val_loss" in r], rel=1e-5
    )
    assert ("add", 8) in validations(got)  # the one the kill had written past the cut


def run_row(run: str, step: int) -> str:
    return json.dumps({"kind": "step", "run": run, "adapter": "a", "step": step,
                       "global_step": step, "loss": 1.0}) + "\n"  # fmt: skip


def test_restart_drops_only_this_runs_rows_past_the_step(tmp_path: Path):
    path = metrics_path(tmp_path)
    ours = [run_row("r1", s) for s in (1, 2, 3)]
    path.write_text("".join(ours) + '{"kind": "step", "run": "r1", "glo', encoding="utf-8")
    writer = MetricsFile(tmp_path, "r1")
    writer.start(resume_step=2)  # the rows end the file: cut there (and the torn line)
    writer.write([{"kind": "step", "run": "r1", "global_step": 3, "new": True}])
    writer.close()
    assert path.read_text(encoding="utf-8").splitlines()[:2] == [r.strip() for r in ours[:2]]
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[2])["new"] is True

    mixed = [run_row("r1", 1), run_row("r1", 4), run_row("other", 9), "not json\n"]
    path.write_text("".join(mixed), encoding="utf-8")
    MetricsFile(tmp_path, "r1").start(resume_step=2)  # another run wrote since: rewritten
    assert path.read_text(encoding="utf-8") == mixed[0] + mixed[2] + mixed[3]
    MetricsFile(tmp_path, "r1").start(resume_step=None)  # a fresh start of r1: its rows go
    assert path.read_text(encoding="utf-8") == mixed[2] + mixed[3]


def test_reading_a_missing_empty_or_broken_file_is_one_line(tmp_path: Path):
    path = metrics_path(tmp_path)
    with pytest.raises(MetricsFileError, match=r"metrics.jsonl: no metrics file"):
        read_metrics(path)
    path.write_text("", encoding="utf-8")
    with pytest.raises(MetricsFileError, match=r"metrics.jsonl: no rows yet"):
        read_metrics(path)
    path.write_text(run_row("r", 1) + "[1, 2]\n", encoding="utf-8")
    with pytest.raises(MetricsFileError, match=r"metrics.jsonl: line 2 is not a JSON object"):
        read_metrics(path)
    path.write_text(run_row("r", 1) + '{"kind": "st', encoding="utf-8")  # still being written
    assert len(read_metrics(path)) == 1


def test_flops_estimate_of_a_tied_head_counts_it_once():
    """A model whose lm_head is its embedding: the head is not counted in N."""
    model = make_model().requires_grad_(False)  # frozen, as MultiLoraModel holds a base
    model.lm_head.weight = model.model.embed_tokens.weight
    estimate = FlopsEstimate.of(model, {})
    linears = sum(
        m.weight.numel() for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    )  # fmt: skip
    assert (estimate.base_params, estimate.head_params) == (linears, model.lm_head.weight.numel())


def test_a_validation_lands_on_its_pending_step_row_only():
    """The collector puts a validation loss on the pending row of that adapter and step; a
    step it no longer holds is refused (the trainer then writes a ``validation`` row)."""
    from mlora.training.metrics.collector import PendingStep, StepCollector

    collector = StepCollector()
    for adapter in ("a", "b"):
        collector.add(PendingStep(
            adapter=adapter, step=4, global_step=7, epoch=1.0, rows=2, tokens=20,
            supervised_tokens=9, lr=1e-3, loss=torch.tensor(2.5), grad_norm=torch.tensor(0.5),
            time=0.0,
        ))  # fmt: skip
    assert collector.add_validation("a", 4, 1.75)
    assert not collector.add_validation("a", 3, 9.0) and not collector.add_validation("c", 4, 9.0)
    rows = {row.adapter: row.to_json() for row in collector.take("r")}
    assert rows["a"]["val_loss"] == 1.75 and "val_loss" not in rows["b"]
    assert not collector.add_validation("a", 4, 1.75)  # taken: no longer pending
