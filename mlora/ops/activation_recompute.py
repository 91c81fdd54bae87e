"""Keep no activation-function outputs for backward: run the activation again instead.

In a gated MLP, ``down(act(gate) * up)``, the product's backward needs ``act(gate)`` and the
activation's own backward already keeps ``gate``. So autograd holds a (T, intermediate) tensor
per layer that the math does not need: on SmolLM2-135M training four adapters on about 2450
packed tokens that is 431 MiB of the 2.6 GiB kept at the end of the forward, the largest share
after ``gate`` and ``up`` themselves. The same holds where an activation's output is the input
of an adapted projection (a GPT-2 style MLP with LoRA on ``c_proj``).

``recompute_activations`` stores a note (the activation module and its input) in place of such
an output and runs the activation on that input again when backward asks for the output:
elementwise, so the values are bit for bit those of the forward, for a few milliseconds per
layer. A note is taken only where the activation's own backward already keeps its input
(SiLU, GELU and their approximations do; ReLU keeps its output instead), seen as it runs, so a
note never keeps alive a tensor that autograd would have let go.

This is the "selective recompute" of Megatron-LM and torchtune, narrowed to what costs nothing.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_ACTIVATION_MODULES = ("torch.nn.modules.activation", "transformers.activations")


def is_activation(module: nn.Module) -> bool:
    """An elementwise activation module of torch or transformers without parameters."""
    return (
        type(module).__module__ in _ACTIVATION_MODULES
        and next(module.parameters(recurse=False), None) is None
    )


@dataclass(frozen=True)
class _Note:
    """What backward needs to rebuild an activation's output."""

    module: nn.Module
    input: torch.Tensor


class _ActivationNotes:
    """Saved-tensor hooks plus the activation hooks that say which tensors can be notes."""

    def __init__(self) -> None:
        # id(output) -> (weak reference to the output, note); the reference tells a live output
        # from a new tensor that reuses a dead one's id
        self.notes: dict[int, tuple[weakref.ref[torch.Tensor], _Note]] = {}
        self.running_input: torch.Tensor | None = None  # the input of the activation running
        self.input_kept = False  # whether autograd saved that input while it ran

    def before(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.running_input = args[0] if len(args) == 1 else None
        self.input_kept = False

    def after(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        given, kept = self.running_input, self.input_kept
        self.running_input, self.input_kept = None, False
        if (
            kept
            and isinstance(given, torch.Tensor)
            and isinstance(output, torch.Tensor)
            and output.shape == given.shape
            and output.requires_grad
        ):
            self.notes[id(output)] = (weakref.ref(output), _Note(module, given))

    def pack(self, tensor: torch.Tensor) -> torch.Tensor | _Note:
        if tensor is self.running_input:
            self.input_kept = True
            return tensor
        entry = self.notes.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            return entry[1]
        return tensor

    @staticmethod
    def unpack(saved: torch.Tensor | _Note) -> torch.Tensor:
        if isinstance(saved, _Note):
            # grad mode as backward set it: off, or on under create_graph (then the rebuilt
            # output has its graph through the kept input)
            return saved.module(saved.input)
        return saved


@contextmanager
def recompute_activations(model: nn.Module) -> Iterator[None]:
    """Inside the block, forwards of ``model`` keep notes in place of activation outputs.

    The notes live in the autograd graph built inside the block (backward may run after it);
    the hooks on the activation modules are removed when the block ends. Regions with their
    own saved-tensor hooks (activation offload) keep everything as those hooks decide.
    """
    notes = _ActivationNotes()
    with ExitStack() as stack:
        for module in model.modules():
            if is_activation(module):
                stack.callback(module.register_forward_pre_hook(notes.before).remove)
                stack.callback(module.register_forward_hook(notes.after).remove)
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(notes.pack, notes.unpack))
        yield
