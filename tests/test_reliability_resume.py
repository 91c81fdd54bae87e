"""Resume after SIGKILL, Ctrl-C and SIGTERM through the real CLI: the result equals a clean run.

One uninterrupted run is the reference. Another run of the same config is killed with a real
SIGKILL several times (inside an optimizer step, inside a checkpoint write, at a random moment
from outside) and resumed each time; its final adapters must match the reference to 1e-5
(max relative difference, fp32). Ctrl-C and SIGTERM must stop after the current step with a
checkpoint and a message that says how to resume — and that command must work.
"""

from __future__ import annotations

import json
import random
import shlex
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from mlora.cli.train import main
from mlora.training.checkpoints import list_checkpoints, list_cuts
from tests.helpers import addition_rows, write_json, write_template
from tests.reliability_harness import ROOT
from tests.reliability_support import (
    HARNESS,
    NAMES,
    TIMEOUT,
    fake_cut,
    final_weights,
    max_relative_difference,
    mlora_args,
    one_error_line,
    only_records,
    read_until,
    run_mlora,
    start_mlora,
    write_run_config,
)

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_run_config(tmp_path_factory.mktemp("reliability-config"))


@pytest.fixture(scope="module")
def reference(
    signalled: dict, config: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
):
    """Output folder of the uninterrupted run (in this process: the same code, one start less).

    Asks for ``signalled`` only to start those runs first: they overlap everything after."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(mlora_args(tiny_model_dir, config, out)) == 0
    return out


@pytest.fixture(scope="module")
def signalled(config: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two runs stopped by a real SIGINT and SIGTERM after a few steps: {signal: future of
    (output folder, exit code, stderr)}. They run in the background, beside the SIGKILL test."""
    root = tmp_path_factory.mktemp("signals")

    def stop(sig: signal.Signals, after: str) -> tuple[Path, int, str]:
        out = root / sig.name
        proc = start_mlora(mlora_args(tiny_model_dir, config, out))
        seen = read_until(proc, after)
        proc.send_signal(sig)
        _, rest = proc.communicate(timeout=TIMEOUT)
        return out, proc.returncode, "".join(seen) + rest

    with ThreadPoolExecutor(2) as pool:
        yield {
            sig: pool.submit(stop, sig, after)
            for sig, after in ((signal.SIGINT, "step 2 |"), (signal.SIGTERM, "step 4 |"))
        }


def temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob(".*.tmp*")]


def test_checkpoints_hold_everything_a_resume_needs(reference: Path, tiny_model_dir: Path) -> None:
    for name in NAMES:
        found = list_checkpoints(reference / name)
        assert len(found) <= 2  # save_total_limit
    step, folder = list_checkpoints(reference / "acc")[-1]
    names = {p.name for p in folder.iterdir()}
    assert names == {
        "adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
        "trainer_state.json",
    }  # fmt: skip
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["steps_done"] == step and set(state["queue"]) >= {"epoch", "cursor"}
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
    assert optimizer["state"] and optimizer["param_groups"][0]["lr"] == pytest.approx(1e-2)
    assert "last_epoch" in torch.load(folder / "scheduler.pt", weights_only=True)
    # A checkpoint is a PEFT adapter in its own right.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    PeftModel.from_pretrained(base, folder)
    assert not temporaries(reference)


def test_sigkill_at_several_moments_then_resume_equals_uninterrupted(
    config: Path, tiny_model_dir: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = mlora_args(tiny_model_dir, config, out)
    logs = []

    # 1. Inside global step 6: acc's optimizer has stepped, sgd's has not (7th optimizer step).
    first = run_mlora(args, script=HARNESS, MLORA_TEST_KILL="optim:7")
    assert first.returncode == -signal.SIGKILL, first.stderr
    short_file = out / "short" / "adapter_model.safetensors"
    short_written = short_file.stat().st_mtime_ns  # "short" finished before the kill

    # 2. Resume (sgd replays from its start: no checkpoint of it yet), then die inside the 7th
    #    file write after it: the cut at step 6 is being written (sgd's checkpoint-2, the only
    #    adapter due, is complete; the cut's manifest is in a temp folder). acc (step 3) is not
    #    due, so nothing of it is rewritten.
    second = run_mlora([*args, "--resume"], script=HARNESS, MLORA_TEST_KILL="write:7")
    assert second.returncode == -signal.SIGKILL, second.stderr
    logs.append(second.stderr)
    assert "resuming from" in second.stderr and "step-4" in second.stderr
    assert temporaries(out), "the kill should have left a half-written folder behind"
    assert (out / "sgd" / "checkpoint-2").is_dir()  # complete, but its cut never was
    assert not (out / "acc" / "checkpoint-3").exists()  # each adapter on its own schedule

    # 3. Resume (the half-written folder must be ignored), SIGKILL from outside at a seeded
    #    moment: each of the 8+ steps left takes 0.25 s or more, so the kill (at most 1.5 s
    #    after the resume began) always lands in the middle of the run.
    proc = start_mlora([*args, "--resume"], script=HARNESS, MLORA_TEST_STEP_SECONDS="0.25")
    lines = read_until(proc, "resuming from")
    assert "step-4" in lines[-1]
    delay = random.Random(24).uniform(0.0, 1.5)
    time.sleep(delay)
    proc.kill()
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(lines) + rest
    assert "peak memory" not in rest  # killed before its end

    # 4. Finish through launch.py run --resume.
    last = run_mlora(["run", *args, "--resume"], script=str(ROOT / "launch.py"))
    assert last.returncode == 0, last.stderr
    logs.append(last.stderr)

    difference = max_relative_difference(final_weights(out), final_weights(reference))
    assert difference <= TOLERANCE, f"max relative difference {difference} (kill after {delay}s)"
    assert short_file.stat().st_mtime_ns == short_written  # finished stays finished
    for log in logs:
        resumed = next(line for line in log.splitlines() if "resuming from" in line)
        assert "short" in resumed.split("already finished: ")[1].split(", ")
        assert "adapter short: finished" not in log
    assert not temporaries(out)


def write_one_adapter_config(folder: Path, name: str) -> Path:
    """A one-adapter config (another run to train into the same folder)."""
    folder.mkdir()
    rows = write_json(folder / "rows.json", addition_rows(4))
    adapter = {"name": name, "data": rows, "prompt": write_template(folder), "r": 2,
               "batch_size": 2, "num_epochs": 1}  # fmt: skip
    path = folder / "config.json"
    path.write_text(json.dumps({"cutoff_len": 40, "save_step": 1, "lora": [adapter]}))
    return path


def stopped_at(line: str) -> int:
    return int(line.split("after global step ")[1].split(";")[0])


def test_ctrl_c_and_sigterm_write_a_checkpoint_and_the_resume_command_works(
    signalled: dict, reference: Path, config: Path, tiny_model_dir: Path, capsys
) -> None:
    lines = {}
    for sig, future in signalled.items():
        out, code, stderr = future.result(timeout=TIMEOUT)
        assert code == 130, stderr
        line = lines[sig] = one_error_line(stderr)
        assert f"stopped by {sig.name} after global step" in line and "resume with: " in line
        step = stopped_at(line)
        assert [s for s, _ in list_cuts(only_records(out))][-1] == step >= 2  # the one named
        manifest = json.loads((only_records(out) / f"step-{step}" / "manifest.json").read_text())
        assert manifest["global_step"] == step
        assert manifest["adapters"]["acc"]["status"] == "running"

    out, step = signalled[signal.SIGINT].result()[0], stopped_at(lines[signal.SIGINT])
    records = only_records(out)
    # Issue 16's repro: another config trained into the same folder meanwhile must leave the
    # interrupted run's records alone, and its own --resume must find them.
    other = write_one_adapter_config(config.parent / "other", "c")
    assert main(mlora_args(tiny_model_dir, other, out)) == 0
    c_weights = (out / "c" / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    third = write_one_adapter_config(config.parent / "third", "d")
    assert main(mlora_args(tiny_model_dir, third, out, "--resume")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert (
        f"no complete checkpoint of adapters d with this config; resumable runs there: "
        f"{records.name} (adapters acc, short, sgd from {config}, --seed 5, step {step})" in line
    )

    command = shlex.split(lines[signal.SIGINT].split("resume with: ")[1])
    assert command[:2] == ["python", "mlora.py"] and command[-1] == "--resume"
    resumed = run_mlora(command[2:])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {records / f'step-{step}'}" in resumed.stderr
    difference = max_relative_difference(final_weights(out), final_weights(reference))
    assert difference <= TOLERANCE
    assert (out / "c" / "adapter_model.safetensors").read_bytes() == c_weights


def test_resume_skips_a_damaged_newest_checkpoint_and_still_equals_the_clean_run(
    signalled: dict, reference: Path, config: Path, tiny_model_dir: Path, capsys
) -> None:
    """The SIGTERM run's newest cut has its run state cut short (a disk that lost its tail);
    --resume names it, resumes from the cut before, and ends equal to the uninterrupted run."""
    out, code, _ = signalled[signal.SIGTERM].result(timeout=TIMEOUT)
    assert code == 130
    cuts = list_cuts(only_records(out))
    assert len(cuts) >= 2
    (_, newest), (_, previous) = cuts[-1], cuts[-2]
    state = newest / "state.safetensors"
    state.write_bytes(state.read_bytes()[:-100])
    capsys.readouterr()
    assert main(mlora_args(tiny_model_dir, config, out, "--resume")) == 0
    err = capsys.readouterr().err
    assert f"skipping checkpoint {newest}: {state}: truncated: " in err
    assert f"resuming from {previous}" in err and "Traceback" not in err
    difference = max_relative_difference(final_weights(out), final_weights(reference))
    assert difference <= TOLERANCE


def test_resume_refuses_another_seed_base_a_changed_key_or_a_new_order(config: Path) -> None:
    from mlora.config.schema import load_config, parse_config
    from mlora.core.errors import MloraError
    from mlora.training.checkpoints import ResumePoint, check_same_run
    from mlora.training.run_records import RunIdentity

    saved = RunIdentity(load_config(config), 5, "hub/model")
    manifest = {"seed": 5, "base_model": "hub/model", "config": saved.config_json}
    point = ResumePoint(config.parent, manifest)
    raw = json.loads(config.read_text())

    def now(seed: int = 5, base: str = "hub/model", **top: object) -> RunIdentity:
        return RunIdentity(parse_config({**raw, **top}), seed, base)

    check_same_run(point, now(log_step=3))
    with pytest.raises(MloraError, match="--seed 5, not 6"):
        check_same_run(point, now(seed=6))
    with pytest.raises(MloraError, match="trained on hub/model, not hub/other"):
        check_same_run(point, now(base="hub/other"))
    raw["lora"][0]["lr"] = 0.5
    with pytest.raises(MloraError, match=r"adapter 'acc' key 'lr' was 0\.01, now 0\.5"):
        check_same_run(point, now())
    raw["lora"].reverse()
    with pytest.raises(MloraError, match="in the order acc, short, sgd"):
        check_same_run(point, now())


def test_existing_output_of_an_interrupted_run_suggests_resume(config: Path, tmp_path: Path):
    from mlora.api import check_outputs
    from mlora.config.schema import load_config
    from mlora.core.errors import MloraError
    from mlora.training.run_records import RunIdentity

    (tmp_path / "acc").mkdir()
    (tmp_path / "acc" / "adapter_config.json").write_text("{}")
    identity = RunIdentity(load_config(config), 5, None)
    fake_cut(identity.records(tmp_path), identity, 4, {"acc": None, "short": None})
    with pytest.raises(MloraError, match=r"pass --overwrite to replace it \(or --resume"):
        check_outputs(load_config(config), tmp_path, overwrite=False, load_adapter=False)


def test_resume_notices_changed_training_data(reference: Path) -> None:
    from mlora.batching.dispatcher import AdapterQueue
    from mlora.core.errors import MloraError
    from mlora.data.rows import TokenizedRow
    from mlora.training.checkpoints import check_same_data

    _, folder = list_checkpoints(reference / "acc")[-1]
    state = json.loads((folder / "trainer_state.json").read_text())
    assert sorted(state["epoch_order"]) == list(range(12))  # the row order of its epoch

    def queue(rows: int) -> AdapterQueue:  # acc's settings; only the row count varies
        row = TokenizedRow([1, 2, 3], [1, 2, 3])
        return AdapterQueue("acc", [row] * rows, 4, 2, 2, shuffle=True, seed=5)

    check_same_data(folder, queue(12))
    with pytest.raises(MloraError, match="its training data changed since"):
        check_same_data(folder, queue(13))
