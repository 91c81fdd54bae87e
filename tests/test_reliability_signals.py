"""SIGTERM and SIGINT in every phase of a run, then ``--resume``: the adapters of the
uninterrupted run, bit for bit.

The phases: the base model loading, the first step, a checkpoint folder being written (on the
background writer), the final adapter being written, and ``--evaluate`` scoring. Each signal
is sent by the process to itself at that moment (``MLORA_TEST_SIGNAL`` in
tests/reliability_harness.py), so the phase is exact on a fast or a slow machine. All runs are
forks of one interpreter that imported mlora once (tests/forked_cli.py): the interrupted runs
and the uninterrupted reference together, then the resumes together.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.reliability_support import (
    FORKED_CLI,
    NAMES,
    env_with,
    final_weights,
    mlora_args,
    one_error_line,
    write_run_config,
)

# phase -> the signal sent in it (both signals are covered; each phase takes one)
PHASES = {
    "load": "SIGTERM@load",
    "first-step": "SIGINT@step:0",
    "checkpoint": "SIGTERM@write:/.checkpoint-2.",
    "final-save": "SIGINT@write:acc/.adapter_model",
}
EVALUATION = {"eval-sigterm": "SIGTERM@eval", "eval-sigint": "SIGINT@eval"}


def forked(jobs: list[dict]) -> list[int]:
    """Run ``jobs`` (see tests/forked_cli.py); their exit codes."""
    result = subprocess.run(
        [sys.executable, FORKED_CLI], input=json.dumps(jobs), capture_output=True, text=True,
        timeout=600, env=env_with(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def job(root: Path, name: str, argv: list[str], signal: str | None = None) -> dict:
    env = {"MLORA_TEST_SIGNAL": signal} if signal else {}
    return {"cwd": str(root), "argv": argv, "stdout": str(root / f"{name}.out"),
            "stderr": str(root / f"{name}.err"), "env": env}  # fmt: skip


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every phase interrupted, and the reference, as forks; then the resumes as forks."""
    root = tmp_path_factory.mktemp("signals")
    config = write_run_config(root / "cfg")
    raw = json.loads(config.read_text())
    raw["lora"][0]["test_data"] = raw["lora"][0]["data"]  # acc is evaluated
    eval_config = root / "cfg" / "evaluate.json"
    eval_config.write_text(json.dumps(raw))

    def args(name: str, *extra: str, cfg: Path = config) -> list[str]:
        return mlora_args(tiny_model_dir, cfg, root / name, *extra)

    jobs = [job(root, "reference", args("reference"))]
    jobs += [job(root, phase, args(phase), signal) for phase, signal in PHASES.items()]
    codes = dict(zip(["reference", *PHASES], forked(jobs), strict=True))
    assert codes["reference"] == 0, (root / "reference.err").read_text()
    reference_files = files_of(root / "reference")
    stopped = {phase: (codes[phase], (root / f"{phase}.err").read_text()) for phase in PHASES}
    before = {phase: files_of(root / phase) for phase in PHASES}

    evaluate = [*args("reference", "--evaluate", cfg=eval_config)]
    jobs = [job(root, f"{phase}-resume", args(phase, "--resume")) for phase in PHASES]
    jobs += [job(root, name, evaluate, signal) for name, signal in EVALUATION.items()]
    codes = dict(zip([*PHASES, *EVALUATION], forked(jobs), strict=True))
    evaluated = {name: (codes[name], (root / f"{name}.err").read_text()) for name in EVALUATION}
    resumed = {p: (codes[p], (root / f"{p}-resume.err").read_text()) for p in PHASES}
    after_evaluation = files_of(root / "reference")
    return {
        "root": root, "stopped": stopped, "resumed": resumed, "before": before,
        "evaluated": evaluated, "reference_files": reference_files,
        "after_evaluation": after_evaluation,
    }  # fmt: skip


def same_bits(got: dict, want: dict) -> bool:
    return all(
        got[name].keys() == want[name].keys()
        and all(torch.equal(got[name][key], want[name][key]) for key in want[name])
        for name in NAMES
    )


@pytest.mark.parametrize("phase", ["load", "first-step", "checkpoint"])
def test_a_signal_stops_at_the_next_step_with_a_checkpoint_and_resume_is_exact(
    runs: dict, phase: str
) -> None:
    code, stderr = runs["stopped"][phase]
    signal = PHASES[phase].split("@")[0]
    assert code == 130, stderr
    line = one_error_line(stderr)
    assert f"stopped by {signal} after global step" in line and "--resume" in line, line
    code, stderr = runs["resumed"][phase]
    assert code == 0, stderr
    assert "resuming from" in stderr
    root = runs["root"]
    assert same_bits(final_weights(root / phase), final_weights(root / "reference"))
    assert not list((root / phase).rglob(".*.tmp*"))


def test_a_signal_during_the_final_save_loses_nothing(runs: dict) -> None:
    """The run has nothing left but to write: it writes everything, says the signal came as it
    ended, and --resume then has nothing to do (every adapter's files stay as they are)."""
    code, stderr = runs["stopped"]["final-save"]
    assert code == 0, stderr
    assert "SIGINT received as the run ended: every adapter is saved" in stderr
    assert "Traceback" not in stderr
    root = runs["root"]
    assert same_bits(final_weights(root / "final-save"), final_weights(root / "reference"))
    code, stderr = runs["resumed"]["final-save"]
    assert code == 0, stderr
    finals = [f"{name}/{file}" for name in NAMES for file in ("adapter_model.safetensors",
              "adapter_config.json")]  # fmt: skip
    after = files_of(root / "final-save")
    assert all(after[f] == runs["before"]["final-save"][f] for f in finals)


@pytest.mark.parametrize("name", list(EVALUATION))
def test_a_signal_during_evaluation_is_one_line_and_changes_nothing(runs: dict, name: str):
    code, stderr = runs["evaluated"][name]
    assert code == 130, stderr
    assert one_error_line(stderr) == "error: interrupted"
    assert runs["after_evaluation"] == runs["reference_files"]  # no result, adapters unchanged
