"""LoRA on a MoE base's experts: N adapters in one mlora pass vs PEFT one adapter at a time.

A random Mixtral-shaped model (no download). Each adapter targets q/k/v/o and, through
``target_parameters``, the fused experts and the router. Timed (forward + backward of the
summed token loss, median of ``--repeat`` after one warm-up) on the same rows:

- mlora, experts: every adapter's rows in one padded pass (``MultiLoraModel``, one layout);
- PEFT, experts: ``get_peft_model(LoraConfig(target_parameters=...))``, one pass per adapter
  over that adapter's rows (what training them one after another costs per step);
- mlora, attention only: the same pass with LoRA on q/k/v/o alone, so the experts run as the
  model's own implementation: what the experts LoRA adds on top.

    python benchmarks/bench_moe_experts.py
    python benchmarks/bench_moe_experts.py --adapters 8 --hidden 512 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import MixtralConfig, MixtralForCausalLM

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `import mlora` from a checkout that is not pip-installed

from mlora.adapters.spec import LoraSpec  # noqa: E402
from mlora.batching.layout import BatchLayout  # noqa: E402
from mlora.model.multi_lora import MultiLoraModel  # noqa: E402

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
TENSORS = ("experts.gate_up_proj", "experts.down_proj", "gate.weight")


def timed(step, repeat: int, device: torch.device) -> float:
    """Median seconds of ``step()`` over ``repeat`` runs after one warm-up."""
    times = []
    for index in range(repeat + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rows", type=int, default=4, help="rows per adapter")
    parser.add_argument("--length", type=int, default=64, help="tokens per row")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=1000, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
        num_local_experts=args.experts, num_experts_per_tok=2,
    )  # fmt: skip
    base = MixtralForCausalLM(config).to(device).eval()
    names = [f"a{i}" for i in range(args.adapters)]
    ids = torch.randint(1, 1000, (args.adapters * args.rows, args.length), device=device)
    mask = torch.ones_like(ids)
    layout = BatchLayout.from_row_adapters([n for n in names for _ in range(args.rows)])

    def mlora_step(targets: tuple[str, ...]):
        model = MultiLoraModel(copy.deepcopy(base)).train()
        for name in names:
            spec = LoraSpec(args.rank, 2.0, target_modules=ATTENTION, target_parameters=targets)
            model.add_adapter(name, spec)

        def step() -> None:
            model.zero_grad(set_to_none=True)
            model(ids, mask, layout).logits.float().logsumexp(-1).sum().backward()

        return step

    peft_config = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=list(ATTENTION),
        target_parameters=list(TENSORS),
    )  # fmt: skip
    peft_model = get_peft_model(copy.deepcopy(base), peft_config).train()

    def peft_step() -> None:
        for index in range(args.adapters):  # one adapter's rows per pass
            rows = slice(index * args.rows, (index + 1) * args.rows)
            peft_model.zero_grad(set_to_none=True)
            logits = peft_model(input_ids=ids[rows], attention_mask=mask[rows]).logits
            logits.float().logsumexp(-1).sum().backward()

    ours = timed(mlora_step(TENSORS), args.repeat, device)
    theirs = timed(peft_step, args.repeat, device)
    attention_only = timed(mlora_step(()), args.repeat, device)
    tokens = ids.numel()
    print(
        f"Mixtral-shaped, hidden {args.hidden}, {args.layers} layers, {args.experts} experts "
        f"top-2, rank {args.rank}; {args.adapters} adapters x {args.rows} rows x "
        f"{args.length} tokens; {device}, fp32, {torch.get_num_threads()} threads; "
        f"forward + backward, median of {args.repeat}"
    )
    rows = [
        ("mlora, experts + router + attention, one pass", ours),
        ("PEFT target_parameters, one pass per adapter", theirs),
        ("mlora, attention only, one pass", attention_only),
    ]
    for label, seconds in rows:
        print(f"  {label:48s} {seconds * 1000:9.1f} ms  {tokens / seconds:10.0f} tokens/s")
    print(f"  PEFT / mlora (experts): {theirs / ours:.2f}x")
    print(f"  mlora experts / mlora attention only: {ours / attention_only:.2f}x")


if __name__ == "__main__":
    main()
