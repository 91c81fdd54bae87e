"""Preference objectives equal TRL's trainers: loss and LoRA gradients on the same batch.

The reference is TRL's own code path on a PEFT model with the same LoRA weights: ``DPOTrainer``
(``compute_loss``; the reference is the PEFT base with the adapter disabled, as TRL does for a
new adapter) for each ``loss_type``, ``CPOTrainer`` (``get_batch_loss_metrics``) for ``cpo``
and ``simpo``, ``ORPOTrainer`` for ``orpo``. mlora computes the same adapter's loss
through its training path (``MultiLoraModel.segment_losses`` with the adapter's
``ObjectivePlan``; DPO's reference from ``with_reference_logps``, the same model with no
adapter). Everything in fp32; loss and every gradient within 1e-5.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from mlora.adapters.lora.format import named_parameters
from mlora.batching.collate import collate
from mlora.data.preference import tokenize_pairs, with_chosen_prompt_labels
from mlora.data.rows import IGNORE_INDEX, TokenizedRow
from mlora.inference.trained import attach_adapter
from mlora.model.multi_lora import MultiLoraModel
from mlora.training.objectives import Objective, plan_objectives, with_reference_logps
from tests.conftest import make_model, make_tokenizer

trl = pytest.importorskip("trl")

PAIRS = [
    {"prompt": "Q: 1+1=", "chosen": " 2", "rejected": " 3"},
    {"prompt": "Colour of grass:", "chosen": " green", "rejected": " blue, maybe"},
    {"prompt": "Capital of France?", "chosen": " Paris", "rejected": " Lyon"},
    {"prompt": "Opposite of hot:", "chosen": " cold", "rejected": " warm, or cool"},
]
CUTOFF = 64
TOLERANCE = 1e-5

CASES: dict[str, Objective] = {
    "dpo-sigmoid": Objective("dpo", "sigmoid", beta=0.5),
    "dpo-ipo": Objective("dpo", "ipo", beta=0.5),
    "dpo-hinge": Objective("dpo", "hinge", beta=0.3),
    "dpo-sigmoid-smoothed": Objective("dpo", "sigmoid", beta=0.5, label_smoothing=0.2),
    "cpo": Objective("cpo", beta=0.5, label_smoothing=0.1),
    "simpo": Objective("simpo", beta=2.0, gamma=0.5),
    "orpo": Objective("orpo", beta=0.3),
}


@pytest.fixture(autouse=True)
def _quiet() -> None:
    import datasets

    datasets.disable_progress_bars()
    logging.getLogger("trl").setLevel(logging.ERROR)


def peft_model(base: torch.nn.Module) -> torch.nn.Module:
    """A PEFT LoRA with non-zero random A and B (the gradients then reach both)."""
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"]
    )
    model = get_peft_model(copy.deepcopy(base), config)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return model


def peft_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name.replace(".default", ""): param.grad.clone()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def padded(rows: list[TokenizedRow], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row.input_ids)
        mask[i, : len(row)] = 1
        labels[i, : len(row)] = torch.tensor(row.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def trl_loss(
    objective: Objective, model: Any, base: torch.nn.Module, tokenizer: Any, rows: list
) -> tuple[torch.Tensor, Any]:
    """TRL's loss for ``objective`` on ``rows`` (pairs as mlora tokenizes them), and the PEFT
    model it was computed with (``model``'s weights; DPO: on a fresh copy of ``base``)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    common = {"report_to": [], "use_cpu": True, "max_length": CUTOFF}
    chosen, rejected = padded(rows[0::2], tokenizer.pad_token_id), padded(rows[1::2], 0)
    pair_batch = {f"chosen_{k}": v for k, v in chosen.items()}
    pair_batch |= {f"rejected_{k}": v for k, v in rejected.items()}
    with tempfile.TemporaryDirectory() as out:
        if objective.name == "dpo" and not objective.label_smoothing:
            args = DPOConfig(
                output_dir=out, beta=objective.beta, loss_type=[objective.loss_type], **common
            )
            # a new adapter (TRL's reference: the base, adapter disabled), given our weights
            trainer = DPOTrainer(
                model=copy.deepcopy(base), args=args,
                train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer,
                peft_config=model.peft_config["default"],
            )  # fmt: skip
            set_peft_model_state_dict(trainer.model, get_peft_model_state_dict(model))
            trainer.model.train()
            inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
            return trainer.compute_loss(trainer.model, inputs), trainer.model
        if objective.name == "orpo":
            args = ORPOConfig(output_dir=out, beta=objective.beta, **common)
            trainer = ORPOTrainer(
                model=model, args=args, train_dataset=Dataset.from_list(PAIRS),
                processing_class=tokenizer,
            )  # fmt: skip
            return trainer.get_batch_loss_metrics(trainer.model, pair_batch)[0], trainer.model
        loss_type = "simpo" if objective.name == "simpo" else "sigmoid"
        args = CPOConfig(
            output_dir=out, beta=objective.beta, loss_type=loss_type,
            label_smoothing=objective.label_smoothing, simpo_gamma=objective.gamma,
            cpo_alpha=1.0 if objective.name == "cpo" else 0.0, **common,
        )  # fmt: skip
        trainer = CPOTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(PAIRS),
            processing_class=tokenizer,
        )  # fmt: skip
        if objective.name != "dpo":
            return trainer.get_batch_loss_metrics(trainer.model, pair_batch)[0], trainer.model

        # Conservative DPO (label smoothing): TRL's DPOTrainer no longer has it for sigmoid;
        # its formula is CPOTrainer's sigmoid loss over the log-ratios to the reference, with
        # the log-probs from TRL's get_batch_logps, the reference with the adapter disabled.
        def logps(batch: dict) -> torch.Tensor:
            logits = trainer.model(batch["input_ids"], attention_mask=batch["attention_mask"])
            return CPOTrainer.get_batch_logps(logits.logits, batch["labels"])

        with torch.no_grad(), trainer.model.disable_adapter():
            ref_chosen, ref_rejected = logps(chosen), logps(rejected)
        losses, _, _ = trainer.cpo_loss(logps(chosen) - ref_chosen, logps(rejected) - ref_rejected)
        return losses.mean(), trainer.model


def mlora_loss(objective: Objective, model: MultiLoraModel, rows: list, pad_id: int):
    if objective.needs_reference:
        rows = with_reference_logps(model, rows, pad_id)
    if objective.name == "orpo":
        rows = with_chosen_prompt_labels(rows)
    batch = collate([("a", rows)], pad_id)
    chosen_tokens = sum(row.num_supervised for row in rows[0::2])
    plan = plan_objectives([(objective, rows, len(rows) // 2, chosen_tokens)], "cpu")
    return model.segment_losses(batch, objective=plan)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_equal_trl(case: str, tmp_path: Path) -> None:
    objective = CASES[case]
    tokenizer = make_tokenizer()
    base = make_model(vocab_size=len(tokenizer))
    reference = peft_model(base)
    reference.save_pretrained(tmp_path / "a")
    rows = tokenize_pairs(PAIRS, tokenizer, CUTOFF)

    reference.train()
    theirs, trained = trl_loss(objective, reference, base, tokenizer, rows)
    theirs.backward()
    ours_model = MultiLoraModel(copy.deepcopy(base))
    attach_adapter(ours_model, "a", tmp_path / "a")
    ours_model.train()
    ours = mlora_loss(objective, ours_model, rows, tokenizer.pad_token_id)
    ours.backward()

    assert abs(ours.item() - theirs.item()) <= TOLERANCE
    expected = peft_grads(trained)
    got = {k: p.grad for k, p in named_parameters(ours_model, "a").items()}
    assert got.keys() == expected.keys()
    for key, grad in expected.items():
        torch.testing.assert_close(got[key], grad, rtol=0, atol=TOLERANCE, msg=key)
    assert max(float(g.abs().max()) for g in expected.values()) > 1e-3  # real gradients


@pytest.mark.gpu
def test_objective_plan_and_clipping_do_not_sync() -> None:
    """Two preference segments' losses (DPO, ORPO), their backward and gradient clipping run
    under CUDA sync debug mode: the plan is built on the host before the pass."""
    device = torch.device("cuda")
    rows = tokenize_pairs(PAIRS, make_tokenizer(), CUTOFF)
    dpo_rows = [replace(row, reference_logp=-1.0 - i) for i, row in enumerate(rows)]
    orpo_rows = with_chosen_prompt_labels(rows)
    batch = collate([("a", dpo_rows), ("b", orpo_rows)], 0, device, packed=True)
    groups = [(Objective("dpo"), dpo_rows, 4.0, 10.0), (Objective("orpo"), orpo_rows, 4.0, 9.0)]
    weight = torch.randn(batch.positions.numel(), device=device, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        plan = plan_objectives(groups, device)
        assert plan is not None
        token_loss = torch.nn.functional.softplus(weight)  # (N,) positive, like cross-entropy
        plan(token_loss, batch, torch.zeros(2, device=device)).sum().backward()
        torch.nn.utils.clip_grad_norm_([weight], 0.1, foreach=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
