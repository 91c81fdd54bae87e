"""Generation with 4 adapters: one mixed batch vs one batch per adapter (mlora and PEFT).

Setup (not timed): a random LLaMA (built here, no download), 4 LoRA adapters with random
weights saved in PEFT format, ``--prompts`` prompts per adapter.

Measured (greedy, ``--new`` tokens per row, model already loaded, best of ``--repeat``):

1. mlora, all 4 adapters' rows side by side in ONE ``generate`` call;
2. mlora, 4 ``generate`` calls, one adapter each;
3. PEFT, 4 ``set_adapter`` + ``generate`` calls, one adapter each (the usual PEFT way);
4. PEFT's own mixed batch (``generate(adapter_names=...)``) as a second reference.

Also checks that (1) and (3) produce the same tokens. Prints times and ratios.

    python benchmarks/bench_generation.py [--hidden 512 --layers 4 --vocab 32000 --prompts 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.toy_tasks import build_model  # noqa: E402
from mlora.adapters.spec import LoraSpec  # noqa: E402
from mlora.inference.generation import GenerationRequest, SamplingParams, generate  # noqa: E402
from mlora.inference.trained import load_trained  # noqa: E402
from mlora.model.multi_lora import MultiLoraModel  # noqa: E402
from mlora.persistence.adapter_files import peft_config, save_adapter  # noqa: E402

NAMES = ("a", "b", "c", "d")


def make_adapters(model_dir: Path, out: Path) -> None:
    """Four adapters with random (non-zero) A and B, saved as PEFT folders."""
    from transformers import AutoModelForCausalLM

    model = MultiLoraModel(AutoModelForCausalLM.from_pretrained(model_dir))
    torch.manual_seed(1)
    for i, name in enumerate(NAMES):
        spec = LoraSpec(r=8 + 4 * i, scaling=2.0, target_modules=("q_proj", "v_proj", "o_proj"))
        model.add_adapter(name, spec)
        for _, module in model.adapter_modules(name):
            torch.nn.init.normal_(module.lora_B.weight, std=0.02)
        save_adapter(model, name, out / name, peft_config(spec, None))


def best_of(repeat: int, fn) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompts", type=int, default=8, help="Prompts per adapter.")
    parser.add_argument("--new", type=int, default=32, help="New tokens per row.")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_model(folder / "model", args.hidden, args.layers, args.vocab)
        make_adapters(folder / "model", folder / "adapters")
        model, tokenizer = load_trained(
            str(folder / "model"), {n: folder / "adapters" / n for n in NAMES}, device=args.device
        )
        prompts = [f"Question {i}: what is {i} plus {i * 7 % 5}?" for i in range(args.prompts)]
        requests = [GenerationRequest(p, n) for n in NAMES for p in prompts]
        params = SamplingParams(max_new_tokens=args.new)

        mixed_s, mixed = best_of(args.repeat, lambda: generate(model, tokenizer, requests, params))
        separate_s, _ = best_of(
            args.repeat,
            lambda: [
                generate(model, tokenizer, [r for r in requests if r.adapter == n], params)
                for n in NAMES
            ],
        )

        base = AutoModelForCausalLM.from_pretrained(folder / "model").to(args.device).eval()
        peft = PeftModel.from_pretrained(base, folder / "adapters" / NAMES[0], adapter_name="a")
        for name in NAMES[1:]:
            peft.load_adapter(folder / "adapters" / name, adapter_name=name)
        batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        batch = {k: v.to(args.device) for k, v in batch.items()}
        common = dict(max_new_tokens=args.new, do_sample=False, pad_token_id=tokenizer.pad_token_id)

        def peft_separate() -> list[list[int]]:
            rows = []
            with torch.inference_mode():
                for name in NAMES:
                    peft.set_adapter(name)
                    out = peft.generate(**batch, **common)
                    rows += out[:, batch["input_ids"].shape[1] :].tolist()
            return rows

        def peft_mixed() -> None:
            names = [n for n in NAMES for _ in prompts]
            mixed_batch = {k: v.repeat(len(NAMES), 1) for k, v in batch.items()}
            with torch.inference_mode():
                peft.generate(**mixed_batch, adapter_names=names, **common)

        peft_s, peft_rows = best_of(args.repeat, peft_separate)
        peft_mixed_s, _ = best_of(args.repeat, peft_mixed)

    same = all(
        o.token_ids == row[: len(o.token_ids)] for o, row in zip(mixed, peft_rows, strict=True)
    )
    rows = len(requests)
    print(
        f"model hidden={args.hidden} layers={args.layers} vocab={args.vocab}, {len(NAMES)} "
        f"adapters x {args.prompts} prompts, {args.new} new tokens, {args.device}"
    )
    print(f"mlora mixed batch ({rows} rows, 1 call):  {mixed_s:7.3f} s")
    print(f"mlora one call per adapter (4 calls):    {separate_s:7.3f} s")
    print(f"PEFT set_adapter + generate per adapter: {peft_s:7.3f} s")
    print(f"PEFT mixed batch (adapter_names):        {peft_mixed_s:7.3f} s")
    print(f"per-adapter / mixed: mlora {separate_s / mixed_s:.2f}x, PEFT {peft_s / mixed_s:.2f}x")
    print(f"mixed-batch tokens equal PEFT per-adapter tokens: {same}")


if __name__ == "__main__":
    main()
