"""Two synthetic tasks trained at once are both learned, and stay apart.

Both tasks see the same kind of prompt (a word); task "yes" always answers "yes", task "no"
always answers "no". Only the adapter tells them apart, so a held-out check that each adapter
answers its own word on unseen inputs shows both learned and that segments did not bleed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mlora.batching.layout import BatchLayout
from tests.conftest import make_model, make_tokenizer
from tests.helpers import run_in_memory, write_json, write_template

TRAIN_WORDS = ["cat", "dog", "owl", "ant", "bee", "yak", "elk", "emu", "fox", "gnu", "hen", "jay"]
HELD_OUT = ["cow", "pig", "rat", "bat"]


def greedy(
    model, tokenizer, prompts: list[str], adapters: list[str | None], steps: int
) -> list[str]:
    """Plain greedy decoding with full recomputation: the simplest possible reference."""
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    for _ in range(steps):
        width = max(map(len, ids))
        batch = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        with torch.no_grad():
            logits = model(batch, mask, BatchLayout.from_row_adapters(adapters)).logits[:, -1]
        ids = [[*x, int(t)] for x, t in zip(ids, logits.argmax(-1), strict=True)]
    return [
        tokenizer.decode(x[len(tokenizer(p)["input_ids"]) :])
        for x, p in zip(ids, prompts, strict=True)
    ]


def test_two_tasks_learned_at_once(tmp_path: Path) -> None:
    tokenizer = make_tokenizer()
    template = write_template(tmp_path)
    answers = {"yes": "yes", "no": "no"}
    adapters = [
        {
            "name": name,
            "data": write_json(
                tmp_path / f"{name}.json",
                [{"instruction": "w", "input": w, "output": answer} for w in TRAIN_WORDS],
            ),
            "prompt": template,
            "r": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.0,
            "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
            "batch_size": 4,
            "num_epochs": 6,
            "lr": 2e-2,
        }
        for name, answer in answers.items()
    ]
    trainer = run_in_memory(
        lambda: make_model(vocab_size=len(tokenizer), init_range=0.2),
        tokenizer,
        {"cutoff_len": 32, "log_step": 3, "lora": adapters},
        tmp_path / "out",
    )
    model = trainer.model.eval()
    for run in trainer.runs:
        assert run.history[-1] < 0.5 * run.history[0], (run.name, run.history)
    prompts = [f"w {w}=" for w in HELD_OUT]
    for name, answer in answers.items():
        outputs = greedy(model, tokenizer, prompts, [name] * len(prompts), steps=len(answer) + 1)
        assert all(o.startswith(answer + tokenizer.eos_token) for o in outputs), (name, outputs)
    base = greedy(model, tokenizer, prompts, [None] * len(prompts), steps=3)
    assert not any(o.startswith(("yes", "no")) for o in base)
