"""A step split into several forward passes (``pass_tokens``) trains what one pass trains.

The property is checked against adapters trained alone (``tests/test_concurrent.py`` runs the
same comparison for one pass), with dropout on, micro-batches, packing and MixLoRA router
jitter; here every adapter gets a pass of its own, and a middle budget pairs them up.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mlora.batching.passes import (
    AUTO_CPU_PASS_TOKENS,
    forward_passes,
    pass_size,
    resolve_pass_tokens,
)
from mlora.config.schema import parse_config
from mlora.core.errors import ConfigError
from mlora.data.rows import TokenizedRow
from mlora.training.trainer import Trainer
from tests.conftest import make_model, make_tokenizer
from tests.helpers import run_in_memory
from tests.test_concurrent import adapters, assert_each_trains_as_alone


def test_one_pass_when_unbounded_or_within_budget() -> None:
    assert forward_passes([300, 200, 100], 0) == [[0, 1, 2]]
    assert forward_passes([300, 200, 100], 600) == [[0, 1, 2]]
    assert forward_passes([], 100) == []


def test_passes_are_few_balanced_and_keep_step_order() -> None:
    sizes = [500, 520, 610, 570]  # 2200 tokens
    groups = forward_passes(sizes, 2048)
    assert groups == [[0, 1], [2, 3]]  # two passes of about 1100, not 2048 + 152
    assert len(forward_passes(sizes, 1024)) == 3  # the fewest within 1024 each
    for budget in (1, 100, 600, 1100, 1500, 2199):
        groups = forward_passes(sizes, budget)
        assert [i for g in groups for i in g] == list(range(len(sizes)))
        assert all(g for g in groups)
        for group in groups:  # within budget, unless one entry alone is larger
            assert len(group) == 1 or sum(sizes[i] for i in group) <= budget


def test_an_entry_larger_than_the_budget_gets_its_own_pass() -> None:
    assert forward_passes([50, 900, 40], 100) == [[0], [1], [2]]


def test_pass_size_counts_padding_outside_a_stream() -> None:
    rows = [TokenizedRow([1] * n, [1] * n) for n in (3, 7)]
    assert pass_size(rows, "stream") == 10
    assert pass_size(rows, "bins") == 14
    assert pass_size(rows, "padded") == 14
    assert pass_size([], "stream") == 0


def test_auto_budget_by_device() -> None:
    assert resolve_pass_tokens("auto", "cpu") == AUTO_CPU_PASS_TOKENS
    assert resolve_pass_tokens("auto", "cuda") == 0
    assert resolve_pass_tokens(512, "cuda") == 512


@pytest.mark.parametrize("value", [-1, 1.5, "big", True])
def test_bad_budget_is_one_line_naming_the_key(value) -> None:
    with pytest.raises(ConfigError, match="pass_tokens") as error:
        parse_config({"pass_tokens": value, "lora": [{"name": "a", "data": "a.json"}]}, "x.json")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("budget", [1, 100], ids=["a-pass-each", "pairs"])
def test_split_passes_equal_isolated_training(
    tmp_path: Path, budget: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    passes: list[int] = []  # adapters in each pass
    forward_backward = Trainer._forward_backward

    def counted(self: Trainer, step, shards):
        passes.append(len(step))
        return forward_backward(self, step, shards)

    monkeypatch.setattr(Trainer, "_forward_backward", counted)
    tokenizer = make_tokenizer()
    specs = adapters(tmp_path)

    def factory():
        return make_model(vocab_size=len(tokenizer))

    shared = {"cutoff_len": 64, "gradient_checkpoint": "none"}
    together = run_in_memory(
        factory, tokenizer, {**shared, "pass_tokens": budget, "lora": specs}, tmp_path / "t"
    )
    assert together.pass_tokens == budget
    assert max(passes) == 1 if budget == 1 else 1 < max(passes) < len(specs)
    assert_each_trains_as_alone(together, specs, factory, tokenizer, shared, tmp_path / "a")
