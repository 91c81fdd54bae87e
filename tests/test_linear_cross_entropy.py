"""The chunked head loss equals full logits + ``F.cross_entropy`` in loss and every gradient.

Reference: the dense computation written out with autograd (``x @ W.T + b``, each segment's
``u @ B.T`` added, ``F.cross_entropy(reduction="none")``), and, for a whole run, the same
training with ``loss_chunk_mb: 0`` (today's full logits) with SGD and dropout on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mlora.config.schema import parse_config
from mlora.model import multi_lora
from mlora.model.multi_lora import MultiLoraModel
from mlora.ops.linear_cross_entropy import (
    DEFAULT_CHUNK_MB,
    LowRankTerm,
    _chunks,
    chunk_rows,
    linear_cross_entropy,
)
from mlora.training.trainer import Trainer, prepare_data
from tests.conftest import make_model, make_tokenizer
from tests.helpers import (
    adapter_tensors,
    addition_rows,
    max_relative_difference,
    reverse_rows,
    write_json,
    write_template,
)

N, H, V = 37, 16, 50
SPANS = [(0, 9), (12, 30), (30, 34)]  # a gap at 9..12 and a tail 34..37 with no adapter
RANKS = (2, 4, 3)


def _inputs(seed: int, bias: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[3, 17, 36]] = -100  # rows without a label
    return {
        "hidden": torch.randn(N, H, generator=g).requires_grad_(),
        "weight": torch.randn(V, H, generator=g).requires_grad_(),
        "bias": torch.randn(V, generator=g).requires_grad_() if bias else None,
        "us": [torch.randn(e - s, r, generator=g).requires_grad_()
               for (s, e), r in zip(SPANS, RANKS, strict=True)],
        "bs": [torch.randn(V, r, generator=g).requires_grad_() for r in RANKS],
        "targets": targets,
        "spans": SPANS,
    }  # fmt: skip


def _dense(inputs: dict, softcap: float | None) -> torch.Tensor:
    logits = F.linear(inputs["hidden"], inputs["weight"], inputs["bias"])
    deltas = torch.zeros_like(logits)
    for (start, end), u, b in zip(inputs["spans"], inputs["us"], inputs["bs"], strict=True):
        deltas = deltas.index_add(0, torch.arange(start, end), u @ b.T)
    logits = logits + deltas
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, inputs["targets"], reduction="none")


def _chunked(inputs: dict, rows: int, softcap: float | None) -> torch.Tensor:
    terms = [
        LowRankTerm(s, e, u, b)
        for (s, e), u, b in zip(inputs["spans"], inputs["us"], inputs["bs"], strict=True)
    ]
    return linear_cross_entropy(
        inputs["hidden"], inputs["weight"], inputs["targets"], rows, inputs["bias"], terms, softcap
    )


def _grads(inputs: dict, losses: torch.Tensor) -> list[torch.Tensor]:
    weights = torch.linspace(0.5, 2.0, N)  # per-token grad_output, as a per-segment mean gives
    (losses * weights).sum().backward()
    leaves = [inputs["hidden"], inputs["weight"], inputs["bias"], *inputs["us"], *inputs["bs"]]
    leaves = [t for t in leaves if t is not None and t.requires_grad]
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    return grads


@pytest.mark.parametrize("rows", [1, 5, 8, 37, 100])  # 8 leaves a ragged last chunk of 5
@pytest.mark.parametrize(("bias", "softcap"), [(False, None), (True, 30.0)])
def test_chunks_equal_full_logits(rows: int, bias: bool, softcap: float | None) -> None:
    inputs = _inputs(0, bias)
    want = _dense(inputs, softcap)
    want_grads = _grads(inputs, want)
    got = _chunked(inputs, rows, softcap)
    got_grads = _grads(inputs, got)
    assert _relative(got, want) <= 1e-6
    assert got[[3, 17, 36]].eq(0).all()
    for g, w in zip(got_grads, want_grads, strict=True):  # hidden, weight, bias, u, B
        assert _relative(g, w) <= 1e-6


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| over max |want|: fp32 rounding of values of any magnitude."""
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("rows", [1, 8, 37])
@pytest.mark.parametrize(("bias", "softcap"), [(False, None), (True, 30.0)])
def test_frozen_plain_head_forms_the_gradient_in_forward(
    rows: int, bias: bool, softcap: float | None
) -> None:
    """No LoRA terms, frozen weight and bias: the path that forms the hidden gradient in forward."""
    inputs = _inputs(4, bias)
    inputs["us"], inputs["bs"], inputs["spans"] = [], [], []
    inputs["weight"].requires_grad_(False)
    if bias:
        inputs["bias"].requires_grad_(False)
    want = _dense(inputs, softcap)
    (want_grad,) = _grads(inputs, want)
    got = _chunked(inputs, rows, softcap)
    (got_grad,) = _grads(inputs, got)
    assert _relative(got, want) <= 1e-6
    assert _relative(got_grad, want_grad) <= 1e-6


def test_frozen_weight_gets_no_gradient_and_no_grad_mode_works() -> None:
    inputs = _inputs(1, False)
    inputs["weight"].requires_grad_(False)  # the usual case: a frozen lm_head
    (_chunked(inputs, 4, None) * 0.5).sum().backward()
    assert inputs["weight"].grad is None and inputs["hidden"].grad is not None
    with torch.no_grad():
        assert _relative(_chunked(inputs, 4, None), _dense(inputs, None)) <= 1e-6


def test_chunk_rows_follow_the_budget() -> None:
    assert chunk_rows(32, 49152) == 170  # 32 MiB of fp32 rows of 49152 logits
    assert chunk_rows(1e-9, 49152) == 1


@pytest.mark.parametrize(("n", "rows"), [(37, 8), (1100, 340), (5, 100), (8, 8), (0, 3)])
def test_chunks_split_rows_evenly_within_the_budget(n: int, rows: int) -> None:
    """As few chunks as the budget allows, sizes within one row of each other (no ragged tail
    of a few rows, where the head's matmul runs slowly), in order, covering every row."""
    chunks = _chunks(n, rows)
    sizes = [stop - start for start, stop in chunks]
    assert len(chunks) == -(-n // rows)
    starts, stops = [start for start, _ in chunks], [stop for _, stop in chunks]
    assert starts == [0, *stops[:-1]][: len(chunks)]
    assert sum(sizes) == n and all(0 < size <= rows for size in sizes)
    assert not sizes or max(sizes) - min(sizes) <= 1


def test_half_precision_head_equals_its_full_logits() -> None:
    """A bf16 head: logits in bf16 upcast to fp32 for the softmax, as the unchunked head; the
    chunked op then computes what the full logits' cross-entropy does, to bf16 rounding of the
    gradient's product with the weight."""
    inputs = _inputs(5, False)
    hidden = inputs["hidden"].detach().bfloat16().requires_grad_()
    weight = inputs["weight"].detach().bfloat16()
    targets = inputs["targets"]
    want = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")
    (want_grad,) = torch.autograd.grad(want.sum(), hidden)
    got = linear_cross_entropy(hidden, weight, targets, 8)
    (got_grad,) = torch.autograd.grad(got.sum(), hidden)
    assert got.dtype == torch.float32 and _relative(got, want) <= 1e-6
    assert _relative(got_grad.float(), want_grad.float()) <= 2**-8  # bf16: 8 bits of mantissa


def _config(tmp_path: Path, chunk_mb: float) -> dict:
    template = write_template(tmp_path)
    add = write_json(tmp_path / "add.json", addition_rows(12))
    rev = write_json(tmp_path / "rev.json", reverse_rows(12))
    common = {
        "prompt": template,
        "lora_dropout": 0.2,
        "optim": "sgd",
        "lr": 0.5,
        "num_epochs": 1,
        "batch_size": 4,
    }
    return {"cutoff_len": 48, "loss_chunk_mb": chunk_mb, "lora": [
        {"name": "head", "data": add, "r": 4, "target_modules": ["v_proj", "lm_head"], **common},
        {"name": "head2", "data": rev, "r": 2, "target_modules": ["lm_head"], **common},
        {"name": "body", "data": rev, "r": 4, "target_modules": ["q_proj", "down_proj"], **common},
    ]}  # fmt: skip


def test_config_default_budget_is_the_ops(tmp_path: Path) -> None:
    """The config key's default and the model's (a notebook's ``MultiLoraModel``) are one budget."""
    config = _config(tmp_path, 0)
    del config["loss_chunk_mb"]
    assert parse_config(config, "test-config").loss_chunk_mb == DEFAULT_CHUNK_MB
    assert MultiLoraModel(make_model()).loss_chunk_mb == DEFAULT_CHUNK_MB


def _updates(tmp_path: Path, chunk_mb: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Each adapter tensor's change over the run: SGD's summed learning-rate-scaled gradients."""
    tokenizer = make_tokenizer()
    config = parse_config(_config(tmp_path, chunk_mb), "test-config")
    data = prepare_data(config, tokenizer, 7)
    model = MultiLoraModel(make_model(vocab_size=len(tokenizer)))
    trainer = Trainer(model, tokenizer, config, data, tmp_path / f"out{chunk_mb}", 7, "tiny")
    trainer.model.to(dtype)  # same Parameter objects: the optimizers keep them
    names = ("head", "head2", "body")
    before = {f"{n}.{k}": t for n in names for k, t in adapter_tensors(trainer, n).items()}
    trainer.train()
    after = {f"{n}.{k}": t for n in names for k, t in adapter_tensors(trainer, n).items()}
    assert trainer.model.loss_chunk_mb == chunk_mb
    return {k: after[k] - before[k] for k in before}


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_training_with_chunks_equals_full_logits(
    tmp_path: Path, dtype: torch.dtype, tolerance: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lm_head as a LoRA target of two adapters, dropout on, 3 rows per chunk (vocab 99), 3
    SGD steps: fp64 shows the same math; fp32 differs by rounding grown over the steps."""
    chunked_steps: list[bool] = []  # per pass: whether the chunked op ran (not the fallback)
    original = multi_lora.chunked_head_losses

    def counted(*args, **kwargs):
        losses = original(*args, **kwargs)
        chunked_steps.append(losses is not None)
        return losses

    monkeypatch.setattr(multi_lora, "chunked_head_losses", counted)
    full = _updates(tmp_path, 0, dtype)
    assert chunked_steps and not any(chunked_steps)
    chunked_steps.clear()
    chunked = _updates(tmp_path, 3 * 4 * 99 / 2**20, dtype)
    assert chunked_steps and all(chunked_steps)
    assert any("lm_head" in k and "lora_A" in k and v.abs().max() > 0 for k, v in full.items())
    assert max_relative_difference(chunked, full) <= tolerance


@pytest.mark.gpu
def test_liger_kernel_equals_the_plain_op_on_cuda() -> None:
    pytest.importorskip("liger_kernel")
    from mlora.ops.linear_cross_entropy import liger_linear_cross_entropy

    inputs = {k: v for k, v in _inputs(2, True).items() if k not in ("us", "bs")}
    cuda = {k: v.detach().cuda().requires_grad_(k != "targets") for k, v in inputs.items()}
    losses = liger_linear_cross_entropy(
        cuda["hidden"], cuda["weight"], cuda["targets"], cuda["bias"]
    )
    if losses is None:
        pytest.skip("this liger-kernel takes no per-token gradients")
    weights = torch.linspace(0.5, 2.0, N, device="cuda")
    (losses * weights).sum().backward()
    plain = {k: v.detach().cuda().requires_grad_(k != "targets") for k, v in inputs.items()}
    want = linear_cross_entropy(
        plain["hidden"], plain["weight"], plain["targets"], 8, plain["bias"]
    )
    (want * weights).sum().backward()
    assert _relative(losses, want) <= 1e-5
    for key in ("hidden", "weight", "bias"):
        assert _relative(cuda[key].grad, plain[key].grad) <= 1e-5, key


@pytest.mark.parametrize("use_dora", [False, True])
def test_model_token_losses_chunked_or_falling_back(use_dora: bool) -> None:
    """Plain LoRA on lm_head takes the chunked op; DoRA there falls back to full logits; both
    equal ``loss_chunk_mb: 0`` (eval mode, so the two passes draw no dropout)."""
    from mlora.adapters.spec import LoraSpec
    from mlora.batching.collate import collate
    from mlora.data.rows import IGNORE_INDEX, TokenizedRow
    from mlora.model.head_loss import chunked_head_losses

    model = MultiLoraModel(make_model(vocab_size=99))
    for name, dora in (("plain", False), ("other", use_dora)):
        spec = LoraSpec(r=2, scaling=2.0, target_modules=("v_proj", "lm_head"), use_dora=dora)
        model.add_adapter(name, spec)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    g = torch.Generator().manual_seed(3)
    rows = [
        TokenizedRow(ids, [IGNORE_INDEX] * 3 + ids[3:])
        for ids in (torch.randint(4, 99, (n,), generator=g).tolist() for n in (9, 6, 11, 7))
    ]
    batch = collate([("plain", rows[:2]), ("other", rows[2:])], pad_token_id=0)
    model.eval()
    model.loss_chunk_mb = 0
    full = model.token_losses(batch)
    model.loss_chunk_mb = 3 * 4 * 99 / 2**20  # 3 rows per chunk
    chunked = model.token_losses(batch)
    assert _relative(chunked, full) <= 1e-6
    head = model.model.get_output_embeddings()
    hidden = torch.randn(batch.targets.shape[0], 64)
    with model.context.use(batch.head_layout, token_real_index=batch.head_real_index):
        used = chunked_head_losses(head, hidden, batch.targets, 1.0)
    assert (used is None) == use_dora
