"""Evaluation of a preference adapter on its test pairs: reward accuracy, margin, log-probs.

Each test pair is scored as two rows (chosen, rejected) in the shared evaluation batches; the
figures are TRL's: the implicit reward of each completion (``mlora.training.objectives.rewards``:
``beta (s - ref)`` for DPO, ``beta s`` or ``beta s / n`` otherwise), the share of pairs whose
chosen reward is higher (``reward_accuracy``), the mean reward margin, the mean summed log-probs
of the chosen and rejected completions, and the objective's loss. DPO's reference log-probs
come from the same model with no adapter, computed before scoring (``fill_references``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from mlora.training.objectives import (
    NLL_WEIGHT,
    Objective,
    pair_losses,
    rewards,
    with_reference_logps,
)


def preference_units(rows: Sequence[Any]) -> list[list[Any]]:
    """Consecutive (chosen, rejected) rows as scoring units of two rows."""
    return [list(rows[i : i + 2]) for i in range(0, len(rows), 2)]


def has_references(units: Sequence[Sequence[Any]]) -> bool:
    """Whether every row already has its reference log-prob (filled by an earlier call)."""
    return all(row.reference_logp is not None for unit in units for row in unit)


def fill_references(model: Any, pad_id: int, units: list[list[Any]], batch_rows: int) -> list:
    """``units`` with each row's ``reference_logp`` (the model with no adapter)."""
    rows = with_reference_logps(model, [r for unit in units for r in unit], pad_id, batch_rows)
    return preference_units(rows)


def preference_metrics(
    objective: Objective, units: Sequence[Sequence[Any]], nll: Sequence[Sequence[float]]
) -> dict[str, Any]:
    """The figures of one adapter (see the module docstring).

    Args:
        units: its (chosen, rejected) rows; DPO: with ``reference_logp``.
        nll: each unit's two rows' summed negative log-likelihoods.
    """
    logps = -torch.tensor([list(n) for n in nll], dtype=torch.float64)  # (P, 2)
    tokens = torch.tensor(
        [[row.num_supervised for row in unit] for unit in units], dtype=torch.float64
    )
    reference = None
    if objective.needs_reference:
        reference = torch.tensor(
            [[row.reference_logp for row in unit] for unit in units], dtype=torch.float64
        )
    reward = rewards(objective, logps, tokens, reference)
    chosen, rejected = logps[:, 0], logps[:, 1]
    chosen_nll = float(-chosen.sum() / tokens[:, 0].sum())
    loss = pair_losses(objective, chosen, rejected, tokens[:, 0], tokens[:, 1], reference)
    return {
        "loss": float(loss.mean()) + NLL_WEIGHT[objective.name] * chosen_nll,
        "perplexity": math.exp(chosen_nll) if chosen_nll < 700 else math.inf,
        "tokens": int(tokens.sum()),
        "reward_accuracy": float((reward[:, 0] > reward[:, 1]).double().mean()),
        "reward_margin": float((reward[:, 0] - reward[:, 1]).mean()),
        "chosen_logps": float(chosen.mean()),
        "rejected_logps": float(rejected.mean()),
    }
