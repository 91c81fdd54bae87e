"""Whether packed rows are exact for a model: a one-time probe decides ``packing: "auto"``.

Packing concatenates rows into one sequence with ``position_ids`` restarting at 0 per row and no
attention mask; transformers then keeps rows apart (a block-diagonal causal mask for sdpa, eager
and flex attention, flash-attention's varlen path). A model whose code does not honour this
would let packed rows attend to each other and silently train on mixed rows. Rather than keep a
list of architectures, "auto" asks the model itself: four short random rows run alone and
packed two to a batch row through the frozen backbone must give the same hidden states.

The rows run alone are the reference of both probes "auto" runs (packed into bins, then in one
stream): they are computed once (4 forwards) and each probe adds its one packed forward, 6 in
all instead of 10. Per-row attention without row boundaries is plain sdpa with sdpa's mask
(``mlora.ops.varlen_attention``), so the rows alone give bit-identical states under either
attention (tested for every sdpa family): sharing them leaves every decision unchanged.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from mlora.core.errors import MloraError, first_line
from mlora.ops.varlen_attention import SEQUENCES_KWARG, VARLEN_ATTENTION

logger = logging.getLogger("mlora")

PACKING_CHOICES = ("auto", True, False, "stream", "bins")
_PROBE_BINS = ((5, 3), (4, 4))  # row lengths packed into each of two batch rows
# How a model's forward refuses packed rows: an argument it does not take (TypeError), a shape
# or mask it rejects (ValueError, RuntimeError), a path it lacks (NotImplementedError). Any
# other exception (AttributeError, KeyError, ...) is a bug and propagates as a traceback
# instead of quietly turning packing off.
PACKED_CALL_ERRORS = (TypeError, ValueError, RuntimeError, NotImplementedError)


def probe_rows(hf_model: nn.Module, lengths: list[int] | None = None) -> list[torch.Tensor]:
    """The probes' random token rows (seeded: every probe of a model runs the same rows)."""
    vocab = int(getattr(hf_model.config, "vocab_size", 0) or 2)
    generator = torch.Generator().manual_seed(0)
    lengths = lengths or [n for bin_lengths in _PROBE_BINS for n in bin_lengths]
    return [torch.randint(0, vocab, (n,), generator=generator) for n in lengths]


class ProbeReference:
    """The probe rows' hidden states run alone: computed by the first probe that needs them and
    reused by the next on the same model (``resolve_packing``), so they run once."""

    def __init__(self) -> None:
        self.states: torch.Tensor | None = None

    def alone(self, backbone: nn.Module, rows: list[torch.Tensor], device) -> torch.Tensor:
        """(sum of lengths, hidden) fp32 states of each row run by itself."""
        if self.states is None:
            self.states = torch.cat(
                [
                    backbone(input_ids=row.view(1, -1).to(device), use_cache=False)
                    .last_hidden_state[0]
                    .float()
                    for row in rows
                ]
            )
        return self.states


def packing_problem(hf_model: nn.Module, reference: ProbeReference | None = None) -> str | None:
    """Why packing is not exact for ``hf_model`` (a transformers causal LM), or None if it is.

    Runs the frozen backbone without adapters on a few tokens (no gradient, eval mode);
    ``reference``: the rows alone, shared with a later probe.
    """
    lengths = [n for bin_lengths in _PROBE_BINS for n in bin_lengths]
    shape = (len(_PROBE_BINS), -1)  # (2, 8): two packed rows per batch row
    position_ids = torch.cat([torch.arange(n) for n in lengths]).view(shape)
    return _probe(hf_model, lengths, shape, position_ids, {}, "packed rows", reference)


def stream_problem(hf_model: nn.Module, reference: ProbeReference | None = None) -> str | None:
    """Why one stream of rows with per-row attention (``mlora.ops.varlen_attention``) is not exact
    for ``hf_model``, or None if it is; the model must use sdpa attention."""
    if hf_model.config._attn_implementation != VARLEN_ATTENTION:
        return f"attention is {hf_model.config._attn_implementation!r}, not 'sdpa'"
    lengths = [n for bin_lengths in _PROBE_BINS for n in bin_lengths]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    rows = {SEQUENCES_KWARG: tuple((s, s + n) for s, n in zip(starts, lengths, strict=True))}
    position_ids = torch.cat([torch.arange(n) for n in lengths]).view(1, -1)
    return _probe(hf_model, lengths, (1, -1), position_ids, rows, "rows in one stream", reference)


def _probe(
    hf_model: nn.Module,
    lengths: list[int],
    shape: tuple[int, int],
    position_ids: torch.Tensor,
    extra: dict,
    what: str,
    reference: ProbeReference | None = None,
) -> str | None:
    """Random rows of ``lengths`` run alone vs together in ``shape`` (no attention mask, or an
    all-ones one with ``extra``); the relative error decides."""
    parameter = next(hf_model.parameters())
    device, dtype = parameter.device, parameter.dtype
    rows = probe_rows(hf_model, lengths)
    backbone = hf_model.base_model
    was_training = hf_model.training
    hf_model.eval()
    try:
        with torch.no_grad():
            alone = (reference or ProbeReference()).alone(backbone, rows, device)
            ids = torch.cat(rows).view(shape).to(device)
            packed = backbone(
                input_ids=ids,
                position_ids=position_ids.to(device),
                attention_mask=torch.ones_like(ids) if extra else None,
                use_cache=False,
                **extra,
            ).last_hidden_state
            packed = packed.reshape(-1, packed.shape[-1]).float()
    except torch.OutOfMemoryError:
        raise  # the device, not the model's code: no reason to pad
    except PACKED_CALL_ERRORS as exc:  # the model's code does not take packed rows: pad
        return f"a forward of {what} fails ({type(exc).__name__}: {first_line(exc)})"
    finally:
        hf_model.train(was_training)
    error = ((packed - alone).abs().max() / alone.abs().max().clamp_min(1e-6)).item()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    if error > tolerance:
        return (
            f"{what} differ from rows run alone (relative error {error:.1e}): "
            f"{type(hf_model).__name__} does not keep them apart"
        )
    return None


def resolve_packing(hf_model: nn.Module, requested: str | bool) -> bool:
    """Apply the ``packing`` key to ``hf_model``; returns whether its batches are packed.

    "auto" packs where ``packing_problem`` finds it exact, else pads (one log line says why);
    True packs without asking. Packed rows go into one stream where ``use_stream`` finds
    per-row attention exact, else into bins; "bins" and "stream" ask for one form ("stream"
    fails with one line where the model cannot have it); False pads.

    Raises:
        MloraError: "stream" on a model that cannot attend per row.
    """
    reference = ProbeReference()  # the rows alone, run once for both probes
    if requested == "auto":
        problem = packing_problem(hf_model, reference)
        if problem is not None:
            logger.info("packing: off, rows are padded instead: %s", problem)
            requested = False
    if requested is False or requested == "bins":
        _leave_stream(hf_model)
        return requested == "bins"
    problem = stream_problem_after_switch(hf_model, reference)
    if problem is not None and requested == "stream":
        raise MloraError(f'packing: "stream" is not possible for this model: {problem}')
    if problem is not None:
        logger.info("packing: bins (padded to the longest row), not one stream: %s", problem)
    return True


def use_stream(hf_model: nn.Module) -> bool:
    """Switch an sdpa model to per-row attention over one unpadded stream of rows where the
    probe finds it exact (else leave it as it is: rows go into bins). Returns whether it did."""
    return stream_problem_after_switch(hf_model) is None


def stream_problem_after_switch(
    hf_model: nn.Module, reference: ProbeReference | None = None
) -> str | None:
    """Switch ``hf_model`` to per-row attention if it uses sdpa and the probe finds the switch
    exact; returns None when it attends per row, else why not (the model is then unchanged)."""
    if hf_model.config._attn_implementation == "sdpa":
        hf_model.set_attn_implementation(VARLEN_ATTENTION)
        problem = stream_problem(hf_model, reference)
        if problem is not None:
            hf_model.set_attn_implementation("sdpa")
        return problem
    return stream_problem(hf_model, reference)


def _leave_stream(hf_model: nn.Module) -> None:
    """Back to plain sdpa (a model an earlier run switched to per-row attention)."""
    if hf_model.config._attn_implementation == VARLEN_ATTENTION:
        hf_model.set_attn_implementation("sdpa")
