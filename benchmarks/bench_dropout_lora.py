"""LoRA dropout as a 1-byte mask vs the plain path: time and kept memory of one projection.

One adapted projection as mlora runs it in a SmolLM2 step: ``--tokens`` tokens in ``--adapters``
equal segments, in features 576, rank 8, dropout 0.05 on every segment, forward + backward with
a fixed random output gradient. Two ways to the same values and gradients:

- ``masked``: ``dropout_segmented_lora`` (keeps ``x``, the bool mask and the (tokens, r) low-rank
  activations; rebuilds the dropped input in backward);
- ``plain``: ``segmented_lora(x * keep)`` under autograd with the engine's default
  implementation (keeps the fp32 multipliers and the dropped input).

Per way and output width (q/o: 576, k/v: 192): median [min-max] of ``--repeat`` blocks of 10
steps, the two ways taking turns, and the bytes autograd keeps for backward beyond ``x`` (a
saved-tensor hook tallies them).

    python benchmarks/bench_dropout_lora.py
    python benchmarks/bench_dropout_lora.py --tokens 1024 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from itertools import pairwise

import torch

from mlora.batching.randomness import keep_scale
from mlora.ops import segmented_lora
from mlora.ops.masked_dropout import keep_multipliers
from mlora.ops.segmented_lora import dropout_segmented_lora

IN, RANK, P = 576, 8, 0.05


def make_step(way: str, tokens: int, adapters: int, out: int) -> tuple[Callable[[], None], int]:
    """One forward + backward of the projection's LoRA branch, and the bytes it keeps."""
    generator = torch.Generator().manual_seed(0)
    bounds = [tokens * i // adapters for i in range(adapters + 1)]
    segments = list(pairwise(bounds))
    ranges = [(a, b, keep_scale(P)) for a, b in segments]
    x = torch.randn(tokens, IN, generator=generator, requires_grad=True)
    mask = torch.rand(tokens, IN, generator=generator) > P
    lora_a = [torch.randn(RANK, IN, generator=generator, requires_grad=True) for _ in segments]
    lora_b = [torch.randn(out, RANK, generator=generator, requires_grad=True) for _ in segments]
    scales = [2.0] * adapters
    grad = torch.randn(tokens, out, generator=generator)

    def forward() -> torch.Tensor:
        if way == "masked":
            return dropout_segmented_lora(x, mask, ranges, segments, lora_a, lora_b, scales)
        return segmented_lora(
            x * keep_multipliers(mask, ranges, x.dtype), segments, lora_a, lora_b, scales
        )

    kept: dict[int, int] = {}

    def pack(saved: torch.Tensor) -> torch.Tensor:
        storage = saved.untyped_storage()
        if storage.data_ptr() != x.untyped_storage().data_ptr():
            kept[storage.data_ptr()] = storage.nbytes()
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward().backward(grad)

    def step() -> None:
        forward().backward(grad)

    return step, sum(kept.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tokens", type=int, default=2452, help="the SmolLM2 benchmark's largest step"
    )
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.tokens} tokens, {args.adapters} adapters, in {IN}, r {RANK}, dropout {P}, "
          f"{torch.get_num_threads()} threads, fp32 CPU")  # fmt: skip
    for out in (576, 192):
        steps, kept, times = {}, {}, {"masked": [], "plain": []}
        for way in times:
            steps[way], kept[way] = make_step(way, args.tokens, args.adapters, out)
            for _ in range(3):
                steps[way]()
        for _ in range(args.repeat):
            for way in times:
                start = time.perf_counter()
                for _ in range(10):
                    steps[way]()
                times[way].append((time.perf_counter() - start) / 10 * 1e3)
        for way, values in times.items():
            print(
                f"out {out:4d} {way:6s}: {statistics.median(values):6.2f} ms "
                f"[{min(values):.2f}-{max(values):.2f}], kept {kept[way] / 2**20:6.2f} MiB"
            )
        ratio = statistics.median(times["plain"]) / statistics.median(times["masked"])
        print(f"out {out:4d} plain / masked time: {ratio:.2f}x")


if __name__ == "__main__":
    main()
