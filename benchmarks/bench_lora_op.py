"""Segmented LoRA op: forward+backward time and memory against the number of segments G.

One step is a frozen base linear layer plus G adapters on G equal segments of T tokens:
``out = x @ W.T + delta`` with x (T, D) requiring grad, then ``out.backward(grad)`` with a fixed
random (T, D) gradient. ``delta`` comes from each implementation:

- ``old``: the historic MultiLoraLinear: slice every segment of x and of the base output y, add
  that segment's LoRA delta, ``torch.cat`` the pieces;
- ``loop``, ``grouped``, ``function``: ``mlora.ops.segmented_lora`` with that ``impl``.

Memory is measured on CPU with ``torch.profiler.profile(profile_memory=True)``, which records
every allocation and free of the CPU allocator with its address and size. Walking them in time
order, a free counting only if the step made that allocation, gives the bytes the step holds at
each moment:

- ``peak``: their maximum. It includes x.grad and the adapters' gradients, which the step keeps;
- ``kept``: the bytes held at the end (those gradients; the adapters' grow with G for every
  implementation alike);
- ``peak-kept``: what the step held at its peak beyond what it keeps: its temporaries;
- ``allocated``: the sum of all the step's allocations, i.e. allocator churn, not a peak.

``check_memory_probe`` validates the method on a known pattern first. It counts CPU allocator
blocks exactly; it does not model a CUDA caching allocator's fragmentation.

Time is the median over ``--repeats`` unprofiled steps after two warm-up steps, with the spread
(max - min) / median. The machine may be shared and busy: timings are noisy, memory is not.
One intra-op thread by default: on a busy 2-core machine two OpenMP threads stall each other
on every small op (the loop took ~1 s instead of ~12 ms per step there).

    python benchmarks/bench_lora_op.py                              # T=1024, D=256, r=16
    python benchmarks/bench_lora_op.py --tokens 128 --repeats 3     # quick check
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from mlora.ops import segmented_lora

MIB = 2**20
IMPLS = ("old", "loop", "grouped", "function")


def memory_of(step: Callable[[], None]) -> tuple[int, int, int]:
    """(peak, kept, allocated) bytes of the CPU allocations that ``step`` makes.

    Frees are matched to allocations by address, so blocks allocated before the step (such as the
    previous step's gradients, freed here by ``grad = None``) do not count.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    nodes, events = list(prof.profiler.kineto_results.experimental_event_tree()), []
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, len(events), node.extra_fields))
    sizes: dict[int, int] = {}  # address -> bytes of the step's live blocks
    live = peak = allocated = 0
    for _, _, fields in sorted(events):
        if fields.alloc_size > 0:
            sizes[fields.ptr] = fields.alloc_size
            live += fields.alloc_size
            allocated += fields.alloc_size
            peak = max(peak, live)
        elif fields.ptr in sizes:
            live -= sizes.pop(fields.ptr)
    return peak, live, allocated


def check_memory_probe() -> None:
    """The probe must see exactly a known pattern, ignoring a block allocated before it."""
    kept: list[torch.Tensor] = [torch.empty(5 * MIB, dtype=torch.uint8)]

    def pattern() -> None:
        kept.pop()  # freed here, allocated before: not the pattern's
        a = torch.empty(3 * MIB, dtype=torch.uint8)
        b = torch.empty(1 * MIB, dtype=torch.uint8)
        del a
        c = torch.empty(2 * MIB, dtype=torch.uint8)
        kept.append(c)
        del b

    measured = memory_of(pattern)
    assert measured == (4 * MIB, 2 * MIB, 6 * MIB), measured


def old_layer(
    x: torch.Tensor,
    y: torch.Tensor,
    segments: list[tuple[int, int]],
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scales: list[float],
) -> torch.Tensor:
    """The historic MultiLoraLinear forward: per-segment slices of x and y, then torch.cat."""
    pieces, cursor = [], 0
    for (start, end), a, b, scale in zip(segments, lora_a, lora_b, scales, strict=True):
        if start > cursor:
            pieces.append(y[cursor:start])
        delta = torch.nn.functional.linear(torch.nn.functional.linear(x[start:end], a), b) * scale
        pieces.append(y[start:end] + delta)
        cursor = end
    if cursor < y.shape[0]:
        pieces.append(y[cursor:])
    return torch.cat(pieces)


def make_step(impl: str, tokens: int, dim: int, rank: int, groups: int) -> Callable[[], None]:
    """One forward+backward of the base layer plus ``groups`` adapters with ``impl``."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, dim, generator=generator, requires_grad=True)
    weight = torch.randn(dim, dim, generator=generator) / dim**0.5  # frozen base
    lora_a = [
        torch.randn(rank, dim, generator=generator, requires_grad=True) for _ in range(groups)
    ]
    lora_b = [
        torch.randn(dim, rank, generator=generator, requires_grad=True) for _ in range(groups)
    ]
    scales = [2.0] * groups
    step_len = tokens // groups
    segments = [(g * step_len, (g + 1) * step_len) for g in range(groups)]
    grad = torch.randn(tokens, dim, generator=generator)
    leaves = [x, *lora_a, *lora_b]

    def step() -> None:
        for leaf in leaves:
            leaf.grad = None  # every step allocates its gradients, as after zero_grad()
        y = x @ weight.T  # (T, D)
        if impl == "old":
            out = old_layer(x, y, segments, lora_a, lora_b, scales)
        else:
            out = y + segmented_lora(x, segments, lora_a, lora_b, scales, impl)
        out.backward(grad)

    return step


def time_of(step: Callable[[], None], repeats: int) -> tuple[float, float]:
    """(median seconds, (max - min) / median) over ``repeats`` steps after two warm-up steps."""
    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return median, (max(times) - min(times)) / median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="T, tokens in the batch")
    parser.add_argument("--dim", type=int, default=256, help="in = out features")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of every adapter")
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4, 16, 64], help="G values")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    check_memory_probe()
    print(
        f"T={args.tokens} in=out={args.dim} r={args.rank} fp32, CPU, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    header = ("impl", "G", "ms", "spread", "peak MiB", "kept MiB", "peak-kept", "alloc MiB")
    print("{:>9} {:>3} {:>8} {:>7} {:>9} {:>9} {:>10} {:>10}".format(*header))
    measured: dict[tuple[str, int], tuple[int, int, int]] = {}
    for impl in IMPLS:
        for groups in args.groups:
            step = make_step(impl, args.tokens, args.dim, args.rank, groups)
            seconds, spread = time_of(step, args.repeats)
            peak, kept, allocated = measured[impl, groups] = memory_of(step)
            print(
                f"{impl:>9} {groups:>3} {seconds * 1e3:8.2f} {spread:7.0%} {peak / MIB:9.2f} "
                f"{kept / MIB:9.2f} {(peak - kept) / MIB:10.2f} {allocated / MIB:10.2f}"
            )
    if {4, 64} <= set(args.groups):
        print("G=64 / G=4:")
        for impl in IMPLS:
            (peak64, kept64, alloc64), (peak4, kept4, alloc4) = (
                measured[impl, 64],
                measured[impl, 4],
            )
            print(
                f"{impl:>9}  peak {peak64 / peak4:5.2f}x  "
                f"peak-kept {(peak64 - kept64) / (peak4 - kept4):5.2f}x  "
                f"allocated {alloc64 / alloc4:5.2f}x"
            )


if __name__ == "__main__":
    main()
