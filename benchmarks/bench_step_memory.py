"""Peak memory of one training step against the number of adapters N, at the same total tokens.

A tiny LLaMA (hidden 256, 4 layers, vocab 32000, random weights, no download) carries N LoRA
adapters (r=8 on every attention and MLP projection). One step packs the same 32 rows (lengths
16..80, long-tailed) split evenly over the N adapters, then runs forward, the per-adapter loss
and ONE backward, exactly as the trainer does (``collate`` + ``segment_losses``). Memory is
measured with the allocation-tracking probe of ``bench_lora_op.py`` (torch profiler, CPU):

- ``peak``: the most the step held at once, gradients included;
- ``kept``: what it still holds at the end (the adapters' gradients: they grow with N by design,
  ``adapter params`` shows the same number);
- ``peak-kept``: the step's temporaries (activations, buffers). The engine's goal: per token of
  the pass this does not grow with N. (The pass itself may grow a little: each adapter's rows
  are packed into bins of their own, so more adapters leave more bin tails as padding; the
  ``pass tokens`` column shows it.)

    python benchmarks/bench_step_memory.py            # N = 1, 4, 16
    python benchmarks/bench_step_memory.py --adapters 1 2 4 8 16 32

``--loss-chunk-mb`` sets the head's loss chunk budget (config ``loss_chunk_mb``; default 64,
0 = the full logits); several values measure each N under each, in the same run::

    python benchmarks/bench_step_memory.py --adapters 4 --vocab 49152 --rows 64 --loss-chunk-mb 0 32

``--rows-per-adapter R`` gives every adapter its own R rows instead (the step grows with N, as
when N adapters each bring their batch) and reports the step's peak per adapter, ``peak/N``,
and with the frozen base's weights shared by all (``base`` in the header), ``(base+peak)/N``::

    python benchmarks/bench_step_memory.py --adapters 1 2 4 8 16 --rows-per-adapter 8 --vocab 49152
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_lora_op import check_memory_probe, memory_of

from mlora.adapters.spec import LoraSpec
from mlora.batching.collate import collate
from mlora.data.rows import IGNORE_INDEX, TokenizedRow
from mlora.model.multi_lora import MultiLoraModel

MIB = 2**20
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build(adapters: int, vocab: int) -> MultiLoraModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4,
    )  # fmt: skip
    model = MultiLoraModel(LlamaForCausalLM(config))
    for i in range(adapters):
        model.add_adapter(f"a{i}", LoraSpec(r=8, scaling=2.0, dropout=0.05, target_modules=TARGETS))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.01)
    return model.train()


def rows(count: int, vocab: int) -> list[TokenizedRow]:
    """``count`` rows with long-tailed lengths (most short), half prompt, half answer."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for i in range(count):
        length = 16 + (64 if i % 8 == 0 else int(torch.randint(0, 24, (1,), generator=generator)))
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        out.append(TokenizedRow(ids, [IGNORE_INDEX] * (length // 2) + ids[length // 2 :]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--loss-chunk-mb", type=float, nargs="+", default=[32.0])
    parser.add_argument("--rows-per-adapter", type=int, default=0, help="0: --rows split over N")
    args = parser.parse_args()
    torch.set_num_threads(1)
    check_memory_probe()
    own = args.rows_per_adapter
    data = rows(own * max(args.adapters) if own else args.rows, args.vocab)
    if own:
        print(f"{own} rows per adapter, packed; CPU, fp32, vocab {args.vocab}")
    else:
        print(f"{args.rows} rows, {sum(map(len, data))} tokens per step, packed; CPU, fp32")
    print(
        f"{'N':>4} {'chunk MiB':>9} {'adapter params':>15} {'pass tokens':>12} {'peak MiB':>9} "
        f"{'kept MiB':>9} {'peak-kept':>10} {'KiB/token':>10} {'peak/N':>8} {'(base+peak)/N':>13}"
    )
    temporaries, peaks = {}, {}
    for n, chunk_mb in ((n, c) for n in args.adapters for c in args.loss_chunk_mb):
        model = build(n, args.vocab)
        model.loss_chunk_mb = chunk_mb
        per = own or args.rows // n
        groups = [(f"a{i}", data[i * per : (i + 1) * per]) for i in range(n)]
        params = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
        base = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)

        def step(model: MultiLoraModel = model, groups: list = groups) -> None:
            model.zero_grad(set_to_none=True)
            batch = collate(groups, pad_token_id=0, packed=True)
            model.segment_losses(batch).sum().backward()

        step()  # warm-up: lazy initialisations out of the measurement
        peak, kept, _ = memory_of(step)
        tokens = collate(groups, pad_token_id=0, packed=True).num_tokens  # padding included
        temporaries[n, chunk_mb], peaks[n, chunk_mb] = (peak - kept) / tokens, peak
        print(
            f"{n:>4} {chunk_mb:>9g} {params / MIB:>12.1f} MiB {tokens:>12} {peak / MIB:>9.1f} "
            f"{kept / MIB:>9.1f} {(peak - kept) / MIB:>10.1f} "
            f"{temporaries[n, chunk_mb] / 1024:>10.1f} {peak / n / MIB:>8.1f} "
            f"{(base + peak) / n / MIB:>13.1f}"
        )
    print(f"base weights (frozen, shared by the adapters): {base / MIB:.1f} MiB")
    first, last, chunk = args.adapters[0], args.adapters[-1], args.loss_chunk_mb[0]
    ratio = temporaries[last, chunk] / temporaries[first, chunk]
    print(f"temporaries per pass token, N={last} / N={first}: {ratio:.2f}x")
    for n, other in ((n, c) for n in args.adapters for c in args.loss_chunk_mb[1:]):
        ratio = peaks[n, other] / peaks[n, chunk]
        print(f"N={n}: peak with loss_chunk_mb={other:g} / with {chunk:g}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
