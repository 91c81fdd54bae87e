"""LoRAMoE and MoLA layers equal an independent computation from the math, outputs and
gradients, with their experts' dropout on.

The reference (``mixture_reference``) is written from upstream MoE-PEFT's LoRAMoE / MoLA
semantics over plain tensors read out of the module (router weight, each expert's A, B and DoRA
magnitude); it never calls the module's methods. Dropout masks are rebuilt from the documented
draw rule (``tests.references.keep_multipliers``) on a twin of the adapter's generator, in the
order the layers document: LoRAMoE draws one (N, in) mask per expert, experts in order; MoLA
takes the (token, slot) pairs grouped by expert (stable) and makes one (N*k, in) draw over them
in that order (plain LoRA and DoRA experts alike: all pairs run as one routed matmul).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from mlora.adapters import MultiLoraLinear
from mlora.adapters.lora_moe.layer import LoraMoeAdapter, MolaAdapter, load_balancing_loss
from mlora.adapters.spec import AdapterInput
from mlora.batching.layout import BatchLayout, LayoutContext
from mlora.batching.randomness import RealRows, SegmentRandom
from mlora.ops.routed_lora import routed_lora
from tests.references import keep_multipliers, lora_delta, twin_generator

IN, OUT, E, R = 16, 12, 4, 3
SCALING, DROPOUT = 2.0, 0.2


def make_module(
    kind: str,
    use_dora: bool,
    top_k: int = 2,
    dropout: float = DROPOUT,
    weight: torch.Tensor | None = None,
) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    weight = torch.randn(OUT, IN) if weight is None else weight
    kwargs = dict(r=R, scaling=SCALING, dropout=dropout, use_dora=use_dora, base_weight=weight)
    if kind == "loramoe":
        module = LoraMoeAdapter(IN, OUT, E, **kwargs)
    else:
        module = MolaAdapter(IN, OUT, E, top_k=top_k, **kwargs)
    with torch.no_grad():
        for expert in module.experts:  # B = 0 at init would hide the experts' differences
            expert.lora_B.weight.normal_()
            if expert.magnitude is not None:
                expert.magnitude.weight.add_(0.1 * torch.randn(OUT))
    return module, weight


@dataclass
class MixtureWeights:
    """A mixture's parameters as plain leaf tensors (gradients land here, not in the module)."""

    router: torch.Tensor  # (E, in)
    lora_a: list[torch.Tensor]  # E x (r, in)
    lora_b: list[torch.Tensor]  # E x (out, r)
    magnitude: list[torch.Tensor] | None  # E x (out,), DoRA experts only
    top_k: int | None  # None: LoRAMoE (dense)


def read_weights(module: torch.nn.Module) -> MixtureWeights:
    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone().requires_grad_(True)

    experts = list(module.experts)
    dora = experts[0].magnitude is not None
    return MixtureWeights(
        router=leaf(module.moe_gate.weight),
        lora_a=[leaf(e.lora_A.weight) for e in experts],
        lora_b=[leaf(e.lora_B.weight) for e in experts],
        magnitude=[leaf(e.magnitude.weight) for e in experts] if dora else None,
        top_k=module.top_k if isinstance(module, MolaAdapter) else None,
    )


def weight_pairs(module: torch.nn.Module, weights: MixtureWeights):
    """(name, module parameter, reference leaf) for every parameter, to compare gradients."""
    yield "router", module.moe_gate.weight, weights.router
    for e, expert in enumerate(module.experts):
        yield f"A{e}", expert.lora_A.weight, weights.lora_a[e]
        yield f"B{e}", expert.lora_B.weight, weights.lora_b[e]
        if weights.magnitude is not None:
            yield f"m{e}", expert.magnitude.weight, weights.magnitude[e]


def mixture_reference(
    weights: MixtureWeights,
    x: torch.Tensor,
    base_weight: torch.Tensor,
    base_bias: torch.Tensor | None,
    base_result: torch.Tensor,
    generator: torch.Generator | None,
    p: float = DROPOUT,
) -> torch.Tensor:
    """The (N, out) delta of LoRAMoE / MoLA from the math (MoE-PEFT ``LoraMoe`` /
    ``MolaSparseMoe``): ``probs = softmax(x Wr^T)``; LoRAMoE sums every expert's LoRA delta
    weighted by ``probs``; MoLA keeps each token's top-k probabilities renormalised to sum 1 and
    runs only those experts. ``base_result`` (N, out) is the frozen layer's output, an input
    as for the layer (DoRA reuses it without dropout); ``generator`` None: no dropout."""
    probs = torch.softmax(x @ weights.router.T, dim=-1)  # (N, E)
    no_bias = base_result if base_bias is None else base_result - base_bias
    magnitudes = weights.magnitude or [None] * E

    def expert(e: int, rows: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        a, b, m = weights.lora_a[e], weights.lora_b[e], magnitudes[e]
        return lora_delta(x[rows], a, b, SCALING, base_weight, no_bias[rows], m, keep)

    if weights.top_k is None:  # LoRAMoE: every expert on every token, one mask per expert
        every = torch.arange(x.shape[0], device=x.device)
        delta = x.new_zeros(x.shape[0], OUT)
        for e in range(E):
            keep = None if generator is None else keep_multipliers(x.shape, p, generator)
            delta = delta + probs[:, e : e + 1] * expert(e, every, keep)
        return delta
    k = weights.top_k
    kept, chosen = probs.topk(k, dim=-1)  # (N, k)
    kept = (kept / kept.sum(dim=-1, keepdim=True)).reshape(-1)  # (N*k,) per (token, slot) pair
    groups = [torch.nonzero(chosen.reshape(-1) == e).flatten() for e in range(E)]  # by expert
    counts = [len(g) for g in groups]
    if generator is None:
        keeps = [None] * E
    else:  # one draw, token by token: each token's k slots side by side (N, k*in)
        by_pair = keep_multipliers((x.shape[0], k * IN), p, generator).view(-1, IN)  # (N*k, in)
        keeps = [by_pair[pairs] for pairs in groups]
    delta = x.new_zeros(x.shape[0], OUT)
    for e, pairs in enumerate(groups):
        if counts[e]:
            tokens = pairs // k
            delta = delta.index_add(0, tokens, kept[pairs, None] * expert(e, tokens, keeps[e]))
    return delta


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("kind,top_k", [("loramoe", 0), ("mola", 2), ("mola", 1), ("mola", 4)])
def test_routed_equals_reference_from_the_math(
    kind: str, top_k: int, use_dora: bool, training: bool
) -> None:
    """Dropout 0.2 on the experts; training draws masks from the adapter's stream, evaluation
    draws none (and DoRA reuses the base output, as PEFT)."""
    module, weight = make_module(kind, use_dora, top_k)
    module.train(training)
    weights = read_weights(module)
    bias = torch.randn(OUT)
    x = torch.randn(40, IN)
    base_result = x @ weight.T + bias
    generator = torch.Generator().manual_seed(11)
    twin = twin_generator(generator) if training else None
    x_ours, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)

    ours = module(AdapterInput(x_ours, base_result, weight, bias, SegmentRandom(generator)))
    ref = mixture_reference(weights, x_ref, weight, bias, base_result, twin)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    if training:  # the test sees the dropout: without masks the result is another one
        assert twin is not None and torch.equal(twin.get_state(), generator.get_state())
        undropped = mixture_reference(weights, x, weight, bias, base_result, None)
        assert not torch.allclose(ours, undropped, rtol=1e-3, atol=1e-3)

    grad_out = torch.randn_like(ref)
    ours.backward(grad_out)
    ref.backward(grad_out)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for name, param, leaf in weight_pairs(module, weights):
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, leaf.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_loramoe_equals_weights_by_hand() -> None:
    """LoRAMoE from the raw matrices: sum_e p_e * scale * B_e A_e x (evaluation: no dropout)."""
    module, weight = make_module("loramoe", use_dora=False)
    module.eval()
    x = torch.randn(10, IN)
    probs = torch.softmax(x @ module.moe_gate.weight.T, dim=-1)
    by_hand = sum(
        probs[:, e : e + 1] * 2.0 * (x @ ex.lora_A.weight.T @ ex.lora_B.weight.T)
        for e, ex in enumerate(module.experts)
    )
    torch.testing.assert_close(module(AdapterInput(x, x @ weight.T)), by_hand, rtol=1e-5, atol=1e-5)


def test_mola_runs_each_expert_on_its_tokens_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """k (token, expert) rows per token go through the experts' LoRAs, not E."""
    import mlora.adapters.lora_moe.layer as lora_moe

    seen: list[int] = []

    def spy(pairs, experts, *args, **kwargs):
        seen.append(pairs.shape[0])
        return routed_lora(pairs, experts, *args, **kwargs)

    monkeypatch.setattr(lora_moe, "routed_lora", spy)
    module, weight = make_module("mola", use_dora=False, top_k=2)
    x = torch.randn(50, IN)
    module(AdapterInput(x, x @ weight.T))
    assert seen == [50 * 2]  # k rows per token in all, not E


def test_load_balancing_loss_equals_transformers() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2 * 7, E)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    probs = torch.softmax(logits, dim=-1)
    selected = probs.topk(2, dim=-1).indices
    for attention_mask in (None, mask):
        expected = load_balancing_loss_func((logits,), E, 2, attention_mask)
        flat = None if attention_mask is None else attention_mask.reshape(-1).bool()
        torch.testing.assert_close(load_balancing_loss(probs, selected, E, flat), expected)


def test_mola_reports_balancing_loss_over_real_tokens_in_training() -> None:
    """Through MultiLoraLinear and the context: coef * Mixtral's loss of the segment's real
    tokens, joined to that adapter only; nothing in eval or with router_loss off."""
    torch.manual_seed(0)
    context = LayoutContext()
    layer = MultiLoraLinear(torch.nn.Linear(IN, OUT).requires_grad_(False), context)
    layer.add_adapter("plain", 4, 2.0)
    moe = MolaAdapter(
        IN, OUT, E, r=R, scaling=2.0, top_k=2, router_loss=True, aux_loss_coef=0.5,
        context=context, adapter_name="m",
    )  # fmt: skip
    layer.adapters["m"] = moe
    x = torch.randn(3, 5, IN)
    attention = torch.ones(3, 5, dtype=torch.long)
    attention[2, 3:] = 0  # padding in the MoLA segment
    layout = BatchLayout.from_row_adapters(["plain", "m", "m"])
    with context.use(layout, attention.reshape(-1).bool()):
        layer.train()
        layer(x)
        logits = x[1:].reshape(-1, IN) @ moe.moe_gate.weight.T
        expected = 0.5 * load_balancing_loss_func((logits,), E, 2, attention[1:])
        torch.testing.assert_close(context.aux_losses.loss("m"), expected)
        assert context.aux_losses.loss("plain") is None
        assert context.aux_losses.take_loads("m").sum().item() == pytest.approx(1.0)
        context.aux_losses.clear()
        layer.eval()
        layer(x)
        assert context.aux_losses.loss("m") is None
        layer.train()
        moe.router_loss = False
        layer(x)
        assert context.aux_losses.loss("m") is None


def expected_rows(
    layer: MultiLoraLinear, name: str, x: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """(n, out) what adapter ``name`` gives tokens ``x`` (n, in): the base output plus its delta
    from the math, dropout masks drawn from ``generator`` (a twin of the adapter's stream)."""
    weight, bias = layer.base_layer.weight, layer.base_layer.bias
    base_result = x @ weight.T + bias
    adapter = layer.adapters[name]
    if isinstance(adapter, LoraMoeAdapter | MolaAdapter):
        delta = mixture_reference(read_weights(adapter), x, weight, bias, base_result, generator)
    else:
        keep = keep_multipliers(x.shape, adapter.dropout_p, generator)
        a, b = adapter.lora_A.weight, adapter.lora_B.weight
        delta = lora_delta(x, a, b, adapter.scaling, keep=keep)
    return base_result + delta


def test_plugs_into_multi_lora_linear_next_to_lora() -> None:
    """In a mixed batch, dropout on, each adapter's rows equal the reference drawn from its own
    stream, and so does running it alone; rows of no adapter get the base output."""
    torch.manual_seed(0)
    base = torch.nn.Linear(IN, OUT).requires_grad_(False)
    context = LayoutContext()
    layer = MultiLoraLinear(base, context).train()
    torch.nn.init.normal_(layer.add_adapter("plain", 4, 2.0, DROPOUT).lora_B.weight)
    for kind in ("loramoe", "mola"):
        module, _ = make_module(kind, use_dora=True, weight=base.weight)
        layer.adapters[kind] = module.train()
    names = ("plain", "loramoe", "mola")

    def twins() -> dict[str, torch.Generator]:
        return {n: twin_generator(context.generators.get(n, torch.device("cpu"))) for n in names}

    x = torch.randn(6, 5, IN)
    rows_of = ["plain", "plain", "loramoe", "mola", "mola", None]
    streams = twins()
    with context.use(BatchLayout.from_row_adapters(rows_of)):
        mixed = layer(x)
    for rows, name in ((slice(0, 2), "plain"), (slice(2, 3), "loramoe"), (slice(3, 5), "mola")):
        tokens = x[rows].reshape(-1, IN)
        expected = expected_rows(layer, name, tokens, streams[name]).view_as(mixed[rows])
        torch.testing.assert_close(mixed[rows], expected, rtol=1e-5, atol=1e-5)
        n = rows.stop - rows.start
        alone_streams = twins()
        with context.use(BatchLayout.from_row_adapters([name] * n)):
            alone = layer(x[rows])
        expected = expected_rows(layer, name, tokens, alone_streams[name]).view_as(alone)
        torch.testing.assert_close(alone, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[5], x[5] @ base.weight.T + base.bias)


@pytest.mark.gpu
@pytest.mark.parametrize("kind,top_k", [("loramoe", 0), ("mola", 2)])
def test_routed_equals_reference_on_cuda_with_bf16_inputs(kind: str, top_k: int) -> None:
    """bf16 inputs, fp32 experts, dropout from a CUDA generator: the reference in fp32."""
    module, weight = make_module(kind, use_dora=True, top_k=top_k)
    module = module.cuda().train()
    weight = weight.cuda()
    weights = read_weights(module)
    x = torch.randn(64, IN, device="cuda").bfloat16()
    base_result = (x.float() @ weight.T).bfloat16()
    generator = torch.Generator(device="cuda").manual_seed(11)
    twin = twin_generator(generator)
    ours = module(AdapterInput(x, base_result, weight, None, SegmentRandom(generator)))
    with torch.no_grad():
        ref = mixture_reference(weights, x.float(), weight, None, base_result.float(), twin)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_mola_with_padding_equals_canonical_path_and_reference(
    dtype: torch.dtype, use_dora: bool, training: bool
) -> None:
    """A segment with padding inside: given only the token mask (MultiLoraModel.forward, eval
    passes) or also the real tokens' canonical index (collate's training batches), MoLA gives
    the reference's delta on the real tokens and zero on padding, outputs and gradients, in
    fp64 and fp32, with the experts' dropout drawn over the real tokens in order."""
    module, weight = make_module("mola", use_dora, top_k=2)
    module = module.to(dtype).train(training)
    weight = weight.to(dtype)
    weights = read_weights(module)
    bias = torch.randn(OUT, dtype=dtype)
    x = torch.randn(30, IN, dtype=dtype)
    mask = torch.rand(30, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[0] = mask[-1] = False  # padding at both ends too
    real = mask.nonzero().squeeze(1)
    base_result = x @ weight.T + bias
    index = torch.where(mask, mask.long().cumsum(0) - 1, 0)  # canonical = segment order
    rows = RealRows(index, real.numel())

    def run(rows: RealRows | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        module.zero_grad()
        x_in = x.clone().requires_grad_(True)
        random = SegmentRandom(torch.Generator().manual_seed(11), rows)
        out = module(AdapterInput(x_in, base_result, weight, bias, random, token_mask=mask))
        out.backward(grad_out)
        grads = {name: param.grad.clone() for name, param, _ in weight_pairs(module, weights)}
        return out, {"x": x_in.grad, **grads}

    twin = torch.Generator().manual_seed(11) if training else None
    x_ref = x.clone().requires_grad_(True)
    on_real = mixture_reference(
        weights, x_ref[real], weight, bias, base_result[real], twin
    )  # (n, out)
    ref = torch.zeros(30, OUT, dtype=dtype).index_copy(0, real, on_real)
    grad_out = torch.randn(30, OUT, dtype=dtype)
    ref.backward(grad_out)
    ref_grads = {
        "x": x_ref.grad,
        **{name: leaf.grad for name, _, leaf in weight_pairs(module, weights)},
    }
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for path, given in (("padded", None), ("canonical", rows)):
        out, grads = run(given)
        assert out.dtype == dtype, path  # an fp64 adapter keeps fp64 (fp32 at least)
        torch.testing.assert_close(out, ref, **tol, msg=path)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], **tol, msg=f"{path} {name}")


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("impl", ["loop", "grouped", "masked"])
def test_mola_every_routed_impl_equals_reference(impl: str, use_dora: bool) -> None:
    """The module's ``routed_impl`` picks how its (token, expert) pairs run through
    ``routed_lora``; each gives the reference's delta and gradients, dropout on."""
    module, weight = make_module("mola", use_dora, top_k=2)
    module.routed_impl = impl
    module.train()
    weights = read_weights(module)
    x = torch.randn(40, IN)
    base_result = x @ weight.T
    generator = torch.Generator().manual_seed(5)
    twin = twin_generator(generator)
    x_ours, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours = module(AdapterInput(x_ours, base_result, weight, None, SegmentRandom(generator)))
    ref = mixture_reference(weights, x_ref, weight, None, base_result, twin)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(ref)
    ours.backward(grad_out)
    ref.backward(grad_out)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for name, param, leaf in weight_pairs(module, weights):
        torch.testing.assert_close(param.grad, leaf.grad, rtol=1e-5, atol=1e-5, msg=name)
