"""Sweeps: Optuna's trials trained side by side, entering and leaving at step boundaries.

References: Optuna's own study (its best trial, its grid), PEFT (the best adapter loads), and
the same configuration trained alone (a trial that enters mid-run gets its weights, with SGD).
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import signal
from pathlib import Path

import optuna
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mlora.cli.train import main
from mlora.config.schema import parse_config
from mlora.sweep.runner import run_sweep
from tests.conftest import make_tokenizer
from tests.helpers import addition_rows, run_in_memory, write_json, write_template
from tests.reliability_support import one_error_line, read_until, run_mlora, start_mlora

SEED = 5


def sweep_config(folder: Path, **sweep: object) -> dict:
    """A small sweep: 32 training rows (8 held out), batch 8, two epochs, SGD with dropout."""
    base = {
        "data": write_json(folder / "add.json", addition_rows(40)),
        "prompt": write_template(folder), "batch_size": 8, "num_epochs": 2, "val_set_size": 8,
        "eval_steps": 1, "optim": "sgd", "lora_dropout": 0.1, "save_step": 2,
    }  # fmt: skip
    block = {"base": base, "search_space": {"lr": [0.3, 0.05, 1e-3], "r": [2, 4]},
             "sampler": "grid", "concurrent": 2, **sweep}  # fmt: skip
    return {"cutoff_len": 32, "sweep": block}


def write_config(folder: Path, raw: dict) -> Path:
    path = folder / "sweep.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def grid(tiny_model_dir, tmp_path_factory):
    """A 3 x 2 grid, two trials at a time, no pruner."""
    folder = tmp_path_factory.mktemp("grid")
    raw = sweep_config(folder, name="grid")
    result = run_sweep(parse_config(raw, "grid.json"), str(tiny_model_dir), folder / "out", SEED)
    return raw, result


PRUNED = {"name": "pruned", "search_space": {"lr": [0.3, 0.05, 1e-3, 1e-4], "r": [2, 4]},
          "trials": 6, "pruner": "median", "pruner_options": {"n_startup_trials": 1}}  # fmt: skip


@pytest.fixture(scope="module")
def pruned(tiny_model_dir, tmp_path_factory):
    """Six trials of a 4 x 2 grid with the median pruner, through the CLI (the reference of
    the interrupted run below)."""
    folder = tmp_path_factory.mktemp("pruned")
    config = write_config(folder, sweep_config(folder, **PRUNED))
    out = folder / "out"
    argv = ["--base_model", str(tiny_model_dir), "--config", str(config), "--dir", str(out),
            "--seed", str(SEED)]  # fmt: skip
    assert main(argv) == 0
    return config, out / "pruned"


def read_trials(folder: Path) -> list[dict]:
    with open(folder / "trials.csv", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# --- what a sweep finds and writes ------------------------------------------------------------


def test_grid_runs_every_combination_once(grid) -> None:
    _, result = grid
    rows = read_trials(result.folder)
    combos = [(float(row["lr"]), int(row["r"])) for row in rows]
    assert sorted(combos) == sorted(itertools.product([0.3, 0.05, 1e-3], [2, 4]))
    assert {row["state"] for row in rows} == {"complete"}
    assert all(int(row["steps"]) == 8 for row in rows)
    for row in rows:  # save_step 2, save_total_limit 2: each trial keeps its newest two
        kept = sorted(p.name for p in (result.folder / row["name"]).glob("checkpoint-*"))
        assert kept == ["checkpoint-4", "checkpoint-6"], kept


def test_outputs_agree_with_optunas_study(grid, tiny_model_dir) -> None:
    _, result = grid
    folder = result.folder
    study = optuna.load_study(study_name="grid", storage=f"sqlite:///{folder / 'study.db'}")
    best = study.best_trial
    summary = json.loads((folder / "sweep_result.json").read_text())
    assert summary["best"]["number"] == best.number == result.best
    assert summary["best"]["value"] == pytest.approx(best.value)
    assert summary["best"]["params"] == best.params
    for trial, row, entry in zip(study.trials, read_trials(folder), summary["trials"], strict=True):
        assert int(row["number"]) == trial.number == entry["number"]
        assert float(row["value"]) == pytest.approx(trial.value)
        assert entry["curve"][-1][1] == pytest.approx(trial.value)  # the final weights' loss
        assert entry["tokens"] > 0 and entry["wall_time_s"] > 0
    assert (folder / "validation_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best_folder = folder / f"trial-{best.number:03d}"
    copied = load_file(folder / "best_adapter" / "adapter_model.safetensors")
    original = load_file(best_folder / "adapter_model.safetensors")
    assert all(torch.equal(copied[k], original[k]) for k in original)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    PeftModel.from_pretrained(base, folder / "best_adapter")  # a PEFT folder


def test_a_trial_entering_mid_run_equals_it_trained_alone(grid, tiny_model_dir, tmp_path) -> None:
    raw, result = grid
    late = [r for r in result.records if r.entered_at > 0]
    assert late, "no trial entered mid-run"
    record = late[-1]
    alone = {"cutoff_len": raw["cutoff_len"],
             "lora": [{**raw["sweep"]["base"], **record.params, "name": record.name}]}  # fmt: skip
    factory = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # noqa: E731
    trainer = run_in_memory(factory, make_tokenizer(), alone, tmp_path / "alone", seed=SEED)
    got = load_file(result.folder / record.name / "adapter_model.safetensors")
    want = trainer.weights_copy(trainer.runs[0])
    assert got.keys() == want.keys()
    for key in want:
        scale = want[key].abs().max().clamp_min(1e-12)
        assert ((got[key] - want[key]).abs().max() / scale).item() <= 1e-5, key
    state = trainer.validation.states[record.name]
    assert [loss for _, loss in record.curve] == pytest.approx([x for _, x in state.curve], 1e-5)


def test_a_pruned_trial_frees_its_place_at_that_step(pruned) -> None:
    _, folder = pruned
    rows = read_trials(folder)
    cut = [r for r in rows if r["state"] == "pruned"]
    assert cut, "the median pruner pruned nothing"
    taken = 0
    for row in cut:
        assert int(row["steps"]) < 8  # stopped before its end
        left = int(row["left_at_step"])
        later = [r for r in rows if int(r["number"]) > int(row["number"])]
        if later and any(int(r["entered_at_step"]) >= left for r in later):
            assert any(int(r["entered_at_step"]) == left for r in later), row  # its place
            taken += 1
    assert taken, "no pruned trial's place was taken: the test checked nothing"
    for step in range(max(int(r["left_at_step"]) for r in rows)):  # never more than 2 at once
        live = [r for r in rows if int(r["entered_at_step"]) <= step < int(r["left_at_step"])]
        assert len(live) <= 2


def test_sigkill_mid_sweep_then_resume_gives_the_same_sweep(
    pruned, tiny_model_dir, tmp_path
) -> None:
    config, reference = pruned
    out = tmp_path / "out"
    args = ["--base_model", str(tiny_model_dir), "--config", str(config), "--dir", str(out),
            "--seed", str(SEED)]  # fmt: skip
    proc = start_mlora(args)
    read_until(proc, "trial trial-003 enters")  # mid-sweep: trials done, running and to come
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (out / "pruned" / "trials.csv").exists()
    done = run_mlora([*args, "--resume"])
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr
    assert "already reported" not in done.stderr  # nothing told to Optuna twice
    assert "ExperimentalWarning" not in done.stderr
    folder = out / "pruned"
    studies = [  # Optuna's own record: every trial, report and prune once, as uninterrupted
        optuna.load_study(study_name="pruned", storage=f"sqlite:///{f / 'study.db'}").trials
        for f in (folder, reference)
    ]
    assert len(studies[0]) == len(studies[1]) == PRUNED["trials"]
    for a, b in zip(*studies, strict=True):
        assert (a.number, a.state, a.params) == (b.number, b.state, b.params)
        assert a.intermediate_values.keys() == b.intermediate_values.keys()
        assert list(a.intermediate_values.values()) == pytest.approx(
            list(b.intermediate_values.values()), rel=1e-5
        )
        assert a.value == pytest.approx(b.value, rel=1e-5)
    ours, theirs = read_trials(folder), read_trials(reference)
    keys = ("number", "name", "state", "lr", "r", "steps", "tokens", "entered_at_step",
            "left_at_step")  # fmt: skip
    assert [[r[k] for k in keys] for r in ours] == [[r[k] for k in keys] for r in theirs]
    for a, b in zip(ours, theirs, strict=True):
        flat = [[x for point in json.loads(r["val_curve"]) for x in point] for r in (a, b)]
        assert flat[0] == pytest.approx(flat[1], rel=1e-5)
        got = load_file(folder / a["name"] / "adapter_model.safetensors")
        want = load_file(reference / b["name"] / "adapter_model.safetensors")
        for key in want:
            scale = want[key].abs().max().clamp_min(1e-12)
            assert ((got[key] - want[key]).abs().max() / scale).item() <= 1e-5


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"search_space": {"lr": [1e-3], "alpha": [1]}}, r"unknown key 'alpha' in 'search_space'"),
        ({"search_space": {"r": []}}, r"key 'search_space\.r' is an empty list of choices"),
        ({"sampler": "tpe", "trials": 2,
          "search_space": {"lr": {"low": 0.0, "high": 1e-2, "log": True}}},
         r"key 'search_space\.lr': a log range needs 'low' > 0"),
        ({"trials": 0}, r"key 'trials' must be an integer >= 1"),
        ({"concurrent": 0}, r"key 'concurrent' must be an integer >= 1"),
        ({"base": {"data": "d.json", "eval_steps": 2}}, r"key 'eval_steps' needs 'val_data'"),
        ({"base": {"data": "d.json", "val_set_size": 3, "eval_steps": 0}},
         r"key 'eval_steps' must be an integer >= 1"),
        ({"base": {"data": "d.json", "early_stopping_patience": 2}},
         r"key 'early_stopping_patience' needs 'val_data'"),
        ({"base": {"data": "d.json"}, "pruner": "median"}, r"'base' needs 'val_data' or"),
        ({"sampler": "grid", "search_space": {"lr": {"low": 1e-4, "high": 1e-2}}},
         r"key 'search_space\.lr' must be a list of values for sampler 'grid'"),
        ({"pruner": "median", "pruner_options": {"warmup": 2}},
         r"'pruner_options\.warmup' is no option of Optuna's MedianPruner"),
    ],
)  # fmt: skip
def test_bad_sweep_input_is_one_line_before_the_model_loads(
    change: dict, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    raw = sweep_config(tmp_path)
    raw["sweep"].update(change)
    config = write_config(tmp_path, raw)
    missing = tmp_path / "no-such-model"  # a model would fail later: the config fails first
    argv = ["--base_model", str(missing), "--config", str(config), "--dir", str(tmp_path / "o")]
    assert main(argv) == 2
    assert re.search(message, one_error_line(capsys.readouterr().err))


# --- launch.py sweep ------------------------------------------------------------------------------


def test_launch_sweep_writes_a_config_mlora_reads(tmp_path: Path, capsys) -> None:
    from mlora.cli.launch import main as launch

    data = write_json(tmp_path / "add.json", addition_rows(20))
    target = tmp_path / "sweep.json"
    argv = ["sweep", "--data", data, "--search", "lr=1e-5:1e-3:log", "--search", "r=4,8,16",
            "--search", "target_modules=q_proj+v_proj,q_proj", "--sampler", "tpe", "--trials",
            "12", "--concurrent", "4", "--pruner", "successive_halving", "--eval_steps", "2,6,18",
            "--file_name", str(target), "--name", "search"]  # fmt: skip
    assert launch(argv) == 0
    config = parse_config(json.loads(target.read_text()), str(target))
    sweep = config.sweep
    assert sweep is not None and (sweep.name, sweep.trials, sweep.concurrent) == ("search", 12, 4)
    assert (sweep.sampler, sweep.pruner) == ("tpe", "successive_halving")
    lr = sweep.space["lr"]
    assert (lr.kind, lr.low, lr.high, lr.log) == ("float", 1e-5, 1e-3, True)
    assert sweep.space["r"].choices == (4, 8, 16)
    assert sweep.space["target_modules"].choices == (["q_proj", "v_proj"], ["q_proj"])
    assert sweep.base["val_set_size"] == 0.1 and sweep.base["eval_steps"] == [2, 6, 18]
    assert launch(argv) == 2  # never overwritten without --overwrite
    assert "already exists" in capsys.readouterr().err
    assert launch(["sweep", "--data", data, "--search", "rank=4", "--file_name",
                   str(tmp_path / "x.json")]) == 2  # fmt: skip
    assert "'rank' is not searchable" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x.json").exists()


def test_readme_sweep_example_writes_a_valid_config(tmp_path: Path, monkeypatch) -> None:
    """The README's offline example (``launch.py sweep`` then ``launch.py run``) as written:
    its flags parse and the config it writes is one ``mlora.py`` accepts."""
    import shlex

    from mlora.cli.launch import main as launch

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("An example that runs offline on the demo model")[1]
    block = block.split("```bash\n")[1].split("```")[0].replace("\\\n", " ")
    lines = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    assert [line[:2] for line in lines] == [["python", "launch.py"]] * 2
    sweep_args, run_args = lines[0][2:], lines[1][2:]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    write_json(tmp_path / "data" / "dummy_data.json", addition_rows(20))
    assert launch(sweep_args) == 0
    assert run_args[:3] == ["run", "--config", "sweep.json"]
    config = parse_config(json.loads((tmp_path / "sweep.json").read_text()), "sweep.json")
    sweep = config.sweep
    assert sweep is not None and sweep.pruner == "successive_halving"
    low, factor = sweep.pruner_options["min_resource"], sweep.pruner_options["reduction_factor"]
    assert sweep.base["eval_steps"] == [low, low * factor]  # the rungs below its 14 steps
