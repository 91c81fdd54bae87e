"""Whether packed rows are exact for a model: a one-time probe decides ``packing: "auto"``.

Packing concatenates rows into one sequence with ``position_ids`` restarting at 0 per row and no
attention mask; transformers then keeps rows apart (a block-diagonal causal mask for sdpa, eager
and flex attention, flash-attention's varlen path). A model whose code does not honour this
would let packed rows attend to each other and silently train on mixed rows. Rather than keep a
list of architectures, "auto" asks the model itself: three short random rows run alone and
packed two to a batch row through the frozen backbone must give the same hidden states.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from mlora.errors import first_line

logger = logging.getLogger("mlora")

PACKING_CHOICES = ("auto", True, False)
_PROBE_BINS = ((5, 3), (4, 4))  # row lengths packed into each of two batch rows


def packing_problem(hf_model: nn.Module) -> str | None:
    """Why packing is not exact for ``hf_model`` (a transformers causal LM), or None if it is.

    Runs the frozen backbone without adapters on a few tokens (no gradient, eval mode).
    """
    parameter = next(hf_model.parameters())
    device, dtype = parameter.device, parameter.dtype
    vocab = int(getattr(hf_model.config, "vocab_size", 0) or 2)
    generator = torch.Generator().manual_seed(0)
    lengths = [n for bin_lengths in _PROBE_BINS for n in bin_lengths]
    rows = [torch.randint(0, vocab, (n,), generator=generator) for n in lengths]
    backbone = hf_model.base_model
    was_training = hf_model.training
    hf_model.eval()
    try:
        with torch.no_grad():
            alone = torch.cat(
                [
                    backbone(input_ids=row.view(1, -1).to(device), use_cache=False)
                    .last_hidden_state[0]
                    .float()
                    for row in rows
                ]
            )
            shape = (len(_PROBE_BINS), -1)  # (2, 8): two packed rows per batch row
            position_ids = torch.cat([torch.arange(n) for n in lengths]).view(shape)
            packed = backbone(
                input_ids=torch.cat(rows).view(shape).to(device),
                position_ids=position_ids.to(device),
                attention_mask=None,
                use_cache=False,
            ).last_hidden_state
            packed = packed.reshape(-1, packed.shape[-1]).float()
    except Exception as exc:  # any failure of the packed call means: don't pack
        return f"a packed forward fails ({type(exc).__name__}: {first_line(exc)})"
    finally:
        hf_model.train(was_training)
    error = ((packed - alone).abs().max() / alone.abs().max().clamp_min(1e-6)).item()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    if error > tolerance:
        return (
            f"packed rows differ from rows run alone (relative error {error:.1e}): "
            f"{type(hf_model).__name__} does not keep packed rows apart"
        )
    return None


def resolve_packing(hf_model: nn.Module, requested: str | bool) -> bool:
    """The ``packing`` key: True / False as asked; "auto" packs where the probe finds it exact
    and otherwise falls back to padded rows, saying why in one log line."""
    if requested != "auto":
        return bool(requested)
    problem = packing_problem(hf_model)
    if problem is None:
        return True
    logger.info("packing: off, rows are padded instead: %s", problem)
    return False
