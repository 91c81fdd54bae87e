"""N AdamW steps of mlora match PEFT + a plain PyTorch loop from the same PEFT initial adapter.

The reference is written the obvious way: PEFT's model, the HF model's own loss
(``model(input_ids, attention_mask, labels, num_items_in_batch=...)``), rows in file order,
gradient accumulation over micro-batches with the loss normalised by the supervised tokens of
the whole optimizer step (transformers' ``num_items_in_batch``, as HF Trainer does), one AdamW.
mlora starts from the same adapter folder through ``--load_adapter`` semantics (``init_from``)
and trains it together with a second adapter.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict

from mlora.config.schema import parse_config
from mlora.data.rows import IGNORE_INDEX
from mlora.training.trainer import prepare_data
from tests.conftest import make_model, make_tokenizer
from tests.helpers import (
    addition_rows,
    max_relative_difference,
    reverse_rows,
    run_in_memory,
    write_json,
    write_template,
)

STEPS_ROWS, BATCH, MICRO, LR = 24, 4, 2, 1e-2

VARIANTS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "loraplus": {"loraplus_lr_ratio": 4.0},
}


def peft_initial_adapter(base: torch.nn.Module, variant: str, folder: Path) -> torch.nn.Module:
    """A PEFT adapter with random (non-zero) B, saved to ``folder`` in PEFT format."""
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "up_proj"],
        use_rslora=variant == "rslora",
        use_dora=variant == "dora",
    )
    model = get_peft_model(copy.deepcopy(base), config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    model.save_pretrained(folder)
    return model


def reference_training(model: torch.nn.Module, rows, pad_id: int, variant: str) -> None:
    """PEFT + a plain PyTorch loop: file order, micro-batches, token-weighted accumulation."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if variant == "loraplus":
        groups = [
            {"params": [p for n, p in trainable if "lora_B" not in n], "lr": LR},
            {"params": [p for n, p in trainable if "lora_B" in n], "lr": LR * 4.0},
        ]
    else:
        groups = [{"params": [p for _, p in trainable], "lr": LR}]
    optimizer = torch.optim.AdamW(groups, lr=LR, weight_decay=0.01)
    model.train()
    for start in range(0, len(rows), BATCH):
        batch = rows[start : start + BATCH]
        micro_batches = [batch[i : i + MICRO] for i in range(0, len(batch), MICRO)]
        step_tokens = sum(sum(label != IGNORE_INDEX for label in r.labels[1:]) for r in batch)
        for micro in micro_batches:
            width = max(len(r) for r in micro)
            ids = torch.full((len(micro), width), pad_id)
            mask = torch.zeros((len(micro), width), dtype=torch.long)
            labels = torch.full((len(micro), width), IGNORE_INDEX)
            for b, row in enumerate(micro):
                ids[b, : len(row)] = torch.tensor(row.input_ids)
                mask[b, : len(row)] = 1
                labels[b, : len(row)] = torch.tensor(row.labels)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            # the HF loss with num_items_in_batch, written out so that it keeps the logits'
            # dtype (transformers' own casts to fp32, which would round an fp64 reference)
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="sum"
            )
            (loss / step_tokens).backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_peft_and_a_plain_loop(tmp_path: Path, variant: str) -> None:
    tokenizer = make_tokenizer()
    base = make_model(vocab_size=len(tokenizer))
    template = write_template(tmp_path)
    data = write_json(tmp_path / "add.json", addition_rows(STEPS_ROWS))
    other = write_json(tmp_path / "rev.json", reverse_rows(12))
    reference = peft_initial_adapter(base, variant, tmp_path / "out" / "target")

    raw = {
        "cutoff_len": 64,
        "lora": [
            {"name": "target", "data": data, "prompt": template, "r": 4, "lora_alpha": 8,
             "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"],
             "batch_size": BATCH, "micro_batch_size": MICRO, "num_epochs": 1, "shuffle": False,
             "lr": LR, "weight_decay": 0.01, **VARIANTS[variant]},
            {"name": "other", "data": other, "prompt": template, "r": 2, "batch_size": 3,
             "num_epochs": 1},
        ],
    }  # fmt: skip
    trainer = run_in_memory(
        lambda: copy.deepcopy(base),
        tokenizer,
        raw,
        tmp_path / "out",
        init_from={"target": tmp_path / "out" / "target"},
    )
    rows = prepare_data(parse_config(raw), tokenizer)["target"]
    reference_training(reference, rows, tokenizer.pad_token_id, variant)

    from mlora.persistence.adapter_files import adapter_state_dict

    ours = adapter_state_dict(trainer.model, "target")
    theirs = {k: v.detach() for k, v in get_peft_model_state_dict(reference).items()}
    assert ours.keys() == theirs.keys()
    assert max_relative_difference(ours, theirs) <= 1e-3
    # the weights moved: this is a real comparison, not two untouched copies
    initial = get_peft_model_state_dict(peft_initial_adapter(base, variant, tmp_path / "again"))
    assert max_relative_difference(ours, {k: v.detach() for k, v in initial.items()}) > 1e-2
