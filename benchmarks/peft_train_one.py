"""The baseline: train ONE adapter with PEFT and a plain PyTorch loop (what a user runs per job).

Same data pipeline, batches and optimizer as mlora, so the comparison is about the engine only.
Usage: python peft_train_one.py MODEL_DIR CONFIG_JSON ADAPTER_NAME OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlora.batch import collate
from mlora.config import load_config
from mlora.dispatcher import AdapterQueue
from mlora.trainer import prepare_data


def main(model_dir: str, config_path: str, name: str, out_dir: str) -> None:
    config = load_config(config_path)
    config.lora = [config.adapter(name)]
    adapter = config.lora[0]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = prepare_data(config, tokenizer)[name]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.lora_alpha,
        lora_dropout=adapter.lora_dropout,
        target_modules=adapter.target_module_names,
    )
    model = get_peft_model(model, lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=adapter.lr)
    queue = AdapterQueue(
        name, rows, adapter.batch_size, adapter.micro_batch_size, adapter.num_epochs, seed=42
    )
    model.train()
    while not queue.finished:
        micro = queue.pop()
        batch = collate([(name, micro.rows)], tokenizer.pad_token_id)
        labels = torch.full_like(batch.input_ids, -100)
        labels.view(-1)[batch.positions + 1] = batch.targets
        loss = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels
        ).loss
        (loss / micro.accumulation).backward()
        if micro.ends_step:
            optimizer.step()
            optimizer.zero_grad()
    model.save_pretrained(Path(out_dir) / name)


if __name__ == "__main__":
    main(*sys.argv[1:5])
