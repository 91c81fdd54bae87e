"""Four synthetic instruction tasks and a small random LLaMA for the evaluation and generation
benchmarks (built here, no download; the test suite's character tokenizer)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import make_tokenizer  # noqa: E402  (the test suite's offline tokenizer)

TASKS: dict[str, Callable[[int], dict[str, str]]] = {
    "add": lambda i: {
        "instruction": "Add.",
        "input": f"{i % 13} {i % 7}",
        "output": str(i % 13 + i % 7),
    },
    "rev": lambda i: {"instruction": "Reverse.", "input": f"w{i}x", "output": f"x{i}w"[::-1]},
    "len": lambda i: {
        "instruction": "Length?",
        "input": "a" * (i % 9 + 1),
        "output": str(i % 9 + 1),
    },
    "cap": lambda i: {"instruction": "Upper.", "input": f"word{i}", "output": f"WORD{i}"},
}
"""Row ``i`` of each task, by task name."""


def build_model(folder: Path, hidden: int, layers: int, vocab: int) -> None:
    """Save a random LLaMA (vocabulary at least the tokenizer's) and its tokenizer to ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=max(vocab, len(tokenizer)), hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
