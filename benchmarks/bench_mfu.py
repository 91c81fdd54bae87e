"""mlora's achieved FLOP/s on SmolLM2 against this machine's measured fp32 matmul peak.

One process measures, in order:

1. the matmul peak: fp32 ``torch.mm`` of two (S, S) matrices (default 4096), ``--mm-reps``
   times after a warm-up, best rep: ``2 S^3 / seconds``;
2. mlora's training throughput: SmolLM2-135M-Instruct (fp32) with ``--adapters`` LoRA adapters
   (r 16, dropout 0.05, all 7 projections) sharing each step, ``--rows`` rows of ``--seq``
   tokens per adapter (the first quarter prompt, unlabelled), the trainer's step (``collate``,
   ``segment_losses``, one backward, AdamW on the adapters); ``--warmup`` steps, then
   ``--steps`` timed;
3. the matmul rate again. On a shared machine both sides are noisy: the ratio is printed as
   best step over best matmul and as median over median.

Model FLOPs per step are ``benchmarks/common.py``'s ``window_flops``, the convention of the
other benchmarks: per real token 4 P (P: the frozen decoder linears; forward ``2 P`` +
backward ``2 P`` for the input gradient only: frozen weights get no weight gradient, so LoRA
costs ``4 P`` and not the ``6 P`` of full fine-tuning) + 6 n (the adapters' own weights:
forward, input and weight gradients); attention ``6 q_dim L(L+1)`` per row per layer (the
causal score and value products, forward x3 with backward); ``lm_head`` ``4 H V`` per
supervised token (mlora applies it to those alone). The ratio is achieved / measured peak.

    python benchmarks/bench_mfu.py --model smollm2
    python benchmarks/bench_mfu.py --model smollm2 --steps 6 --mm-size 4096 --mm-reps 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import window_flops
from smollm2 import DESCRIPTION, smollm2_folder

from mlora.adapters.spec import LoraSpec
from mlora.batching.collate import collate
from mlora.data.rows import IGNORE_INDEX, TokenizedRow
from mlora.model.loading import load_base_model
from mlora.model.multi_lora import MultiLoraModel

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def matmul_rates(size: int, reps: int) -> list[float]:
    """fp32 ``torch.mm`` FLOP/s of each of ``reps`` timed products (after one warm-up)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * size**3 / (time.perf_counter() - start))
    return rates


def training_rate(
    args: argparse.Namespace, folder: Path
) -> tuple[list[float], dict[str, int], int]:
    """(seconds of each timed step, FLOP-count stats of one step, tokens per step)."""
    base, _ = load_base_model(str(folder), torch.float32)
    model = MultiLoraModel(base)
    names = [f"a{i}" for i in range(args.adapters)]
    for name in names:
        model.add_adapter(name, LoraSpec(r=16, scaling=2.0, dropout=0.05, target_modules=TARGETS))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = base.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompt = args.seq // 4
    groups = []
    for name in names:
        rows = []
        for _ in range(args.rows):
            ids = torch.randint(3, vocab, (args.seq,), generator=generator).tolist()
            rows.append(TokenizedRow(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
        groups.append((name, rows))
    batch = collate(groups, pad_token_id=0)  # equal lengths: no padding

    def step() -> None:
        model.segment_losses(batch).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    rows = args.adapters * args.rows
    tokens = rows * args.seq
    stats = {
        "window_tokens": tokens,
        "window_len_sq": rows * args.seq * (args.seq + 1),
        "window_supervised": int(batch.targets.numel()),  # lm_head runs on these alone
    }
    return seconds, stats, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a model folder")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rows", type=int, default=2, help="rows per adapter per step")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--mm-size", type=int, default=4096)
    parser.add_argument("--mm-reps", type=int, default=5)
    args = parser.parse_args()
    folder = smollm2_folder() if args.model == "smollm2" else Path(args.model)
    name = DESCRIPTION if args.model == "smollm2" else folder.name
    print(f"{name}: torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU")
    rates = matmul_rates(args.mm_size, args.mm_reps)
    seconds, stats, tokens = training_rate(args, folder)
    rates += matmul_rates(args.mm_size, args.mm_reps)
    flops = window_flops(folder, stats, 16, TARGETS)
    print(
        f"matmul (fp32 mm {args.mm_size}^3, {args.mm_reps} before + {args.mm_reps} after "
        f"training): best {max(rates) / 1e9:.1f}, median {statistics.median(rates) / 1e9:.1f} "
        "GFLOP/s"
    )
    print(
        f"mlora: {args.adapters} adapters x {args.rows} rows x {args.seq} tokens = {tokens} "
        f"tokens/step, {stats['window_supervised']} supervised; step best {min(seconds):.2f} s, "
        f"median {statistics.median(seconds):.2f} s = {tokens / min(seconds):.0f} / "
        f"{tokens / statistics.median(seconds):.0f} tokens/s"
    )
    print(
        f"model FLOPs: {flops / tokens / 1e6:.1f} MFLOP/token (4P frozen fwd+input-grad, "
        "6n adapters, causal attention, lm_head on supervised tokens)"
    )
    best = flops / min(seconds) / max(rates)
    median = flops / statistics.median(seconds) / statistics.median(rates)
    print(
        f"achieved {flops / min(seconds) / 1e9:.1f} GFLOP/s (best step) = {best:.1%} of the best "
        f"matmul; median step / median matmul: {median:.1%}"
    )


if __name__ == "__main__":
    main()
