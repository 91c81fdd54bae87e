"""MixLoRA: routed FFN experts against a dense reference, training, persistence, CLI errors.

The reference for the routed forward is the straightforward computation: every expert's full
FFN on every token (plain matrix products, no index dispatch), weighted by the router's kept
probabilities, with the strategy's selection rule written as a per-token Python loop.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mlora.adapters.mixlora import MixLoraFeedForward
from mlora.adapters.mixlora.spec import RouterSpec, build_mixlora_spec
from mlora.adapters.spec import LoraSpec
from mlora.batching.layout import BatchLayout
from mlora.config.schema import parse_config
from mlora.core.errors import MloraError
from mlora.inference.trained import load_trained
from mlora.model.multi_lora import MultiLoraModel
from mlora.persistence.adapter_files import read_adapter
from mlora.training.trainer import spec_from_config
from tests.conftest import make_model, make_tokenizer
from tests.helpers import (
    adapter_tensors,
    addition_rows,
    max_relative_difference,
    reverse_rows,
    run_in_memory,
    train_killed_then_resumed,
    write_json,
    write_template,
)
from tests.references import keep_multipliers, twin_generator

ROOT = Path(__file__).resolve().parents[1]
FFN = ("gate_proj", "up_proj", "down_proj")
STRATEGIES = ("mixlora", "mixlora-dynamic", "mixlora-switch")


# --- the dense reference ---------------------------------------------------------------------


def lora_linear(weight: torch.Tensor, adapter, x: torch.Tensor) -> torch.Tensor:
    """x @ (W + s B A)^T, DoRA-rescaled when the adapter has a magnitude (norm detached)."""
    delta = adapter.lora_B.weight @ adapter.lora_A.weight * adapter.scaling  # (out, in)
    out = x @ weight.T + x @ delta.T
    if adapter.magnitude is None:
        return out
    norm = torch.linalg.norm(weight + delta, dim=1).detach()
    return out * (adapter.magnitude.weight / norm)


def ffn_forward(ffn: MixLoraFeedForward, proj, x: torch.Tensor, act) -> torch.Tensor:
    """The MLP's formula with ``proj(name, input)`` for each projection."""
    if ffn.projections == FFN:
        return proj("down_proj", act(proj("gate_proj", x)) * proj("up_proj", x))
    return proj("fc2", act(proj("fc1", x)))


def plain_linear(layer, adapter, x: torch.Tensor) -> torch.Tensor:
    out = x @ layer.weight.T if adapter is None else lora_linear(layer.weight, adapter, x)
    return out if layer.bias is None else out + layer.bias


def dense_expert(ffn: MixLoraFeedForward, moe, expert: int | None, x: torch.Tensor) -> torch.Tensor:
    def proj(name: str, inp: torch.Tensor) -> torch.Tensor:
        adapter = None if expert is None else moe.expert(name, expert)
        return plain_linear(ffn.linear(name), adapter, inp)

    return ffn_forward(ffn, proj, x, moe.activation)


def kept_experts(probs: torch.Tensor, spec: RouterSpec, rows: int, real, training: bool):
    """(N, E) bool mask of kept experts, by a per-token loop over the strategy's rule (padding:
    none)."""
    n, e = probs.shape
    keep = torch.zeros(n, e, dtype=torch.bool)
    per_row = n // rows
    used = [[0] * e for _ in range(rows)]
    for t in range(n):
        order = sorted(range(e), key=lambda i: -probs[t, i].item())
        if not real[t]:  # padding is routed to no expert: it gets the frozen FFN
            continue
        if spec.strategy == "mixlora":
            chosen = order[: spec.top_k]
        elif spec.strategy == "mixlora-dynamic":
            chosen, total = [], 0.0
            for i in order:
                chosen.append(i)
                total += probs[t, i].item()
                if total >= spec.top_p:
                    break
        else:
            best = order[0]
            chosen = [best]
            if training and real[t]:
                used[t // per_row][best] += 1
                if used[t // per_row][best] > spec.expert_capacity:
                    chosen = []
        keep[t, chosen] = True
    return keep


def dense_moe(ffn: MixLoraFeedForward, moe, x: torch.Tensor, real, rows: int, training: bool):
    """(N, H): every expert on every token, weighted by the kept router probabilities."""
    spec = moe.router_spec
    logits = x.float() @ moe.router.weight.T
    if spec.strategy == "mixlora-dynamic" and spec.temperature > 0:
        logits = logits / spec.temperature
    probs = logits.softmax(-1)
    keep = kept_experts(probs.detach(), spec, rows, real, training)
    weights = probs * keep
    if spec.strategy == "mixlora":
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)  # padding: 0 / 0
    out = sum(weights[:, e : e + 1] * dense_expert(ffn, moe, e, x) for e in range(spec.num_experts))
    unrouted = ~keep.any(-1)  # switch overflow: the frozen FFN
    return out + unrouted[:, None] * dense_expert(ffn, moe, None, x)


# --- fixtures ----------------------------------------------------------------------------------


def mixlora(strategy: str, use_dora: bool = False, ffn=FFN, **router) -> object:
    settings = {"num_experts": 4, "top_k": 2, "top_p": 0.7, "expert_capacity": 3, **router}
    return build_mixlora_spec(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=("q_proj", *ffn),
        init="original",
        use_dora=use_dora,
        use_rslora=False,
        router=RouterSpec(strategy=strategy, z_loss_coef=0.01, aux_loss_coef=0.01, **settings),
        act_fn=None,
        expert_lora={"r": 3, "lora_alpha": 6} if use_dora else None,
    )


def make_phi():
    """A tiny Phi: fc1/fc2 MLP with biases and gelu_new."""
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    config = PhiConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, resid_pdrop=0.0, embd_pdrop=0.0,
    )  # fmt: skip
    return PhiForCausalLM(config).eval()


def randomise(model: MultiLoraModel, name: str, seed: int) -> None:
    """Give every LoRA B (zero at init) and the router values, so every path is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in model.adapter_modules(name):
            for pname, p in module.named_parameters():
                if "lora_B" in pname or "router" in pname:
                    p.copy_(
                        torch.randn(p.shape, generator=gen) * (1.0 if "router" in pname else 0.1)
                    )


CASES = [("llama", s, False) for s in STRATEGIES] + [
    ("llama", "mixlora", True),
    ("phi", "mixlora", False),
    ("phi", "mixlora-switch", True),
]


def segment_real_index(mask: torch.Tensor, row_segments: list[int]) -> torch.Tensor:
    """(rows*T,) each token's index among the real tokens of its segment (rows end to end),
    written independently of ``mlora.batching.collate``: a running count restarted per segment."""
    index, count, previous = [], 0, None
    for row, segment in zip(mask, row_segments, strict=True):
        if segment != previous:
            count, previous = 0, segment
        for real in row.tolist():
            index.append(count if real else 0)
            count += int(real)
    return torch.tensor(index)


@pytest.mark.parametrize("canonical", [False, True], ids=["mask-only", "canonical"])
@pytest.mark.parametrize(("family", "strategy", "use_dora"), CASES)
def test_routed_forward_equals_dense_reference(
    family: str, strategy: str, use_dora: bool, canonical: bool, monkeypatch
) -> None:
    """``canonical``: the context also gives each token's canonical index (as a collated batch
    does); without it the real tokens are gathered in segment order (a host read). Either way
    they are dispatched as n*k pairs; ``mixlora-dynamic`` as E pairs per token with the unused
    ones run (canonical, as on accelerators) or dropped after a host read (mask-only)."""
    ffn_names = FFN if family == "llama" else ("fc1", "fc2")
    model = MultiLoraModel(make_model() if family == "llama" else make_phi())
    model.add_adapter("moe", mixlora(strategy, use_dora, ffn_names))
    # after the FFN became a MixLoraFeedForward: its first and last projections get wrapped
    plain_targets = ("q_proj", ffn_names[0], ffn_names[-1])
    model.add_adapter("plain", LoraSpec(4, 2.0, 0.0, plain_targets))
    randomise(model, "plain", 1)
    randomise(model, "moe", 2)
    model.train()
    ffn = model.model.model.layers[0].mlp
    assert isinstance(ffn, MixLoraFeedForward)
    assert ffn.projections == ffn_names
    moe = ffn.moes["moe"]
    moe.drop_unused_slots = not canonical  # mixlora-dynamic: both ways
    torch.manual_seed(0)
    x = torch.randn(6, 7, 64, requires_grad=True)  # rows: plain plain moe moe moe base
    layout = BatchLayout.from_row_adapters(["plain", "plain", "moe", "moe", "moe", None])
    mask = torch.ones(6, 7, dtype=torch.bool)
    mask[3, 5:] = False  # padding inside the MixLoRA segment
    probe = torch.randn(6, 7, 64) * mask[..., None]  # padding outputs are unspecified
    params = [p for _, m in model.adapter_modules("moe") for p in m.parameters()]
    params += [p for _, m in model.adapter_modules("plain") for p in m.parameters()]

    rows, real_index = None, None
    if canonical:  # a token layout with real counts, rows and canonical indices, as collate's
        layout = BatchLayout.from_lengths([("plain", 14), ("moe", 21), (None, 7)], [14, 19, 7])
        rows = torch.where(mask, torch.arange(6)[:, None], -1).reshape(-1)
        real_index = segment_real_index(mask, [0, 0, 1, 1, 1, 2])
    with model.context.use(layout, mask.reshape(-1), rows, real_index):
        model.context.aux_losses.clear()
        routed = ffn(x)
        aux = model.context.aux_losses.loss("moe")
    grads = torch.autograd.grad((routed * probe).sum(), [x, *params], allow_unused=True)

    def plain_lora(name: str, inp: torch.Tensor) -> torch.Tensor:
        adapter = dict(getattr(getattr(ffn, name), "adapters", {})).get("plain")
        return plain_linear(ffn.linear(name), adapter, inp)

    plain_rows = ffn_forward(ffn, plain_lora, x[:2], moe.activation)
    base_rows = dense_expert(ffn, moe, None, x[5:])
    moe_rows = dense_moe(ffn, moe, x[2:5].reshape(-1, 64), mask[2:5].reshape(-1), 3, True)
    reference = torch.cat([plain_rows, moe_rows.view(3, 7, 64), base_rows])
    expected = torch.autograd.grad((reference * probe).sum(), [x, *params], allow_unused=True)

    torch.testing.assert_close(routed[mask], reference[mask], atol=2e-5, rtol=1e-4)
    for got, want in zip(grads, expected, strict=True):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert any(g is not None and g.abs().sum() > 0 for g in grads[1:])
    assert aux is not None and aux.requires_grad
    if strategy == "mixlora":  # transformers' own Mixtral load-balancing loss, padding masked
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        logits = x[2:5].reshape(-1, 64).float() @ moe.router.weight.T
        want = 0.01 * load_balancing_loss_func((logits,), 4, 2, mask[2:5].long())
        torch.testing.assert_close(aux, want, atol=1e-6, rtol=1e-5)


def dropped_moe(
    ffn: MixLoraFeedForward, moe, x: torch.Tensor, masks: dict[str, torch.Tensor] | None
) -> torch.Tensor:
    """(N, H) ``dense_moe`` with expert dropout: ``masks[name]`` (E, N, in) holds the
    multipliers of expert e's input to projection ``name`` at token t. PEFT's LoRA / DoRA with
    dropout on the adapter's input: DoRA rescales the base output of the dropped input,
    ``W x + (m/||W + sBA|| - 1) W d(x) + m/||.|| s B A d(x)``."""

    def expert_out(e: int) -> torch.Tensor:
        def proj(name: str, inp: torch.Tensor) -> torch.Tensor:
            layer, adapter = ffn.linear(name), moe.expert(name, e)
            dropped = inp if masks is None else inp * masks[name][e]
            delta = adapter.lora_B.weight @ adapter.lora_A.weight * adapter.scaling  # (out, in)
            if adapter.magnitude is None:
                out = inp @ layer.weight.T + dropped @ delta.T
            else:
                norm = torch.linalg.norm(layer.weight + delta, dim=1).detach()
                scale = adapter.magnitude.weight / norm
                out = inp @ layer.weight.T + (scale - 1) * (dropped @ layer.weight.T)
                out = out + scale * (dropped @ delta.T)
            return out if layer.bias is None else out + layer.bias

        return ffn_forward(ffn, proj, x, moe.activation)

    spec = moe.router_spec
    probs = (x.float() @ moe.router.weight.T).softmax(-1)
    keep = kept_experts(probs.detach(), spec, 3, torch.ones(x.shape[0], dtype=torch.bool), True)
    weights = probs * keep
    if spec.strategy == "mixlora":
        weights = weights / weights.sum(-1, keepdim=True)
    out = sum(weights[:, e : e + 1] * expert_out(e) for e in range(spec.num_experts))
    return out + (~keep.any(-1))[:, None] * dense_expert(ffn, moe, None, x)


def expert_masks(
    ffn: MixLoraFeedForward, moe, routed: torch.Tensor, p: float, twin: torch.Generator
) -> dict[str, torch.Tensor]:
    """Each expert's dropout multipliers per projection, rebuilt from the documented draw rule
    (``keep_multipliers``) on a twin of the adapter's stream: each projection in call order,
    one (N, k * in) draw, token by token, a token's k slots side by side (``slot_dropout``); a
    token's routed experts take its slots in expert order (k: top-k's k, switch 1, top-p E)."""
    n, num_experts = routed.shape
    widths = {name: ffn.linear(name).in_features for name in ffn.projections}
    masks = {name: torch.ones(num_experts, n, w) for name, w in widths.items()}
    strategy = moe.router_spec.strategy
    k = {"mixlora": moe.router_spec.top_k, "mixlora-switch": 1}.get(strategy, num_experts)
    slot_of = routed.long().cumsum(-1) - 1  # (N, E): a routed expert's slot of its token
    for name, w in widths.items():
        drawn = keep_multipliers((n, k * w), p, twin).view(n, k, w)
        for e in range(num_experts):
            tokens = routed[:, e].nonzero().squeeze(1)
            masks[name][e, tokens] = drawn[tokens, slot_of[tokens, e]]
    return masks


@pytest.mark.parametrize("impl", ["loop", "grouped", "masked"])
@pytest.mark.parametrize(
    ("family", "strategy"),
    [("llama", "mixlora"), ("phi", "mixlora-switch"), ("llama", "mixlora-dynamic")],
)
def test_dora_experts_with_dropout_equal_the_dense_formula(
    family: str, strategy: str, impl: str
) -> None:
    """DoRA experts with expert dropout on (the real masks, from the adapter's stream), for
    each ``routed_lora`` implementation, with and without a canonical index (mask only: the
    real tokens gathered after a host read), ``mixlora-dynamic`` with its unused slots run and
    dropped: each against the dense formula with the masks rebuilt from the documented draw
    order, outputs and gradients."""
    ffn_names = FFN if family == "llama" else ("fc1", "fc2")
    model = MultiLoraModel(make_model() if family == "llama" else make_phi())
    spec = mixlora(strategy, True, ffn_names)
    model.add_adapter("moe", replace(spec, dropout=0.3, expert_dropout=0.3))
    randomise(model, "moe", 2)
    model.train()
    ffn = model.model.model.layers[0].mlp
    moe = ffn.moes["moe"]
    moe.routed_impl = impl
    assert moe.expert(ffn_names[0], 0).dropout_p == 0.3
    torch.manual_seed(0)
    x = torch.randn(3, 7, 64, requires_grad=True)
    flat = x.reshape(-1, 64)
    params = [p for _, m in model.adapter_modules("moe") for p in m.parameters()]
    probs = (flat.detach() @ moe.router.weight.detach().T).softmax(-1)
    routed = kept_experts(probs, moe.router_spec, 3, torch.ones(21, dtype=torch.bool), True)
    probe = torch.randn(21, 64)
    mask = torch.ones(21, dtype=torch.bool)
    rows = torch.arange(3).repeat_interleave(7)
    layouts = {  # a per-row layout and a mask / a token layout with canonical indices
        "mask-only": (BatchLayout.from_row_adapters(["moe"] * 3), mask, None, None),
        "canonical": (BatchLayout.from_lengths([("moe", 21)], [21]), mask, rows, torch.arange(21)),
    }
    stream = model.context.generators.get("moe", torch.device("cpu"))
    drops = (False, True) if strategy == "mixlora-dynamic" else (False,)
    for (path, context), drop in itertools.product(layouts.items(), drops):
        moe.drop_unused_slots = drop
        twin = twin_generator(stream)
        with model.context.use(*context):
            routed_out = ffn(x).reshape(-1, 64)
        masks = expert_masks(ffn, moe, routed, 0.3, twin)
        assert torch.equal(twin.get_state(), stream.get_state()), path  # the same draws
        reference = dropped_moe(ffn, moe, flat, masks)
        undropped = dropped_moe(ffn, moe, flat, None)
        assert (undropped - reference).abs().max() > 1e-3  # the dropout is live
        grads = torch.autograd.grad((routed_out * probe).sum(), [x, *params], allow_unused=True)
        expected = torch.autograd.grad((reference * probe).sum(), [x, *params], allow_unused=True)
        where = f"{path}, drop {drop}"
        torch.testing.assert_close(routed_out, reference, atol=2e-5, rtol=1e-4, msg=where)
        for got, want in zip(grads, expected, strict=True):
            if want is None:
                assert got is None or not got.any()
            else:
                torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=where)


def test_switch_capacity_sends_overflow_to_the_frozen_ffn_only_in_training() -> None:
    model = MultiLoraModel(make_model())
    model.add_adapter("moe", mixlora("mixlora-switch", expert_capacity=1))
    randomise(model, "moe", 3)
    ffn = model.model.model.layers[0].mlp
    x = torch.randn(2, 9, 64)
    layout = BatchLayout.from_row_adapters(["moe", "moe"])
    with torch.no_grad(), model.context.use(layout):
        ffn.train()
        trained = ffn(x)
        ffn.eval()
        evaluated = ffn(x)
        base = ffn.mlp(x)
    # At most 4 experts x 1 token per row are routed in training: the rest equal the base FFN.
    same_as_base = (trained - base).abs().amax(-1) < 1e-6  # (2, 9)
    assert (same_as_base.sum(-1) >= 9 - 4).all()
    assert not ((evaluated - base).abs().amax(-1) < 1e-6).any()


def test_jitter_and_ffn_dropout_act_only_in_training() -> None:
    model = MultiLoraModel(make_model())
    model.add_adapter("noisy", mixlora("mixlora-switch", jitter_noise=0.5, ffn_dropout=0.5))
    model.add_adapter("quiet", mixlora("mixlora-switch", expert_capacity=100))
    randomise(model, "noisy", 9)
    ffn = model.model.model.layers[0].mlp
    ffn.moes["quiet"].load_state_dict(ffn.moes["noisy"].state_dict())  # same weights
    x = torch.randn(1, 16, 64)
    with torch.no_grad():
        outputs = {}
        for name in ("noisy", "quiet"):
            with model.context.use(BatchLayout.from_row_adapters([name])):
                ffn.eval()
                outputs[name, "eval"] = ffn(x)
                ffn.train()
                outputs[name, "train"] = ffn(x)
    torch.testing.assert_close(outputs["noisy", "eval"], outputs["quiet", "eval"])
    torch.testing.assert_close(outputs["quiet", "train"], outputs["quiet", "eval"])
    assert (outputs["noisy", "train"] == 0).float().mean() > 0.3  # ffn_dropout zeroes ~half
    kept = outputs["noisy", "train"] != 0  # jitter moved the routing or the weights
    assert not torch.allclose(outputs["noisy", "train"][kept] / 2, outputs["quiet", "eval"][kept])


# --- training ----------------------------------------------------------------------------------


def moe_adapter(data: str, template: str, strategy: str = "mixlora", **extra) -> dict:
    return {
        "name": strategy, "data": data, "prompt": template, "routing_strategy": strategy,
        "num_experts": 4, "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "jitter_noise": 0.0,
        "target_modules": ["q_proj", "v_proj", *FFN], "batch_size": 8, "micro_batch_size": 4,
        "num_epochs": 2, "lr": 5e-3, **extra,
    }  # fmt: skip


def test_mixlora_trained_alongside_lora_equals_alone(tmp_path: Path) -> None:
    strategy = "mixlora"  # (switch's capacity runs per row, within the segment: same path)
    tokenizer = make_tokenizer()
    template = write_template(tmp_path)
    add = write_json(tmp_path / "add.json", addition_rows(16))
    rev = write_json(tmp_path / "rev.json", reverse_rows(12))
    moe = moe_adapter(
        add,
        template,
        strategy,
        use_dora=strategy == "mixlora",
        num_epochs=1,
        lora_dropout=0.1,
        jitter_noise=0.1,
    )  # each adapter's own random stream
    others = [
        {"name": "ffn-lora", "data": rev, "prompt": template, "r": 4, "lora_dropout": 0.1,
         "target_modules": ["q_proj", "gate_proj", "down_proj"], "batch_size": 4, "lr": 5e-3,
         "num_epochs": 1},
        {"name": "attn-lora", "data": add, "prompt": template, "r": 2, "lora_dropout": 0.1,
         "batch_size": 8, "num_epochs": 1, "use_dora": True},
    ]  # fmt: skip

    def factory():
        # A float64 base: top-k routing is discontinuous, so fp32 rounding differences between
        # batch shapes (together vs alone) could flip a near-tie between two experts. With the
        # router reading fp32-rounded float64 states the two runs are bitwise equal.
        return make_model(vocab_size=len(tokenizer)).double()

    together = run_in_memory(
        factory, tokenizer, {"cutoff_len": 64, "lora": [moe, *others]}, tmp_path / "t"
    )
    alone = run_in_memory(factory, tokenizer, {"cutoff_len": 64, "lora": [moe]}, tmp_path / "a")
    trained, reference = adapter_tensors(together, strategy), adapter_tensors(alone, strategy)
    assert any("moes" in key for key in trained)
    assert max_relative_difference(trained, reference) <= 1e-4
    assert any(t.abs().sum() > 0 for k, t in reference.items() if "lora_B" in k)


def test_gradient_checkpointing_keeps_the_router_loss_gradient(tmp_path: Path) -> None:
    tokenizer = make_tokenizer()
    add = write_json(tmp_path / "add.json", addition_rows(8))
    moe = moe_adapter(add, write_template(tmp_path), "mixlora-switch", router_aux_loss_coef=0.5)
    runs = {
        mode: run_in_memory(
            lambda: make_model(vocab_size=len(tokenizer)).double(),
            tokenizer,
            {"cutoff_len": 64, "gradient_checkpoint": mode, "lora": [moe]},
            tmp_path / mode,
        )
        for mode in ("none", "recompute")
    }
    tensors = {mode: adapter_tensors(run, "mixlora-switch") for mode, run in runs.items()}
    assert max_relative_difference(tensors["recompute"], tensors["none"]) <= 1e-6


def test_mixlora_learns_as_well_as_lora_of_equal_size_and_uses_every_expert(
    tmp_path: Path,
) -> None:
    tokenizer = make_tokenizer()
    template = write_template(tmp_path)
    data = write_json(tmp_path / "add.json", addition_rows(48))
    common = {"data": data, "prompt": template, "lora_dropout": 0.0, "target_modules": list(FFN),
              "batch_size": 8, "num_epochs": 6, "lr": 1e-2}  # fmt: skip
    adapters = [  # the same scale alpha / r = 2 for both
        {"name": "moe", "routing_strategy": "mixlora", "num_experts": 4, "top_k": 2, "r": 2,
         "lora_alpha": 4, "router_aux_loss_coef": 0.02, **common},
        {"name": "lora", "r": 9, "lora_alpha": 18, **common},
    ]  # fmt: skip
    trainer = run_in_memory(
        lambda: make_model(vocab_size=len(tokenizer), init_range=0.2),
        tokenizer,
        {"cutoff_len": 32, "log_step": 6, "lora": adapters},
        tmp_path / "out",
    )
    sizes = {
        n: sum(p.numel() for p in trainer.model.adapter_parameters(n)) for n in ("moe", "lora")
    }
    assert sizes["moe"] <= sizes["lora"]  # 9728 vs 10368: the LoRA even has a few more
    moe, lora = trainer.runs
    assert moe.history[-1] < 0.5 * moe.history[0]
    # (measured: 1.32 vs 1.37 over the last 6 steps; MixLoRA starts slower, then catches up)
    assert moe.history[-1] <= 1.1 * lora.history[-1], (moe.history, lora.history)
    # every expert takes a share of the routed tokens in every logged interval (uniform: 0.25)
    assert len(moe.expert_load) == len(moe.history)
    assert all(min(load) > 0.05 for load in moe.expert_load), moe.expert_load


# --- persistence -------------------------------------------------------------------------------


def logits_of(model: MultiLoraModel, name: str) -> torch.Tensor:
    torch.manual_seed(5)
    ids = torch.randint(4, 90, (3, 11))
    with torch.no_grad():
        return model(ids, torch.ones_like(ids), BatchLayout.from_row_adapters([name] * 3)).logits


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_save_load_gives_equal_logits(tmp_path: Path, tiny_model_dir: Path, strategy: str) -> None:
    config = parse_config(
        {"lora": [moe_adapter("x.json", "alpaca", strategy, expert_lora={"r": 2, "lora_alpha": 4})]}
    )
    model = MultiLoraModel(make_model(vocab_size=len(make_tokenizer())))
    model.add_adapter(strategy, spec_from_config(config.lora[0]))
    randomise(model, strategy, 4)
    from mlora.persistence.adapter_files import peft_config, save_adapter

    spec = model.specs[strategy]
    save_adapter(model, strategy, tmp_path / strategy, peft_config(spec, "tiny"))
    saved, tensors = read_adapter(tmp_path / strategy)
    assert saved["peft_type"] == "MIXLORA" and saved["routing_strategy"] == strategy
    assert saved["expert_lora"] == {"r": 2, "lora_alpha": 4} and saved["act_fn"] == "silu"
    assert "mixlora.layers.1.mlp.moe_gate.weight" in tensors
    assert "mixlora.layers.0.mlp.down_proj.experts.3.lora_B.weight" in tensors
    assert "mixlora.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    loaded, _ = load_trained(str(tiny_model_dir), {"again": tmp_path / strategy})
    model.eval()
    torch.testing.assert_close(logits_of(loaded, "again"), logits_of(model, strategy))


def test_the_mixlora_package_loads_our_files_with_equal_logits(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    mixlora = pytest.importorskip("mixlora")
    from transformers import AutoModelForCausalLM

    config = parse_config({"lora": [moe_adapter("x.json", "alpaca", lora_dropout=0.05)]})
    model = MultiLoraModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    model.add_adapter("mixlora", spec_from_config(config.lora[0]))
    randomise(model, "mixlora", 6)
    from mlora.persistence.adapter_files import peft_config, save_adapter

    folder = tmp_path / "mixlora"
    save_adapter(model, "mixlora", folder, peft_config(model.specs["mixlora"], str(tiny_model_dir)))
    their_config, weights = mixlora.load_adapter_weights(str(folder), device="cpu")
    theirs = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    mixlora.inject_adapter_in_model(theirs, their_config, weights)
    theirs.eval()
    for layer in theirs.model.layers:  # its experts live in a plain dict: eval() misses them
        for moe in layer.mlp.mixlora_moes.values():
            for expert in moe.experts_.values():
                expert.eval()
    torch.manual_seed(5)
    ids = torch.randint(4, 90, (3, 11))
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
    torch.testing.assert_close(logits_of(model.eval(), "mixlora"), want, atol=1e-5, rtol=1e-4)


def test_mixlora_needs_a_known_mlp_and_an_ffn_target() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(MloraError, match=r"key 'routing_strategy'.*GPT2MLP"):
        MultiLoraModel(gpt2).add_adapter("m", mixlora("mixlora"))
    attention_only = build_mixlora_spec(
        r=2, lora_alpha=4, lora_dropout=0.0, target_modules=("q_proj",), init="original",
        use_dora=False, use_rslora=False, router=RouterSpec(num_experts=2), act_fn=None,
        expert_lora=None,
    )  # fmt: skip
    with pytest.raises(MloraError, match="key 'target_modules' must include an FFN projection"):
        MultiLoraModel(make_model()).add_adapter("m", attention_only)


def test_cached_generation_equals_full_recomputation(tmp_path: Path) -> None:
    from mlora.inference.generation import GenerationRequest, SamplingParams, generate

    tokenizer = make_tokenizer()
    model = MultiLoraModel(make_model(vocab_size=len(tokenizer), init_range=0.2))
    for strategy in STRATEGIES:
        model.add_adapter(strategy, mixlora(strategy))
        randomise(model, strategy, 7)
    model.add_adapter("plain", LoraSpec(4, 2.0, 0.0, ("q_proj", "up_proj")))
    randomise(model, "plain", 8)
    model.eval()
    prompts = ["add 3 4=", "rev owl=", "w cat="]
    adapters = [*STRATEGIES, "plain", None]
    requests = [GenerationRequest(p, a) for a in adapters for p in prompts]
    outputs = generate(model, tokenizer, requests, SamplingParams(max_new_tokens=6))
    for request, output in zip(requests, outputs, strict=True):
        ids = tokenizer(request.prompt)["input_ids"]
        for _ in range(len(output.token_ids)):  # greedy, the whole sequence every step
            batch = torch.tensor([ids])
            layout = BatchLayout.from_row_adapters([request.adapter])
            with torch.no_grad():
                ids = [
                    *ids,
                    int(model(batch, torch.ones_like(batch), layout).logits[0, -1].argmax()),
                ]
        assert ids[-len(output.token_ids) :] == output.token_ids, request


# --- the real command line ---------------------------------------------------------------------


def mlora_py(tmp_path: Path, model_dir: Path, config: dict, *flags: str):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    command = [sys.executable, str(ROOT / "mlora.py"), "--base_model", str(model_dir)]
    command += ["--config", str(path), "--dir", str(tmp_path / "out"), *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_cli_trains_continues_and_reports_bad_input(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    data = write_json(tmp_path / "add.json", addition_rows(8))
    adapter = moe_adapter(data, write_template(tmp_path), num_epochs=1)
    config = {"cutoff_len": 32, "log_step": 1, "lora": [adapter]}
    first = mlora_py(tmp_path, tiny_model_dir, config)
    assert first.returncode == 0, first.stderr
    assert "| mixlora | expert load" in first.stderr
    weights = read_adapter(tmp_path / "out" / "mixlora")[1]
    from mlora.cli.train import main  # the code mlora.py runs, in this process (one start less)

    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    argv = ["--base_model", str(tiny_model_dir), "--config", str(tmp_path / "config.json")]
    assert main([*argv, "--dir", str(tmp_path / "out"), "--load_adapter"]) == 0
    assert "adapter mixlora: continuing from" in capsys.readouterr().err
    again = read_adapter(tmp_path / "out" / "mixlora")[1]
    assert weights.keys() == again.keys()
    assert any(not torch.equal(weights[k], again[k]) for k in weights)

    bad = mlora_py(tmp_path, tiny_model_dir, {**config, "lora": [{**adapter, "top_k": 5}]})
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert lines[-1] == (
        f"error: {tmp_path / 'config.json'}: adapter 'mixlora': key 'top_k' (5) must be <= "
        "'num_experts' (4)"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"routing_strategy": "mixtrall"}, "key 'routing_strategy' must be one of 'mixlora'"),
        ({"expert_capacity": 8}, "key 'expert_capacity' does not apply to routing_strategy"),
        ({"routing_strategy": None}, "key 'jitter_noise' needs 'routing_strategy'"),
        ({"top_k": 2, "num_experts": None}, "key 'num_experts' is required"),
    ],
)
def test_bad_moe_keys_are_one_line_cli_errors(
    tmp_path: Path, tiny_model_dir: Path, capsys, change: dict, message: str
) -> None:
    from mlora.cli.train import main

    adapter = {
        k: v for k, v in {**moe_adapter("x.json", "alpaca"), **change}.items() if v is not None
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"lora": [adapter]}), encoding="utf-8")
    argv = ["--base_model", str(tiny_model_dir), "--config", str(path), "--dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_interrupted_run_resumes_exactly(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Jitter, dropouts and capacity draw on the RNG: the resumed run must still match."""
    add = write_json(tmp_path / "add.json", addition_rows(8))
    switch = moe_adapter(add, write_template(tmp_path), "mixlora-switch", expert_capacity=4)
    switch.update(jitter_noise=0.1, ffn_dropout=0.1, lora_dropout=0.1, batch_size=4)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"cutoff_len": 64, "save_step": 2, "lora": [switch]}))
    clean_dir, cut_dir = train_killed_then_resumed(path, tiny_model_dir, tmp_path)
    clean = read_adapter(clean_dir / "mixlora-switch")[1]
    resumed = read_adapter(cut_dir / "mixlora-switch")[1]
    assert max_relative_difference(resumed, clean) <= 1e-6
