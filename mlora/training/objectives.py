"""Each adapter's loss from its own segment: SFT, or a preference objective over its pairs.

A preference adapter's rows come in pairs, chosen then rejected (``mlora.data.preference``),
and every objective is a function of each row's summed completion log-probs ``s`` (and token
count ``n``), which the packed pass already gives: ``s = -sum of the row's token losses``.
With ``P`` pairs and ``C`` labelled chosen tokens in the adapter's whole optimizer step, a
micro-batch adds ``sum_pairs loss_p / P + alpha * (chosen rows' token losses) / C`` (TRL's
per-batch means, independent of micro-batching like the SFT loss):

- ``dpo``: ``d = (s_c - ref_c) - (s_r - ref_r)``; sigmoid ``-(1-e) logsig(b d) - e logsig(-b d)``,
  hinge ``relu(1 - b d)``, ipo ``((s_c-ref_c)/n_c - (s_r-ref_r)/n_r - 1/(2b))^2``; alpha 0.
  ``ref`` is the frozen base with the adapter off, computed once before training
  (``reference_logps``): no second model, and one forward per row instead of one per epoch.
- ``cpo``: ``x = s_c - s_r``, sigmoid as above; alpha 1 (TRL ``CPOTrainer``, ``cpo_alpha=1``).
- ``simpo``: ``x = s_c/n_c - s_r/n_r - g/b``, sigmoid; alpha 0 (``CPOTrainer`` ``loss_type
  simpo``, ``cpo_alpha=0``).
- ``orpo``: ``a = s/n``, ``-b logsig((a_c - a_r) - (log(1-e^a_c) - log(1-e^a_r)))``; alpha 1,
  its NLL over the chosen prompt and response (TRL's ``ORPOTrainer``; the chosen rows label
  their prompt too, ``with_chosen_prompt_labels``, and ``s`` sums from ``completion_start``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from mlora.batching.collate import LossBatch, collate
from mlora.config.schema import OBJECTIVE_DEFAULTS, AdapterConfig, objective_data_problem
from mlora.core.errors import ConfigError
from mlora.data.preference import PAIR_ROWS, with_chosen_prompt_labels
from mlora.data.rows import TokenizedRow

NLL_WEIGHT = {"dpo": 0.0, "cpo": 1.0, "simpo": 0.0, "orpo": 1.0}


def check_objective_fits(adapter: AdapterConfig, data_format: str) -> None:
    """Raises:
    ConfigError: a preference objective on other rows, or preference rows trained as sft."""
    if (data_format == "preference") != (adapter.objective != "sft"):
        problem = objective_data_problem(adapter.objective)
        raise ConfigError(f"adapter {adapter.name!r} ({adapter.data}): {problem}")


@dataclass(frozen=True)
class Objective:
    """One adapter's objective and its settings (defaults filled in from the config)."""

    name: str = "sft"
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.0

    @classmethod
    def from_config(cls, adapter: AdapterConfig) -> Objective:
        if adapter.objective == "sft":
            return cls()
        settings = {
            key: adapter.objective_value(key)
            for key in ("loss_type", "beta", "label_smoothing", "gamma")
            if key in _keys(adapter.objective)
        }
        return cls(adapter.objective, **settings)

    @property
    def pairs(self) -> bool:
        """Whether the adapter trains on (chosen, rejected) pairs."""
        return self.name != "sft"

    @property
    def needs_reference(self) -> bool:
        return self.name == "dpo"

    @property
    def averages(self) -> bool:
        """Whether its log-probs are means per token (SimPO, ORPO) rather than sums."""
        return self.name in ("simpo", "orpo")


def _keys(objective: str) -> set[str]:
    return set(OBJECTIVE_DEFAULTS[objective])


def _sigmoid_loss(x: torch.Tensor, beta: float, smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(beta * x) * (1 - smoothing) - F.logsigmoid(-beta * x) * smoothing


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, stable on both sides of -log 2."""
    return torch.where(x > -0.6931472, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def pair_losses(
    objective: Objective,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """(P,) the objective's loss of each pair, without its NLL term.

    Args:
        chosen, rejected: (P,) summed completion log-probs.
        chosen_tokens, rejected_tokens: (P,) completion tokens (float).
        reference: (P, 2) the reference's summed log-probs of (chosen, rejected); DPO only.
    """
    beta, smoothing = objective.beta, objective.label_smoothing
    if objective.name == "dpo":
        assert reference is not None
        chosen_ratio, rejected_ratio = chosen - reference[:, 0], rejected - reference[:, 1]
        if objective.loss_type == "ipo":
            delta = chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens
            return (delta - 1 / (2 * beta)) ** 2
        delta = chosen_ratio - rejected_ratio
        if objective.loss_type == "hinge":
            return torch.relu(1 - beta * delta)
        return _sigmoid_loss(delta, beta, smoothing)
    if objective.name == "cpo":
        return _sigmoid_loss(chosen - rejected, beta, smoothing)
    mean_chosen, mean_rejected = chosen / chosen_tokens, rejected / rejected_tokens
    if objective.name == "simpo":
        return _sigmoid_loss(mean_chosen - mean_rejected - objective.gamma / beta, beta, 0.0)
    if objective.name == "orpo":
        log_odds = (mean_chosen - mean_rejected) - (
            _log1mexp(mean_chosen) - _log1mexp(mean_rejected)
        )
        return -beta * F.logsigmoid(log_odds)
    raise ValueError(f"no pair loss for objective {objective.name!r}")


def rewards(
    objective: Objective,
    logps: torch.Tensor,
    tokens: torch.Tensor,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """The implicit reward of each completion, as TRL logs it: ``b (s - ref)`` for DPO,
    ``b s`` (``b s / n`` for SimPO and ORPO) otherwise. Same shape as ``logps``."""
    if objective.needs_reference:
        assert reference is not None
        return objective.beta * (logps - reference)
    return objective.beta * (logps / tokens if objective.averages else logps)


@dataclass(frozen=True)
class PairSegment:
    """Where one preference adapter's rows sit in a pass, and its step's divisors.

    Attributes:
        segment: its index in the pass's layout.
        first_row: its first row among the pass's rows (collate order).
        objective: its objective.
        reference: (P, 2) reference log-probs (DPO), on the device; else None.
        pairs_divisor: pairs in the adapter's whole optimizer step.
        chosen_divisor: chosen completion tokens in the whole step (the NLL term's mean).
    """

    segment: int
    first_row: int
    pair_count: int
    objective: Objective
    reference: torch.Tensor | None
    pairs_divisor: float
    chosen_divisor: float


class ObjectivePlan:
    """Replaces the preference segments' SFT losses with their objectives, in one pass.

    Built on the host before the forward (no device read); called by
    ``MultiLoraModel.segment_losses`` with the pass's token losses.

    Args:
        segments: the preference segments of the pass.
        row_tokens: (rows,) each row's completion tokens (float, on the device).
        completion_starts: (rows,) where each row's completion starts (long, on the device):
            a row's log-prob sums its positions from there (ORPO's chosen rows also label
            their prompt, for the NLL term alone).
    """

    def __init__(
        self,
        segments: Sequence[PairSegment],
        row_tokens: torch.Tensor,
        completion_starts: torch.Tensor,
    ) -> None:
        self.segments = list(segments)
        self.row_tokens = row_tokens
        self.completion_starts = completion_starts
        index = torch.tensor([seg.segment for seg in self.segments], dtype=torch.long)
        self.segment_index = index.to(row_tokens.device, non_blocking=True)

    def __call__(
        self, token_loss: torch.Tensor, batch: LossBatch, losses: torch.Tensor
    ) -> torch.Tensor:
        """(S,) ``losses`` with each preference segment's entry replaced by its objective.

        Args:
            token_loss: (N,) cross-entropy at each supervised position of ``batch``.
            losses: (S,) the SFT losses (token-loss sums over their divisors).
        """
        rows = self.row_tokens.numel()
        in_completion = _position_in_row(batch) + 1 >= self.completion_starts[batch.position_rows]
        completion_loss = token_loss * in_completion
        row_logps = -token_loss.new_zeros(rows).index_add(0, batch.position_rows, completion_loss)
        row_nll = token_loss.new_zeros(rows).index_add(0, batch.position_rows, token_loss)
        replaced = []
        for seg in self.segments:
            end = seg.first_row + PAIR_ROWS * seg.pair_count
            logps = row_logps[seg.first_row : end].view(-1, PAIR_ROWS)  # (P, 2)
            tokens = self.row_tokens[seg.first_row : end].view(-1, PAIR_ROWS)
            chosen, rejected = logps[:, 0], logps[:, 1]
            chosen_nll = row_nll[seg.first_row : end : PAIR_ROWS]
            per_pair = pair_losses(
                seg.objective, chosen, rejected, tokens[:, 0], tokens[:, 1], seg.reference
            )
            loss = per_pair.sum() / seg.pairs_divisor
            weight = NLL_WEIGHT[seg.objective.name]
            if weight:
                loss = loss + weight * chosen_nll.sum() / seg.chosen_divisor
            replaced.append(loss)
        return losses.index_put((self.segment_index,), torch.stack(replaced).to(losses.dtype))


def plan_objectives(
    groups: Sequence[tuple[Objective, Sequence[TokenizedRow], float, float]],
    device: torch.device | str,
) -> ObjectivePlan | None:
    """The plan of a pass whose segment ``i`` holds ``groups[i]``'s rows, or None when every
    segment trains SFT.

    Args:
        groups: per segment: (objective, its rows in collate order, pairs in its whole
            optimizer step, chosen tokens in its whole step).
    """
    if not any(objective.pairs for objective, *_ in groups):
        return None
    segments, first, counts, starts = [], 0, [], []
    for index, (objective, rows, pairs_divisor, chosen_divisor) in enumerate(groups):
        counts += [float(row.completion_tokens) for row in rows]
        starts += [row.completion_start for row in rows]
        if objective.pairs:
            reference = None
            if objective.needs_reference:
                values = [row.reference_logp for row in rows]
                reference = torch.tensor(values, dtype=torch.float32).view(-1, PAIR_ROWS)
                reference = reference.to(device, non_blocking=True)
            pair_count = len(rows) // PAIR_ROWS
            segments.append(
                PairSegment(
                    index, first, pair_count, objective, reference, pairs_divisor, chosen_divisor
                )
            )
        first += len(rows)
    row_tokens = torch.tensor(counts, dtype=torch.float32).to(device, non_blocking=True)
    completion_starts = torch.tensor(starts, dtype=torch.long).to(device, non_blocking=True)
    return ObjectivePlan(segments, row_tokens, completion_starts)


def _position_in_row(batch: LossBatch) -> torch.Tensor:
    """(N,) each supervised position's index within its row."""
    if batch.position_ids is not None:  # packed: positions restart per row
        return batch.position_ids.reshape(-1)[batch.positions]
    return batch.positions % batch.input_ids.shape[1]


@torch.no_grad()
def row_logps(model: Any, rows: Sequence[TokenizedRow], pad_id: int, batch_rows: int = 16):
    """(rows,) fp32 summed completion log-probs of ``rows`` under the bare base model (every
    segment without adapter), in padded batches of ``batch_rows``; one host read per batch."""
    out: list[float] = []
    for start in range(0, len(rows), batch_rows):
        chunk = list(rows[start : start + batch_rows])
        batch = collate([(None, chunk)], pad_id, model.device, packed=False)
        token_loss = model.token_losses(batch)
        starts = torch.tensor([row.completion_start for row in chunk], device=model.device)
        token_loss = token_loss * (_position_in_row(batch) + 1 >= starts[batch.position_rows])
        sums = token_loss.new_zeros(len(chunk)).index_add(0, batch.position_rows, token_loss)
        out += (-sums).float().tolist()
    return out


def with_reference_logps(
    model: Any, rows: Sequence[TokenizedRow], pad_id: int, batch_rows: int = 16
) -> list[TokenizedRow]:
    """``rows`` with ``reference_logp`` set: DPO's reference, the frozen base with no adapter
    (TRL's ``precompute_ref_log_probs`` on the PEFT base), computed once before training."""
    training = model.training
    model.eval()
    try:
        values = row_logps(model, rows, pad_id, batch_rows)
    finally:
        model.train(training)
    return [replace(row, reference_logp=value) for row, value in zip(rows, values, strict=True)]


def objective_rows(
    objective: Objective, rows: Sequence[TokenizedRow], model: Any, pad_id: int
) -> list[TokenizedRow]:
    """An adapter's training rows as its objective reads them: DPO's with their reference
    log-probs (one no-grad pass of the base), ORPO's chosen rows with their prompt labelled."""
    if objective.needs_reference:
        return with_reference_logps(model, rows, pad_id)
    if objective.name == "orpo":
        return with_chosen_prompt_labels(rows)
    return list(rows)
