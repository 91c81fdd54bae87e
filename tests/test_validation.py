"""Validation while training: the held-out split, the validation loss (against PEFT), early
stopping (against transformers' EarlyStoppingCallback), save_best and resume."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainerControl, TrainerState
from transformers.trainer_callback import EarlyStoppingCallback

from mlora.config.schema import parse_config
from mlora.core.errors import ConfigError, DataError
from mlora.data.holdout import split_rows
from mlora.training import validation as validation_module
from mlora.training.trainer import prepare_data
from mlora.training.validation import ValidationState, prepare_validation, validation_losses
from tests.conftest import make_tokenizer
from tests.helpers import (
    addition_rows,
    run_in_memory,
    train_killed_then_resumed,
    write_json,
    write_template,
)


def adapter(name: str, data: str, prompt: str, **keys) -> dict:
    return {
        "name": name, "data": data, "prompt": prompt, "batch_size": 4, "num_epochs": 1,
        "lr": 1e-2, "lora_dropout": 0.1, **keys,
    }  # fmt: skip


@pytest.fixture
def files(tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(
        data=write_json(tmp_path / "add.json", addition_rows(35)),  # 35 distinct rows
        val=write_json(tmp_path / "val.json", addition_rows(6, offset=3)),
        prompt=write_template(tmp_path),
    )


# --- the split ---------------------------------------------------------------------------------


def test_split_is_deterministic_for_a_seed_and_disjoint(files) -> None:
    rows = list(range(50))
    train, val = split_rows(rows, 0.2, seed=3, source="a.json")
    assert (train, val) == split_rows(rows, 0.2, seed=3, source="a.json")
    assert len(val) == 10 and sorted(train + val) == rows and not set(train) & set(val)
    assert val != split_rows(rows, 0.2, seed=4, source="a.json")[1]  # another seed, other rows
    assert val != split_rows(rows, 0.2, seed=3, source="b.json")[1]  # each file its own draw
    assert len(split_rows(rows, 7, seed=3, source="a.json")[1]) == 7  # an integer is a row count

    tokenizer = make_tokenizer()
    config = parse_config(
        {"lora": [adapter("a", files.data, files.prompt, val_set_size=0.2)]}, "test"
    )
    trained = prepare_data(config, tokenizer, seed=5)["a"]
    held = prepare_validation(config, tokenizer, seed=5)["a"]
    every = {tuple(r.input_ids) for r in prepare_data(parse_config(
        {"lora": [adapter("a", files.data, files.prompt)]}, "test"), tokenizer)["a"]}  # fmt: skip
    trained_ids = {tuple(r.input_ids) for r in trained}
    held_ids = {tuple(r.input_ids) for r in held}
    assert len(held) == 7 and len(trained) == 28
    assert not trained_ids & held_ids and trained_ids | held_ids == every
    assert held_ids == {tuple(r.input_ids) for r in prepare_validation(config, tokenizer, 5)["a"]}


def test_split_that_leaves_nothing_to_train_names_the_key(files) -> None:
    config = parse_config(
        {"lora": [adapter("a", files.data, files.prompt, val_set_size=35)]}, "test"
    )
    with pytest.raises(DataError, match=r"add\.json: .*'val_set_size' \(35\).*none to train"):
        prepare_data(config, make_tokenizer(), seed=1)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"eval_steps": 0, "val_set_size": 3}, r"key 'eval_steps' must be an integer >= 1"),
        ({"eval_steps": [6, 2], "val_set_size": 3},
         r"key 'eval_steps' must be .*an increasing list of integers >= 1.*, got \[6, 2\]$"),
        ({"eval_steps": [0, 2], "val_set_size": 3}, r"key 'eval_steps' must be .*increasing list"),
        ({"eval_steps": [2, 2], "val_set_size": 3}, r"key 'eval_steps' must be .*increasing list"),
        ({"eval_steps": [], "val_set_size": 3}, r"key 'eval_steps' must be .*increasing list"),
        ({"eval_steps": [2.0], "val_set_size": 3}, r"key 'eval_steps' must be .*increasing list"),
        ({"eval_steps": [2, 6]}, r"key 'eval_steps' needs 'val_data'"),
        ({"early_stopping_patience": 2}, r"key 'early_stopping_patience' needs 'val_data'"),
        ({"save_best": True}, r"key 'save_best' needs 'val_data' or 'val_set_size'"),
        ({"eval_steps": 2}, r"key 'eval_steps' needs 'val_data'"),
        ({"val_set_size": 1.5}, r"key 'val_set_size' must be a row count >= 1 or a fraction"),
        ({"val_set_size": 2, "val_data": "v.json"}, r"keys 'val_data' and 'val_set_size' exclude"),
        ({"val_set_size": 2, "early_stopping_threshold": -1}, r"key 'early_stopping_threshold'"),
    ],
)  # fmt: skip
def test_bad_validation_keys_are_one_line(keys: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^cfg\.json: adapter 'a': " + message):
        parse_config({"lora": [adapter("a", "d.json", "alpaca", **keys)]}, "cfg.json")


# --- the loss ----------------------------------------------------------------------------------


@torch.no_grad()
def peft_mean_loss(peft_model, name: str, rows) -> float:
    peft_model.set_adapter(name)
    total, tokens = 0.0, 0
    for row in rows:
        logits = peft_model(input_ids=torch.tensor([row.input_ids])).logits[0].float()
        labels = torch.tensor(row.labels[1:])
        total += torch.nn.functional.cross_entropy(
            logits[:-1], labels, ignore_index=-100, reduction="sum"
        ).item()
        tokens += int((labels != -100).sum())
    return total / tokens


def test_validation_loss_equals_peft_and_is_one_pass(files, tiny_model_dir, tmp_path) -> None:
    tokenizer = make_tokenizer()
    raw = {
        "cutoff_len": 32,
        "lora": [
            adapter("a", files.data, files.prompt, val_set_size=5, evaluate_batch_size=8),
            adapter("b", files.data, files.prompt, val_data=files.val, r=4, lr=3e-2),
        ],
    }
    factory = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # noqa: E731
    trainer = run_in_memory(factory, tokenizer, raw, tmp_path / "out")
    model, rows = trainer.model, trainer.validation.rows
    calls = []
    original = model.token_losses
    model.token_losses = lambda batch: calls.append(batch) or original(batch)  # type: ignore[method-assign]
    together = validation_losses(model, 3, [("a", rows["a"], 8), ("b", rows["b"], 8)])
    assert len(calls) == 1  # both adapters' rows in one packed pass
    alone = [validation_losses(model, 3, [(n, rows[n], 2)])[0] for n in ("a", "b")]
    assert together == pytest.approx(alone, rel=1e-6)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(base, tmp_path / "out" / "a", adapter_name="a")
    peft.load_adapter(tmp_path / "out" / "b", adapter_name="b")
    peft.eval()
    reference = [peft_mean_loss(peft, n, rows[n]) for n in ("a", "b")]
    assert together == pytest.approx(reference, rel=1e-5)
    # the last validation of each adapter (at its end) is this loss, kept in its record
    record = json.loads((tmp_path / "out" / "a" / "validation.json").read_text())
    assert record["curve"][-1][1] == pytest.approx(reference[0], rel=1e-5)


# --- early stopping ------------------------------------------------------------------------------


def hf_stop_and_best(curve: list[float], patience: int, threshold: float) -> tuple[int, int]:
    """(index of the validation after which transformers' Trainer stops, or len(curve); index
    of its best metric) on ``curve`` of eval_loss values, with its own callback and best-metric
    update, in the order its ``_maybe_log_save_evaluate`` calls them."""
    args = SimpleNamespace(
        metric_for_best_model="eval_loss", greater_is_better=False, save_strategy="steps"
    )
    state, control = TrainerState(), TrainerControl()
    callback = EarlyStoppingCallback(patience, threshold)
    host = SimpleNamespace(args=args, state=state)
    best = -1
    for i, loss in enumerate(curve):
        state.global_step = i
        callback.on_evaluate(args, state, control, metrics={"eval_loss": loss})
        if Trainer._determine_best_metric(host, {"eval_loss": loss}, None):  # type: ignore[arg-type]
            best = i
        if control.should_training_stop:
            return i, best
    return len(curve), best


def our_stop_and_best(curve: list[float], patience: int, threshold: float) -> tuple[int, int]:
    state = ValidationState()
    for i, loss in enumerate(curve):
        state.record(i, loss, threshold)
        if state.bad_evals >= patience:
            return i, int(state.best_step)  # type: ignore[arg-type]
    return len(curve), int(state.best_step)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(
    curve=st.lists(st.sampled_from([3.0, 2.5, 2.4, 2.39, 2.0, 1.99, 1.5, 4.0]), min_size=1,
                   max_size=12),
    patience=st.integers(1, 4),
    threshold=st.sampled_from([0.0, 0.01, 0.2]),
)  # fmt: skip
def test_patience_rule_is_early_stopping_callbacks(curve, patience, threshold) -> None:
    assert our_stop_and_best(curve, patience, threshold) == hf_stop_and_best(
        curve, patience, threshold
    )


CURVE = [3.0, 2.5, 2.0, 2.1, 1.99, 2.05, 2.2, 1.0, 0.5]  # threshold 0.05: 1.99 is no improvement


def test_trainer_stops_at_the_rule_step_and_save_best_holds_that_step(
    files, tiny_model_dir, tmp_path, monkeypatch
) -> None:
    """A constructed validation curve: the adapter stops at the step transformers' callback
    names, and its folder holds exactly the weights of the best step's checkpoint."""
    stop, best = hf_stop_and_best(CURVE, 3, 0.05)
    assert (stop, best) == (5, 4)  # the threshold at work: the best (1.99) resets no patience
    curve = iter(CURVE)
    monkeypatch.setattr(validation_module, "validation_losses", lambda m, p, sets: [next(curve)])
    raw = {
        "cutoff_len": 32, "save_step": 1, "save_total_limit": 50,
        "lora": [adapter("a", files.data, files.prompt, val_set_size=3, eval_steps=1,
                         early_stopping_patience=3, early_stopping_threshold=0.05,
                         save_best=True, num_epochs=2)],
    }  # fmt: skip
    factory = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # noqa: E731
    trainer = run_in_memory(factory, make_tokenizer(), raw, tmp_path / "out")
    run = trainer.runs[0]
    assert run.steps_done == stop + 1 < run.queue.total_steps  # validation i is after step i+1
    folder = tmp_path / "out" / "a"
    record = json.loads((folder / "validation.json").read_text())
    assert record["best_step"] == best + 1 and record["best_val_loss"] == CURVE[best]
    assert record["stopped"] == "early_stopping"
    assert [loss for _, loss in record["curve"]] == CURVE[: stop + 1]
    final = load_file(folder / "adapter_model.safetensors")
    at_best = load_file(folder / f"checkpoint-{best + 1}" / "adapter_model.safetensors")
    at_stop = trainer.weights_copy(run)  # the live weights: those of the step it stopped at
    assert final.keys() == at_best.keys()
    assert all(torch.equal(final[k], at_best[k]) for k in final)
    assert any(not torch.equal(final[k], at_stop[k]) for k in final)
    assert not (folder / "best").exists()


def test_eval_steps_list_validates_at_exactly_those_steps(
    files, tiny_model_dir, tmp_path, monkeypatch
) -> None:
    """``eval_steps`` as a list (a pruner's rungs) validates after those optimizer steps and the
    last one, and nowhere else; an interval beside it keeps its own schedule, in the same passes."""
    passes: list[list[str]] = []
    real = validation_module.validation_losses

    def counted(model, pad_id, sets):
        passes.append([name for name, _, _ in sets])
        return real(model, pad_id, sets)

    monkeypatch.setattr(validation_module, "validation_losses", counted)
    raw = {
        "cutoff_len": 32,
        "lora": [adapter("a", files.data, files.prompt, val_set_size=3, eval_steps=[2, 3, 7]),
                 adapter("b", files.data, files.prompt, val_set_size=3, eval_steps=3)],
    }  # fmt: skip
    factory = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # noqa: E731
    trainer = run_in_memory(factory, make_tokenizer(), raw, tmp_path / "out")
    assert [run.steps_done for run in trainer.runs] == [8, 8]  # 32 rows, batch 4
    steps = {name: [s for s, _ in trainer.validation.states[name].curve] for name in "ab"}
    assert steps == {"a": [2, 3, 7, 8], "b": [3, 6, 8]}
    assert passes == [["a"], ["a", "b"], ["b"], ["a"], ["a", "b"]]  # due together: one pass


def test_validation_state_survives_resume(files, tiny_model_dir, tmp_path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "cutoff_len": 32, "save_step": 2,
        "lora": [
            adapter("a", files.data, files.prompt, val_set_size=5, eval_steps=2,
                    early_stopping_patience=1, save_best=True, num_epochs=3),
            adapter("b", files.data, files.prompt, val_data=files.val, eval_steps=[1, 4, 7],
                    lr=1e-3),
        ],
    }))  # fmt: skip
    clean, cut = train_killed_then_resumed(config, tiny_model_dir, tmp_path, 5)
    b_curve = json.loads((cut / "b" / "validation.json").read_text())["curve"]
    assert [step for step, _ in b_curve] == [1, 4, 7, 9]  # the listed steps and its last (9)
    for name in ("a", "b"):
        ours = json.loads((cut / name / "validation.json").read_text())
        theirs = json.loads((clean / name / "validation.json").read_text())
        assert ours["best_step"] == theirs["best_step"] and ours["stopped"] == theirs["stopped"]
        np.testing.assert_allclose(ours["curve"], theirs["curve"], rtol=1e-5)
        a = load_file(cut / name / "adapter_model.safetensors")
        b = load_file(clean / name / "adapter_model.safetensors")
        assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_an_early_stopped_adapter_frees_its_place_at_once(
    files, tiny_model_dir, tmp_path, monkeypatch
) -> None:
    """Two places, three adapters: when ``a`` early-stops, ``c`` takes its place in the next
    step (not when ``b`` finishes)."""
    from mlora.model.multi_lora import MultiLoraModel
    from mlora.training.trainer import Trainer

    curve = iter([3.0, 3.1, 3.2, 3.3])  # patience 2: a stops after its third step
    monkeypatch.setattr(validation_module, "validation_losses", lambda m, p, sets: [next(curve)])
    raw = {
        "cutoff_len": 32, "train_lora_candidate_num": 2,
        "lora": [adapter("a", files.data, files.prompt, val_set_size=3, eval_steps=1,
                         early_stopping_patience=2, num_epochs=3),
                 adapter("b", files.data, files.prompt, num_epochs=2),
                 adapter("c", files.data, files.prompt)],
    }  # fmt: skip
    config = parse_config(raw, "test")
    tokenizer = make_tokenizer()
    stepped: list[tuple[int, list[str]]] = []
    trainer = Trainer(
        MultiLoraModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir)), tokenizer, config,
        prepare_data(config, tokenizer, 7), tmp_path / "out", 7,
        step_hooks=[lambda boundary, control: stepped.append(
            (boundary.global_step, [r.name for r in boundary.stepped]))],
    )  # fmt: skip
    trainer.train()
    first = {name: min(g for g, names in stepped if name in names) for name in "abc"}
    last_a = max(g for g, names in stepped if "a" in names)
    assert trainer.validation.states["a"].stopped == "early_stopping"
    assert last_a == 3 and first["c"] == last_a + 1
    b_steps = [g for g, names in stepped if "b" in names]
    assert first["c"] < max(b_steps)  # b was still training: c took a's place
