"""Peak training memory and step time with gradient_checkpoint none / recompute / offload.

Builds a mid-size random LLaMA (no download), wraps it in ``MultiLoraModel`` with several LoRA
adapters (dropout on), and runs the trainer's step (one mixed batch: every adapter owns a
segment, ``segment_losses`` then one backward) with each mode, each mode in a fresh subprocess
so peaks don't mix. Checkpointing is applied exactly as the trainer applies it.

How memory is measured (the backend's ``memory_stats``):
- CUDA: the caching allocator's peak of allocated bytes (``max_memory_allocated``).
- CPU: the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``
  after a warm-up step), with glibc told to hand every block over 64 KiB straight back to the OS
  (``MALLOC_MMAP_THRESHOLD_``) so RSS follows the live tensors. The figure printed is the peak
  above the resident set right before the measured step (model, adapters, optimizer-free).
On CPU ``offload`` has nowhere to move activations (they already live in host memory), so it
measures the same as ``none``; it pays off on a GPU.

    python benchmarks/bench_checkpointing.py        # defaults below; minutes on 2 CPU cores
    python benchmarks/bench_checkpointing.py --device cuda --batch 8
    python benchmarks/bench_checkpointing.py --modes none recompute --steps 3   # the CPU trade

Time is the mean of ``--steps`` measured steps; tokens/s counts every token of the pass.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

MODES = ("none", "recompute", "offload")


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Warm up, then time ``args.steps`` training steps in this process; return peak growth."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mlora.adapters.spec import LoraSpec
    from mlora.batching.collate import collate
    from mlora.data.rows import TokenizedRow
    from mlora.hardware.backends import get_backend
    from mlora.model.multi_lora import MultiLoraModel
    from mlora.training.recompute import apply_gradient_checkpointing

    backend = get_backend(args.device)
    backend.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq,
    )
    model = MultiLoraModel(LlamaForCausalLM(config).to(backend.device))
    names = [f"adapter{i}" for i in range(args.adapters)]
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for name in names:
        model.add_adapter(name, LoraSpec(r=16, scaling=2.0, dropout=0.05, target_modules=targets))
    model.train()
    context = model.context  # recompute replays the adapters' draws under the pass's state
    apply_gradient_checkpointing(
        model.model, args.mode, backend, context.aux_losses, context.generators, context
    )
    rows_per_adapter = args.batch // args.adapters
    groups = []
    for name in names:
        rows = []
        for _ in range(rows_per_adapter):
            ids = torch.randint(0, args.vocab, (args.seq,)).tolist()
            prompt = args.seq // 4  # prompt tokens carry no label, as in instruction tuning
            rows.append(TokenizedRow(input_ids=ids, labels=[-100] * prompt + ids[prompt:]))
        groups.append((name, rows))
    batch = collate(groups, pad_token_id=0, device=backend.device)

    def step() -> None:
        model.segment_losses(batch).sum().backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: lazy initialisation, allocator caches, adapter grads' first allocation
    gc.collect()
    backend.synchronize()
    backend.empty_cache()
    baseline = backend.memory_stats()["allocated"]
    backend.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    backend.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    peak = backend.memory_stats()["peak"]
    return {"peak_growth": peak - baseline, "baseline": baseline, "step_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda|mps|cpu (default: automatic)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="rows per step, over all adapters")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()

    if args.mode is not None:
        print(json.dumps(measure(args)))
        return

    from mlora.hardware.backends import get_backend

    print(
        f"device={get_backend(args.device).device} hidden={args.hidden} layers={args.layers} "
        f"seq={args.seq} batch={args.batch} adapters={args.adapters} vocab={args.vocab} "
        f"steps={args.steps}"
    )
    tokens = args.batch // args.adapters * args.adapters * args.seq
    print(
        f"{'mode':<10} {'peak above baseline':>20} {'vs first':>8} {'step':>9} {'tokens/s':>9} "
        f"{'vs first':>8}"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    none: dict[str, float] = {}
    for mode in args.modes:  # the first is the reference of the ratios
        out = subprocess.run(
            [sys.executable, __file__, *_without_modes(sys.argv[1:]), "--mode", mode],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        none = none or r
        peak, seconds = r["peak_growth"], r["step_s"]
        print(
            f"{mode:<10} {peak / 2**20:>16.1f} MiB {peak / none['peak_growth']:>8.2f} "
            f"{seconds:>8.2f}s {tokens / seconds:>9.0f} {none['step_s'] / seconds:>8.2f}",
            flush=True,
        )


def _without_modes(argv: list[str]) -> list[str]:
    """The command line minus ``--modes ...`` (a child measures the one ``--mode`` it gets)."""
    out, skipping = [], False
    for arg in argv:
        if arg == "--modes":
            skipping = True
        elif skipping and not arg.startswith("--"):
            continue
        else:
            skipping = False
            out.append(arg)
    return out


if __name__ == "__main__":
    main()
