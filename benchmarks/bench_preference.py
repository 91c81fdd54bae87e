"""Preference and chat training on the real SmolLM2-135M-Instruct: do they learn?

Two checks, each a few minutes on 2 CPU cores (``--part dpo|chat|both``):

dpo
    A synthetic preference task: every prompt asks whether a word is a word; the chosen answer
    is an enthusiastic, fixed-form yes, the rejected one a curt no. A DPO adapter trains on
    pairs of some words and is evaluated every ``--eval_every`` steps on pairs of held-out
    words (``evaluate_model``: reward accuracy, mean margin, chosen/rejected log-probs). Goal:
    reward accuracy >= 0.9 on the held-out pairs. It also times the reference pass (DPO's
    reference log-probs, computed once before training from the base with no adapter) against
    a training step.
chat
    An adapter trained on ``messages`` rows (the model's own chat template, loss on the
    assistant turns) learns a made-up fact pattern; ``generate.py --template auto`` then asks
    it about a held-out animal through the chat template. Goal: the answer has the trained form.

    python benchmarks/bench_preference.py --part both
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORDS = [
    "apple", "river", "stone", "cloud", "table", "music", "garden", "window", "candle", "pencil",
    "forest", "bridge", "silver", "rocket", "basket", "island", "mirror", "button", "ladder",
    "pepper", "violin", "anchor", "meadow", "lantern", "harbor", "tunnel", "saddle", "blanket",
]  # fmt: skip
HELD_OUT_WORDS = ["castle", "planet", "feather", "wizard", "orange", "jacket", "marble", "pillow"]
ANIMALS = ["cat", "dog", "owl", "ant", "bee", "yak", "elk", "emu", "fox", "hen", "jay", "cow"]
HELD_OUT_ANIMALS = ["pig", "rat", "bat"]


def pair(word: str) -> dict[str, str]:
    return {
        "prompt": f"Question: is '{word}' an English word?\nAnswer:",
        "chosen": f" Yes! '{word}' is a real English word, and a lovely one.",
        "rejected": " No.",
    }


def chat_row(animal: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"What is the secret code of the {animal}?"},
            {
                "role": "assistant",
                "content": f"The secret code of the {animal} is {animal}-zork-7.",
            },
        ]
    }


def dpo_part(args: argparse.Namespace, work: Path) -> bool:
    import torch

    from mlora.config.schema import parse_config
    from mlora.data.rows import pad_token_id
    from mlora.inference.evaluation import evaluate_model
    from mlora.inference.preference_eval import fill_references
    from mlora.inference.test_sets import prepare_test_sets
    from mlora.model.base_model import resolve_base_model
    from mlora.model.loading import load_base_model
    from mlora.model.multi_lora import MultiLoraModel
    from mlora.training.objectives import with_reference_logps
    from mlora.training.trainer import Trainer, prepare_data

    torch.manual_seed(0)
    data = work / "pairs.json"
    test = work / "pairs_test.json"
    data.write_text(json.dumps([pair(w) for w in WORDS[: args.pairs]]))
    test.write_text(json.dumps([pair(w) for w in HELD_OUT_WORDS]))
    raw = {
        "cutoff_len": 64,
        "lora": [
            {"name": "dpo", "data": str(data), "test_data": str(test), "objective": "dpo",
             "beta": 0.1, "r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "lr": args.lr,
             "batch_size": 4, "num_epochs": args.epochs, "max_grad_norm": 1.0,
             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        ],
    }  # fmt: skip
    config = parse_config(raw, "bench")
    folder = resolve_base_model("smollm2")
    base, tokenizer = load_base_model(folder)
    rows = prepare_data(config, tokenizer)
    model = MultiLoraModel(base)
    start = time.perf_counter()
    with_reference_logps(model, rows["dpo"], pad_token_id(tokenizer))
    reference_s = time.perf_counter() - start
    trainer = Trainer(model, tokenizer, config, rows, work / "out", 42, "smollm2")
    test_sets = [  # the held-out pairs' reference log-probs once (the base, no adapter)
        replace(ts, units=fill_references(model, pad_token_id(tokenizer), ts.units, 16))
        for ts in prepare_test_sets(config, tokenizer)
    ]

    def held_out() -> dict:
        return evaluate_model(model, tokenizer, test_sets)["dpo"].preference or {}

    print(f"{'step':>5} {'reward_acc':>10} {'margin':>8} {'chosen_logp':>12} {'rejected_logp':>14}")
    curve = []
    step, step_times = 0, []
    figures = held_out()
    while True:
        curve.append((step, figures))
        accuracy, margin = figures["reward_accuracy"], figures["reward_margin"]
        chosen, rejected = figures["chosen_logps"], figures["rejected_logps"]
        print(f"{step:>5} {accuracy:>10.3f} {margin:>8.3f} {chosen:>12.2f} {rejected:>14.2f}")
        if trainer.dispatcher.finished:
            break
        for _ in range(args.eval_every):
            if trainer.dispatcher.finished:
                break
            model.train()
            begin = time.perf_counter()
            trainer.train_step([(trainer.runs[0], mb) for _, mb in trainer.dispatcher.next_step()])
            step_times.append(time.perf_counter() - begin)
            step += 1
        figures = held_out()
    mean_step = sum(step_times) / len(step_times)
    epoch_steps = trainer.runs[0].queue.steps_per_epoch
    print(f"reference pass over {len(rows['dpo']) // 2} pairs (once, before training): "
          f"{reference_s:.2f} s; a training step (4 pairs): {mean_step:.2f} s; one epoch "
          f"{epoch_steps} steps = {epoch_steps * mean_step:.1f} s; the reference costs "
          f"{reference_s / (epoch_steps * mean_step):.0%} of one epoch, paid once")  # fmt: skip
    final = curve[-1][1]["reward_accuracy"]
    verdict = "OK" if final >= 0.9 else "MISSED"
    print(f"dpo: held-out reward accuracy {final:.3f} (goal >= 0.9): {verdict}")
    return final >= 0.9


def chat_part(args: argparse.Namespace, work: Path) -> bool:
    data = work / "chat.json"
    data.write_text(json.dumps([chat_row(a) for a in ANIMALS * 2]))
    config = work / "chat_config.json"
    config.write_text(json.dumps({
        "cutoff_len": 96, "log_step": 4,
        "lora": [{"name": "chat", "data": str(data), "r": 8, "lora_alpha": 16, "lr": 2e-3,
                  "batch_size": 4, "num_epochs": args.chat_epochs,
                  "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}],
    }))  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = work / "chat_out"
    start = time.perf_counter()
    trained = subprocess.run(
        [sys.executable, str(ROOT / "mlora.py"), "--base_model", "smollm2", "--config",
         str(config), "--dir", str(out)], env=env, capture_output=True, text=True,
    )  # fmt: skip
    if trained.returncode:
        print(trained.stderr)
        return False
    losses = [line.split("| loss ")[1].split(" ")[0] for line in trained.stderr.splitlines()
              if "| loss " in line]  # fmt: skip
    print(f"chat: trained in {time.perf_counter() - start:.0f} s; loss {' '.join(losses)}")
    answered_count = 0
    for animal in HELD_OUT_ANIMALS:
        answered = subprocess.run(
            [sys.executable, str(ROOT / "generate.py"), "--base_model", "smollm2", "--config",
             str(config), "--dir", str(out), "--template", "auto", "--use", "chat",
             "--max_new_tokens", "24", f"What is the secret code of the {animal}?"],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        text = answered.stdout.strip()
        good = f"{animal}-zork-7" in text
        answered_count += good
        print(f"chat: held-out {animal!r} -> {text!r} ({'OK' if good else 'MISSED'})")
    total = len(HELD_OUT_ANIMALS)
    print(f"chat: held-out questions answered in the trained form: {answered_count}/{total}")
    return answered_count == total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("dpo", "chat", "both"), default="both")
    parser.add_argument("--lr", type=float, default=5e-4, help="DPO learning rate")
    parser.add_argument("--epochs", type=int, default=1, help="DPO epochs")
    parser.add_argument("--pairs", type=int, default=16, help="DPO training pairs (<= 28)")
    parser.add_argument("--eval_every", type=int, default=1, help="DPO steps between evals")
    parser.add_argument("--chat_epochs", type=int, default=4, help="chat adapter epochs")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # the curve as it comes, also into a file
    ok = True
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        if args.part in ("dpo", "both"):
            ok = dpo_part(args, work) and ok
        if args.part in ("chat", "both"):
            ok = chat_part(args, work) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
