"""Time of the head's loss, chunked (``linear_cross_entropy``) against the full logits.

One frozen ``lm_head`` of SmolLM2's shape (hidden 576, vocab 49152) on ``--tokens`` supervised
positions (a fifth of them unlabelled), forward + backward of the per-token losses with a fixed
per-token gradient, fp32 on the CPU's threads:

- ``full``: ``F.linear`` + ``F.cross_entropy(reduction="none")`` under autograd (the whole
  (tokens, V) logits, their softmax and gradient exist at once);
- ``chunked N``: ``mlora.ops.linear_cross_entropy`` with ``chunk_rows(N, V)`` rows a chunk (the
  config key ``loss_chunk_mb``), the frozen-head path that forms the hidden gradient in forward.

The ways take turns, ``--repeat`` rounds in alternating order; median [min-max] seconds of each,
and its ratio to ``full`` paired per round. The matmul floor is the two (tokens, H) x (H, V)
products every way does, timed alone.

    python benchmarks/bench_head_loss.py
    python benchmarks/bench_head_loss.py --tokens 2048 --chunk-mb 32 64 128 --repeat 7
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mlora.ops.linear_cross_entropy import IGNORE_INDEX, chunk_rows, linear_cross_entropy


def make_ways(
    tokens: int, hidden: int, vocab: int, budgets: list[float]
) -> dict[str, Callable[[], None]]:
    """Each way's forward + backward on the same inputs."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, hidden, generator=generator) * hidden**-0.5
    states = torch.randn(tokens, hidden, generator=generator)
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    targets[::5] = IGNORE_INDEX
    grad = torch.rand(tokens, generator=generator)

    def full() -> None:
        x = states.clone().requires_grad_()
        logits = F.linear(x, weight)
        F.cross_entropy(logits, targets, reduction="none").backward(grad)

    def chunked(rows: int) -> Callable[[], None]:
        def run() -> None:
            x = states.clone().requires_grad_()
            linear_cross_entropy(x, weight, targets, rows).backward(grad)

        return run

    def floor() -> None:
        torch.mm(torch.mm(states, weight.T), weight)

    ways = {"full": full, "matmul floor": floor}
    for budget in budgets:
        ways[f"chunked {budget:g} MiB"] = chunked(chunk_rows(budget, vocab))
    return ways


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1100, help="supervised positions")
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--chunk-mb", type=float, nargs="+", default=[32.0, 64.0, 128.0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    ways = make_ways(args.tokens, args.hidden, args.vocab, args.chunk_mb)
    for run in ways.values():  # warm-up: allocator, kernels
        run()
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    order = list(ways)
    for round_index in range(args.repeat):
        for name in order if round_index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            ways[name]()
            seconds[name].append(time.perf_counter() - start)
    print(
        f"head loss: {args.tokens} tokens, hidden {args.hidden}, vocab {args.vocab}, fp32, "
        f"{torch.get_num_threads()} threads; forward + backward, {args.repeat} rounds"
    )
    for name, values in seconds.items():
        ratios = [f / v for f, v in zip(seconds["full"], values, strict=True)]
        print(
            f"  {name:18s} {statistics.median(values):.3f} s [{min(values):.3f}-"
            f"{max(values):.3f}]  full / this: {statistics.median(ratios):.2f}x "
            f"[{min(ratios):.2f}-{max(ratios):.2f}]"
        )


if __name__ == "__main__":
    main()
