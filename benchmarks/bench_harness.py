"""lm-evaluation-harness on SmolLM2-135M: ``--model mlora`` against the harness's own ``hf``
model with a PEFT LoRA (the same numbers?) and several adapters in one run (how much faster?).

Both sides run the harness's ``simple_evaluate`` on two local tasks over the same rows: a
multiple-choice task (``acc``, ``acc_norm``: 4 choices per question) and a generation task
(``exact_match``), and on one LoRA with random non-zero B saved by PEFT. Printed: the largest
log-likelihood difference over every request, the metrics of both, whether every generation is
the same text, and the wall time. In fp32 the two sides differ by the rounding of 30 fp32
layers done in different orders (each is printed against the hf model in fp64); ``--dtype
fp64`` loads the base in float64 on both sides, where they agree within 1e-5. ``--exact``
scores mlora's side in the hf model's own shapes (``exact=true``: its batches and padding at the
same ``--batch_size``), where the two agree bit for bit.

Then ``--adapters K`` LoRAs: ``--model mlora`` scores all K in one session (each request of the
first harness run answered by every adapter in the same batches; the K harness reports come out
of one model load) against K runs of ``--model hf ... peft=`` one adapter each.

    python benchmarks/bench_harness.py --rows 40 --dtype fp32 --adapters 3
    python benchmarks/bench_harness.py --rows 40 --dtype fp32 --adapters 0 --exact
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=40, help="questions per task (%(default)s)")
    parser.add_argument("--gen_rows", type=int, default=20, help="generation rows (%(default)s)")
    parser.add_argument("--dtype", choices=("fp32", "fp64"), default="fp32")
    parser.add_argument("--batch_size", type=int, default=8, help="requests per pass")
    parser.add_argument("--adapters", type=int, default=3, help="LoRAs for the timing (0: skip)")
    parser.add_argument(
        "--exact", action="store_true", help="mlora scores in the hf model's shapes (exact=true)"
    )
    return parser.parse_args()


def question_rows(count: int) -> list[dict[str, Any]]:
    """Arithmetic questions in the allenai/ai2_arc schema, the right answer at a varying place."""
    rows = []
    for i in range(count):
        a, b = i % 7 + 1, (3 * i) % 5 + 1
        texts = [str(a + b), str(a + b + 1), str(a + b - 1), str(2 * (a + b))]
        k = i % 4
        texts[0], texts[k] = texts[k], texts[0]
        rows.append(
            {
                "id": str(i),
                "question": f"What is {a} plus {b}?",
                "choices": {"text": texts, "label": list("ABCD")},
                "answerKey": "ABCD"[k],
                "answer": str(a + b),
            }
        )
    return rows


def write_tasks(folder: Path, rows: Path, gen_rows: Path) -> list[str]:
    """``bench_mc`` (multiple choice) and ``bench_gen`` (generation), local YAML over JSON."""

    def data(path: Path) -> dict[str, Any]:
        return {"dataset_path": "json", "test_split": "test",
                "dataset_kwargs": {"data_files": {"test": str(path)}}}  # fmt: skip

    tasks = {
        "bench_mc": {
            **data(rows), "output_type": "multiple_choice",
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_target": "{{choices.label.index(answerKey)}}",
            "doc_to_choice": "{{choices.text}}",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
        },
        "bench_gen": {
            **data(gen_rows), "output_type": "generate_until",
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_target": " {{answer}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
            "metric_list": [{"metric": "exact_match"}],
        },
    }  # fmt: skip
    for name, config in tasks.items():
        (folder / f"{name}.yaml").write_text(json.dumps({"task": name, **config}))
    return list(tasks)


def save_lora(base: Any, folder: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(seed)  # PEFT draws lora_A from the global generator
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=targets)
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.02 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(folder)
    return folder


def answers(results: dict[str, Any], task: str) -> list[Any]:
    return [resp[0] for sample in results["samples"][task] for resp in sample["resps"]]


def metrics(results: dict[str, Any], task: str) -> str:
    values = results["results"][task]
    return ", ".join(f"{k.split(',')[0]} {float(v):.4f}" for k, v in values.items()
                     if k.endswith(",none") and "stderr" not in k)  # fmt: skip


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from smollm2 import DESCRIPTION, smollm2_folder
    from transformers import AutoModelForCausalLM

    from mlora.inference.harness_model import MloraLM, session_for
    from mlora.inference.harness_run import run_tasks
    from mlora.inference.harness_tasks import PlannedTask
    from mlora.inference.trained import attach_adapter
    from mlora.model.loading import load_tokenizer
    from mlora.model.multi_lora import MultiLoraModel

    folder = smollm2_folder()
    dtype = torch.float64 if args.dtype == "fp64" else torch.float32
    work = Path(tempfile.mkdtemp(prefix="bench-harness-"))
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    loras = [save_lora(base, work / f"lora{i}", seed=i) for i in range(max(args.adapters, 1))]
    rows = question_rows(args.rows)
    (work / "rows.json").write_text(json.dumps(rows))
    (work / "gen.json").write_text(json.dumps(rows[: args.gen_rows]))
    names = write_tasks(work, work / "rows.json", work / "gen.json")
    manager = TaskManager(include_path=str(work), include_defaults=False)
    tokenizer = load_tokenizer(str(folder))

    def evaluate(model: Any, tasks: list[str]) -> tuple[dict[str, Any], float]:
        start = time.perf_counter()
        out = simple_evaluate(model=model, tasks=tasks, task_manager=manager,
                              log_samples=True, bootstrap_iters=0)  # fmt: skip
        return out, time.perf_counter() - start

    def hf(lora: Path) -> Any:
        dtype_name = args.dtype.replace("fp", "float")
        return HFLM(pretrained=str(folder), peft=str(lora), device="cpu",
                    batch_size=args.batch_size, dtype=dtype_name)  # fmt: skip

    def hf64(lora: Path) -> Any:
        return HFLM(pretrained=str(folder), peft=str(lora), device="cpu",
                    batch_size=args.batch_size, dtype="float64")  # fmt: skip

    def mlora_session(adapters: list[Path]) -> Any:
        model = MultiLoraModel(AutoModelForCausalLM.from_pretrained(folder, dtype=dtype))
        for i, path in enumerate(adapters):
            attach_adapter(model, f"lora{i}", path)
        labels = [f"lora{i}" for i in range(len(adapters))]
        return session_for(model, tokenizer, labels, batch_size=args.batch_size, exact=args.exact)

    theirs, hf_time = evaluate(hf(loras[0]), names)
    ours, our_time = evaluate(MloraLM(session=mlora_session(loras[:1])), names)
    mode = "exact (hf shapes)" if args.exact else "packed"
    print(f"{DESCRIPTION}, {args.dtype}, {args.rows} questions x 4 choices, "
          f"{args.gen_rows} generations, batch {args.batch_size}, mlora {mode}")  # fmt: skip
    mine, reference = answers(ours, "bench_mc"), answers(theirs, "bench_mc")
    worst = max(abs(a[0] - b[0]) for a, b in zip(mine, reference, strict=True))
    greedy = sum(a[1] == b[1] for a, b in zip(mine, reference, strict=True))
    print(f"  loglikelihood: max |mlora - hf| = {worst:.2e} over {len(mine)} requests; "
          f"greedy flags equal {greedy}/{len(mine)}")  # fmt: skip
    generated = zip(answers(ours, "bench_gen"), answers(theirs, "bench_gen"), strict=True)
    texts = sum(a == b for a, b in generated)
    if args.dtype == "fp32":  # how far each side is from the same model in fp64 (the harness's)
        exact = evaluate(hf64(loras[0]), ["bench_mc"])[0]
        truth = [a[0] for a in answers(exact, "bench_mc")]
        for side, got in (("mlora", mine), ("hf", reference)):
            off = max(abs(a[0] - b) for a, b in zip(got, truth, strict=True))
            print(f"  {side} fp32 vs hf fp64: max {off:.2e}")
    print(f"  generations equal: {texts}/{args.gen_rows}")
    for task in names:
        print(f"  {task}: mlora {metrics(ours, task)} | hf {metrics(theirs, task)}")
    print(f"  time: mlora {our_time:.1f} s, hf {hf_time:.1f} s (model loads excluded)")
    if args.adapters < 2:
        return
    planned = [PlannedTask("bench_mc", "bench_mc")]
    start = time.perf_counter()  # both sides: model loads included
    session = mlora_session(loras)
    run_tasks(session, dict.fromkeys(session.labels, planned), manager=manager)
    together = time.perf_counter() - start
    start = time.perf_counter()
    for lora in loras:
        evaluate(hf(lora), ["bench_mc"])
    separate = time.perf_counter() - start
    print(f"  {args.adapters} adapters on bench_mc: mlora one session {together:.1f} s, "
          f"hf {args.adapters} runs {separate:.1f} s, "
          f"ratio {separate / together:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
