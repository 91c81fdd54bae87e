"""One stream of rows with per-row attention: rows alone are the reference.

``mlora.ops.varlen_attention`` lays a step's rows end to end with no padding and runs transformers'
sdpa on each row's slice. Each row's hidden states must equal the row run alone; without the
row ranges the function is plain sdpa (generation and padded batches on the same model).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from mlora.batching.collate import collate
from mlora.batching.packing import resolve_packing, use_stream
from mlora.config.schema import parse_config
from mlora.core.errors import ConfigError, MloraError
from mlora.data.rows import IGNORE_INDEX, TokenizedRow
from mlora.model.multi_lora import MultiLoraModel
from mlora.ops import varlen_attention as varlen_attention_module
from mlora.ops.varlen_attention import SEQUENCES_KWARG, VARLEN_ATTENTION
from tests.conftest import make_model

LENGTHS = [5, 9, 3, 7]


def rows_alone_and_streamed(model: torch.nn.Module, with_ranges: bool) -> tuple[torch.Tensor, ...]:
    """Hidden states of random rows run one by one (plain sdpa) and as one stream."""
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(4, 90, (n,), generator=gen) for n in LENGTHS]
    with torch.no_grad():
        alone = torch.cat([model.model(input_ids=r.view(1, -1)).last_hidden_state[0] for r in rows])
        ends = torch.tensor(LENGTHS).cumsum(0).tolist()
        ranges = tuple((end - n, end) for n, end in zip(LENGTHS, ends, strict=True))
        extra = {SEQUENCES_KWARG: ranges}
        stream = model.model(
            input_ids=torch.cat(rows).view(1, -1),
            position_ids=torch.cat([torch.arange(n) for n in LENGTHS]).view(1, -1),
            attention_mask=torch.ones(1, sum(LENGTHS), dtype=torch.long),
            **(extra if with_ranges else {}),
        ).last_hidden_state[0]
    return alone, stream


def test_each_row_of_a_stream_equals_the_row_alone() -> None:
    model = make_model(vocab_size=96).eval()
    model.set_attn_implementation(VARLEN_ATTENTION)
    alone, stream = rows_alone_and_streamed(model, with_ranges=True)
    torch.testing.assert_close(stream, alone, rtol=1e-5, atol=1e-5)
    # control: without the ranges the stream is one causal sequence, rows see earlier rows
    _, mixed = rows_alone_and_streamed(model, with_ranges=False)
    assert (mixed[LENGTHS[0] :] - alone[LENGTHS[0] :]).abs().max() > 1e-2


def test_without_ranges_it_is_sdpa_with_the_padding_mask() -> None:
    """Padded batches (evaluation, generation) on a stream model: the same as under sdpa."""
    reference = make_model(vocab_size=96).eval()
    model = make_model(vocab_size=96).eval()
    model.set_attn_implementation(VARLEN_ATTENTION)
    ids = torch.randint(4, 90, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)


def test_use_stream_only_switches_sdpa_models() -> None:
    model = make_model(vocab_size=96)
    assert use_stream(model) and model.config._attn_implementation == VARLEN_ATTENTION
    eager = make_model(vocab_size=96)
    eager.set_attn_implementation("eager")
    assert not use_stream(eager) and eager.config._attn_implementation == "eager"


def test_a_stream_batch_on_a_model_without_per_row_attention_is_refused() -> None:
    """sdpa would run the stream as one sequence: rows would silently attend to each other."""
    model = MultiLoraModel(make_model(vocab_size=96))
    row = TokenizedRow([5, 6, 7, 8], [IGNORE_INDEX, 6, 7, 8])
    batch = collate([(None, [row, row])], 0, stream=True)
    with pytest.raises(ValueError, match="per-row attention"):
        model.token_losses(batch)


def test_sliding_window_layers_keep_their_window_inside_each_row() -> None:
    """Mistral with a window shorter than the rows: each row's band, as transformers' mask."""
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=3,
    )  # fmt: skip
    config.initializer_range = 0.2  # larger weights so a wrong window would show
    model = transformers.MistralForCausalLM(config).eval()
    assert use_stream(model)
    alone, stream = rows_alone_and_streamed(model, with_ranges=True)
    torch.testing.assert_close(stream, alone, rtol=1e-5, atol=1e-5)
    # control: the same model without a window gives other states on rows longer than 3
    model.config.sliding_window = None
    no_window, _ = rows_alone_and_streamed(model, with_ranges=True)
    assert (no_window - alone).abs().max() > 1e-3


def test_the_packing_key_picks_the_form() -> None:
    """true / "auto": a stream where possible; "bins" and false leave attention as it was;
    "stream" on a model that cannot attend per row is one clear error."""
    model = make_model(vocab_size=96)
    assert resolve_packing(model, "auto") and model.config._attn_implementation == VARLEN_ATTENTION
    assert resolve_packing(model, "bins") and model.config._attn_implementation == "sdpa"
    assert resolve_packing(model, True) and model.config._attn_implementation == VARLEN_ATTENTION
    assert not resolve_packing(model, False) and model.config._attn_implementation == "sdpa"
    eager = make_model(vocab_size=96)
    eager.set_attn_implementation("eager")
    assert resolve_packing(eager, True) and eager.config._attn_implementation == "eager"  # bins
    with pytest.raises(MloraError, match=r"\"stream\" is not possible.*'eager'"):
        resolve_packing(eager, "stream")
    adapters = [{"name": "a", "data": "x.json"}]
    for value in ("stream", "bins", "auto", True, False):
        assert parse_config({"packing": value, "lora": adapters}).packing == value
    with pytest.raises(ConfigError, match="packing"):
        parse_config({"packing": "always", "lora": adapters})


def test_a_stream_forward_builds_no_attention_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """No mask means nothing to read back (sdpa's mask code reads the padding mask to decide
    whether it may skip it: a host sync on a GPU); padded batches still get sdpa's mask."""
    calls = []
    monkeypatch.setattr(varlen_attention_module, "sdpa_mask", lambda *a, **k: calls.append(1))
    model = MultiLoraModel(make_model(vocab_size=96))
    with model.context.use(None):
        assert use_stream(model.model)
    calls.clear()
    row = TokenizedRow([5, 6, 7, 8], [IGNORE_INDEX, 6, 7, 8])
    model.token_losses(collate([(None, [row, row])], 0, stream=True))
    assert calls == []
    model.token_losses(collate([(None, [row, row])], 0, packed=False))
    assert calls  # the control: a padded batch asks for sdpa's mask
