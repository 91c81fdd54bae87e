"""The packing probe shares its reference between its two probes and decides as before.

``resolve_packing("auto")`` runs the probe rows alone once and reuses those states for the
stream probe (6 backbone forwards instead of 10). The decision is unchanged because the rows
alone give bit-identical states under sdpa and under per-row attention without row boundaries
(checked here for three families with different masks: plain causal, sliding window, hybrid
layers; every sdpa family of ``tests.test_architectures`` was checked once by hand), so each
probe compares against the very states it would have computed itself; the decisions are also
compared with fresh probes.
"""

from __future__ import annotations

import pytest
import torch

from mlora.batching.packing import (
    ProbeReference,
    packing_problem,
    probe_rows,
    resolve_packing,
    stream_problem_after_switch,
)
from mlora.ops.varlen_attention import VARLEN_ATTENTION
from tests.conftest import make_model
from tests.test_architectures import UNPACKABLE, build, build_unpackable


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny forwards: one thread keeps them at milliseconds on a busy machine (two threads
    wait on each other there for most of each op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3"])
def test_rows_alone_are_bit_identical_under_either_attention(family: str) -> None:
    base, _ = build(family)
    base.eval()
    if base.config._attn_implementation != "sdpa":
        pytest.skip(f"{family} runs {base.config._attn_implementation}: no stream probe")
    rows = probe_rows(base)
    with torch.no_grad():
        sdpa = ProbeReference().alone(base.base_model, rows, "cpu")
        base.set_attn_implementation(VARLEN_ATTENTION)
        varlen = ProbeReference().alone(base.base_model, rows, "cpu")
    assert torch.equal(sdpa, varlen)


def counted_forwards(hf_model: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    hf_model.base_model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_auto_runs_six_forwards_and_decides_as_fresh_probes() -> None:
    model = make_model().eval()
    fresh = (packing_problem(model), stream_problem_after_switch(model))
    model.set_attn_implementation("sdpa")
    calls = counted_forwards(model)
    assert resolve_packing(model, "auto") is True
    assert len(calls) == 6 and fresh == (None, None)
    assert model.config._attn_implementation == VARLEN_ATTENTION


@pytest.mark.parametrize("family", list(UNPACKABLE))
def test_a_model_that_mixes_rows_is_still_refused(family: str, caplog) -> None:
    hf_model = build_unpackable(family)
    fresh = packing_problem(hf_model)
    assert fresh is not None
    with caplog.at_level("INFO", logger="mlora"):
        assert resolve_packing(hf_model, "auto") is False
    assert fresh in caplog.text
