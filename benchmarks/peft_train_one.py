"""The baseline: PEFT training adapters one at a time, the way a user writes it.

One process loads the base once, then for each adapter: ``get_peft_model``, AdamW over the
LoRA weights, and a plain PyTorch loop calling ``model(input_ids, attention_mask,
labels=...)`` on right-padded micro-batches (transformers computes full-vocabulary logits at
every position and shifts the labels itself), then ``save_pretrained`` and ``unload`` (the bare
base again for the next adapter). The loss is the token mean over the optimizer step: the
summed token losses of its micro-batches divided by its supervised tokens, which transformers
does when given ``num_items_in_batch`` (as its Trainer does under gradient accumulation).

Rows and micro-batches come from mlora's pipeline (``mlora.prepare_data``,
``mlora.batching.dispatcher.AdapterQueue``), so the rows, their order and the batch composition
equal mlora's. Run by the benchmarks as a child process (one JSON line on stdout, see common.py):

    python benchmarks/peft_train_one.py --model-dir M --config C --out O --adapters a,b \\
        --device cpu --dtype fp32 --attn-impl sdpa --warmup 1 --repeat 1 --seed 42
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from common import DTYPES, HF_ATTENTION, child_main, schedule, supervised, synced_now
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlora import TrainConfig
from mlora.batching.dispatcher import MicroBatch
from mlora.data.rows import TokenizedRow, pad_token_id
from mlora.training.trainer import prepare_data


def padded_batch(
    rows: Sequence[TokenizedRow], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Right-pad rows into a causal LM's inputs, each ``(rows, longest row)``; labels are -100
    on padding and on the prompt (the model shifts them: position t predicts label t + 1)."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row.input_ids)
        mask[i, : len(row)] = 1
        labels[i, : len(row)] = torch.tensor(row.labels)
    move = {"device": device, "non_blocking": True}
    return {
        "input_ids": ids.to(**move),
        "attention_mask": mask.to(**move),
        "labels": labels.to(**move),
    }


def train_adapter(
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[MicroBatch],
    pad_id: int,
    device: torch.device,
) -> tuple[list[float], float]:
    """The plain loop over one adapter's micro-batches.

    Returns:
        The end time of each micro-batch (after a device sync) and the first micro-batch's mean
        token loss (B = 0 then, so it equals the base model's loss, and mlora's first loss).
    """
    model.train()
    ends: list[float] = []
    first_loss = math.nan
    step: list[MicroBatch] = []
    for micro in batches:
        step.append(micro)
        if not micro.ends_step:
            continue
        items = sum(supervised(row) for mb in step for row in mb.rows)  # the step's token count
        for k, mb in enumerate(step):
            loss = model(**padded_batch(mb.rows, pad_id, device), num_items_in_batch=items).loss
            loss.backward()
            if k == len(step) - 1:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            ends.append(synced_now(device))
            if math.isnan(first_loss):
                first_loss = loss.item() * items / sum(supervised(row) for row in mb.rows)
        step = []
    return ends, first_loss


def load_base_and_plan(args: argparse.Namespace, config: TrainConfig) -> tuple[Any, Any, Any]:
    """The tokenizer, the micro-batch plan (mlora's rows and order) and the base model on
    ``args.device``: PEFT's side of every comparison starts from these."""
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    plan = schedule(config, prepare_data(config, tokenizer), args.seed)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir,
        dtype=getattr(torch, DTYPES[args.dtype]),
        attn_implementation=HF_ATTENTION[args.attn_impl],
    ).to(torch.device(args.device))
    return tokenizer, plan, model


def run_peft(args: argparse.Namespace, config: TrainConfig, run: int) -> dict[str, Any]:
    """Load the base once, train ``config``'s adapters one after another, save each.

    Returns:
        ``total_s`` (tokenizer, data, model load, training, saving), ``window_s`` (the
        steady-state micro-batches of every adapter, summed), ``first_loss`` and ``plan``.
    """
    device = torch.device(args.device)
    start = time.perf_counter()
    tokenizer, plan, model = load_base_and_plan(args, config)
    if config.gradient_checkpoint == "recompute":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(args.seed)
    window, losses = 0.0, []
    for a in config.lora:
        lora = LoraConfig(
            r=a.r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
            target_modules=a.target_module_names, use_rslora=a.use_rslora, task_type="CAUSAL_LM",
        )  # fmt: skip
        peft_model = get_peft_model(model, lora)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay)
        ends, first_loss = train_adapter(
            peft_model, optimizer, plan[a.name], pad_token_id(tokenizer), device
        )
        window += ends[-2] - ends[args.warmup - 1]  # micro-batches warmup+1 .. M-1
        losses.append(first_loss)
        peft_model.save_pretrained(Path(args.out) / f"run{run}" / a.name)
        model = peft_model.unload()
    return {
        "total_s": time.perf_counter() - start,
        "window_s": window,
        "first_loss": statistics.mean(losses),
        "plan": plan,
    }


if __name__ == "__main__":
    child_main(run_peft)
