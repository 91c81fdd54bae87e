"""Training-step time with the base model in bf16 against fp32 (adapters fp32 in both).

A random LLaMA (built here, no download) wrapped in ``MultiLoraModel`` with one LoRA adapter
(r 16 on mlora's default targets) runs forward + backward on ``--batch`` rows of ``--seq``
tokens, once with the base in fp32 and once in bf16, both models in this process. Each repeat
times ``--steps`` steps of each dtype after one warm-up step, the dtypes in turn, so a drift of
the machine touches both; TF32 is off unless ``--tf32`` (fp32 then means fp32 on CUDA).

Prints the median [min-max] step time per dtype over ``--repeat`` repeats and the bf16/fp32
ratio of each repeat, median [min-max]. bf16 pays off on GPUs with bf16 tensor cores; on a CPU
without bf16 matmul units it is usually slower, and this prints so.

    python benchmarks/bench_precision.py                      # CUDA when available, else CPU
    python benchmarks/bench_precision.py --device cpu --hidden 256 --seq 128 --repeat 3
"""

from __future__ import annotations

import argparse
import time

import torch
from common import Spread, resolve_device  # benchmarks/common.py (puts the checkout on the path)
from transformers import LlamaConfig, LlamaForCausalLM

from mlora.adapters.spec import LoraSpec
from mlora.batching.layout import BatchLayout
from mlora.hardware.backends import Backend, get_backend
from mlora.model.multi_lora import MultiLoraModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(args: argparse.Namespace, backend: Backend, dtype: torch.dtype) -> MultiLoraModel:
    """The same random base (seed 0) in ``dtype`` with one fp32 LoRA adapter, in training mode."""
    backend.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=args.seq,
    )
    base = LlamaForCausalLM(config).to(device=backend.device, dtype=dtype)
    model = MultiLoraModel(base)
    model.add_adapter("a", LoraSpec(r=16, scaling=2.0))
    return model.train()


def step_seconds(model: MultiLoraModel, backend: Backend, ids: torch.Tensor, steps: int) -> float:
    """Mean seconds of one forward + backward over ``steps`` steps, after one warm-up step."""
    layout = BatchLayout.from_row_adapters(["a"] * ids.shape[0])
    mask = torch.ones_like(ids)
    for i in range(steps + 1):
        if i == 1:
            backend.synchronize()
            start = time.perf_counter()
        model(ids, mask, layout).logits.float().mean().backward()
        model.zero_grad(set_to_none=True)
    backend.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    add("--vocab", type=int, default=4096)
    add("--hidden", type=int, default=1024)
    add("--layers", type=int, default=4)
    add("--batch", type=int, default=8, help="rows per step")
    add("--seq", type=int, default=512, help="tokens per row")
    add("--steps", type=int, default=3, help="timed steps per dtype per repeat")
    add("--repeat", type=int, default=5)
    add("--tf32", action="store_true", help="allow TF32 for the fp32 matmuls (CUDA)")
    args = parser.parse_args()
    resolve_device(args)

    backend = get_backend(args.device)
    backend.allow_tf32(args.tf32)
    models = {name: build(args, backend, dtype) for name, dtype in DTYPES.items()}
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
    ids = ids.to(backend.device)
    seconds: dict[str, list[float]] = {name: [] for name in DTYPES}
    for _ in range(args.repeat):
        for name, model in models.items():
            seconds[name].append(step_seconds(model, backend, ids, args.steps))
    ratios = [b / f for b, f in zip(seconds["bf16"], seconds["fp32"], strict=True)]

    print(
        f"device {backend.device}; random LLaMA hidden {args.hidden}, {args.layers} layers, "
        f"vocab {args.vocab}; LoRA r 16; {args.batch} rows x {args.seq} tokens; TF32 "
        f"{'on' if args.tf32 else 'off'}; {args.steps} timed steps after 1 warm-up, "
        f"{args.repeat} repeats, median [min-max]"
    )
    for name, values in seconds.items():
        tokens_per_s = Spread.of([args.batch * args.seq / s for s in values])
        print(
            f"{name}: {Spread.of(values).show(' s/step', 4)}  {tokens_per_s.show(' tokens/s', 0)}"
        )
    print(f"bf16 / fp32 step time: {Spread.of(ratios).show('x', 2)}")


if __name__ == "__main__":
    main()
