"""MixLoRA FFN: routed index dispatch vs computing every expert on every token.

Builds one LLaMA-shaped MLP (no download), wraps it in ``MixLoraFeedForward`` with one MixLoRA
adapter, and times forward + backward over N tokens of that adapter's segment:

- ``routed``: mlora's path (base gate/up once, each expert on its own tokens by index);
- ``dense``: the same math with every expert run on every token and weighted by the kept
  router probabilities (zero for the experts a token did not pick), as a naive implementation
  would. Both give the same output (checked here, and in tests/test_mixlora.py).

    python benchmarks/bench_mixlora.py                      # CPU defaults
    python benchmarks/bench_mixlora.py --device cuda --tokens 16384
    python benchmarks/bench_mixlora.py --strategy mixlora-dynamic   # top-p routing
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from mlora.adapters.mixlora.feed_forward import MixLoraExperts, MixLoraFeedForward
from mlora.adapters.mixlora.spec import RouterSpec, build_mixlora_spec
from mlora.adapters.routing import route
from mlora.batching.layout import BatchLayout, LayoutContext


def expert_ffn(
    ffn: MixLoraFeedForward,
    moe: MixLoraExperts,
    e: int,
    x: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
) -> torch.Tensor:
    """Expert ``e``'s gated FFN on every token: each projection's base output plus its LoRA."""

    def project(name: str, inp: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        adapter = moe.expert(name, e)
        return base + adapter.lora_B(adapter.lora_A(inp)) * adapter.scaling

    hidden = moe.activation(project("gate_proj", x, gate)) * project("up_proj", x, up)
    return project("down_proj", hidden, ffn.linear("down_proj")(hidden)).float()


def dense(ffn: MixLoraFeedForward, moe: MixLoraExperts, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by the routing weights (zeros where not kept)."""
    routing = route(moe.router_logits(x), moe.router_spec, None, 1, False)
    gate, up = ffn.linear("gate_proj")(x), ffn.linear("up_proj")(x)
    out = 0
    for e in range(moe.router_spec.num_experts):
        out = out + routing.weights[:, e : e + 1] * expert_ffn(ffn, moe, e, x, gate, up)
    return out


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--strategy", default="mixlora", choices=["mixlora", "mixlora-dynamic"])
    parser.add_argument("--top_p", type=float, default=0.5, help="mixlora-dynamic's")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate)
    context = LayoutContext()
    ffn = MixLoraFeedForward(LlamaMLP(config).requires_grad_(False), context)
    spec = build_mixlora_spec(
        r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
        target_modules=("gate_proj", "up_proj", "down_proj"), init="original", use_dora=False,
        use_rslora=False, router=RouterSpec(
            strategy=args.strategy, num_experts=args.experts, top_k=args.top_k, top_p=args.top_p
        ),
        act_fn=None, expert_lora=None,
    )  # fmt: skip
    moe = MixLoraExperts(
        args.hidden,
        {n: (getattr(ffn, n).in_features, getattr(ffn, n).out_features) for n in ffn.projections},
        None,
        spec.expert_spec,
        spec.router,
        ffn.default_activation,
    )
    for p in moe.parameters():
        nn.init.normal_(p, std=0.05)
    ffn.moes["mix"] = moe
    ffn.to(args.device).eval()
    x = torch.randn(1, args.tokens, args.hidden, device=args.device)
    layout = BatchLayout.from_row_adapters(["mix"])

    def routed_step() -> torch.Tensor:
        with context.use(layout):
            out = ffn(x)
        out.sum().backward()
        return out

    def dense_step() -> torch.Tensor:
        out = dense(ffn, moe, x[0])
        out.sum().backward()
        return out

    with torch.no_grad(), context.use(layout):
        difference = (ffn(x)[0] - dense(ffn, moe, x[0])).abs().max().item()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    routed = timed(lambda: (routed_step(), sync()), args.repeats)
    naive = timed(lambda: (dense_step(), sync()), args.repeats)
    print(
        f"{args.tokens} tokens, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"{args.experts} experts "
        f"{f'top-{args.top_k}' if args.strategy == 'mixlora' else f'top-p {args.top_p}'}, "
        f"r {args.r}, {args.device}: "
        f"routed {routed * 1e3:.1f} ms, every-expert {naive * 1e3:.1f} ms per forward+backward "
        f"({naive / routed:.2f}x); max |difference| {difference:.2e}"
    )


if __name__ == "__main__":
    main()
