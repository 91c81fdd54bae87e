"""Gradient checkpointing per decoder layer: recompute activations, or park them on the host.

Activations of the frozen base dominate training memory once adapters are small. Two modes
bound them, applied to each decoder layer of a transformers model in place:

``recompute``
    The layer runs under :class:`RecomputeFunction`, which keeps only the layer's inputs and
    re-runs the layer during backward. It snapshots the CPU and device RNG and the autocast state
    (and the adapters' own random streams) before the forward and restores them for the
    recomputation, so dropout draws the same masks
    and matmuls run in the same precision: gradients equal those of an unchecked run.
``offload``
    Everything autograd saves inside the layer is copied to host memory (pinned on CUDA) and
    brought back for backward, via ``torch.autograd.graph.saved_tensors_hooks``.

Adapter-aware layers read the pass's state (layout, per-token data: ``PassState``) from a shared
context at forward time; a recomputed layer captures the state installed at its forward and
installs it again for the recomputation, so it sees the same segments whatever pass is installed
when backward runs. Losses a
layer records on the side rather than returns (MoE router losses, see ``mlora.batching.aux_losses``)
are captured as extra outputs of the recomputed layer, so they keep their gradient path.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from mlora.batching.aux_losses import SideKey
from mlora.core.errors import MloraError
from mlora.hardware.backends import Backend, get_backend

CHECKPOINT_MODES = ("none", "recompute", "offload")
"""Modes :func:`apply_gradient_checkpointing` applies (the config key also takes ``auto``)."""

_STATE_ATTR = "_mlora_checkpoint"


class RandomStreams(Protocol):
    """Random streams besides the global RNG that layers draw from (the adapters' own,
    ``mlora.batching.randomness.AdapterGenerators``): snapshotted and restored around a
    recomputation."""

    def get_state(self) -> Any:
        """The streams' current state."""

    def set_state(self, state: Any) -> None:
        """Put the streams back to ``state``."""


class PassStates(Protocol):
    """Where layers read the pass in flight (``LayoutContext`` implements it): the state is
    captured at a layer's forward and installed again for its recomputation."""

    @property
    def state(self) -> Any:
        """The state installed now."""

    def install(self, state: Any) -> contextlib.AbstractContextManager[Any]:
        """Make ``state`` the installed one inside the block, then restore the previous."""


class SideLosses(Protocol):
    """Where layers record losses they do not return (``AuxLossCollector`` implements it)."""

    def capture(
        self, keep_loads: bool = True
    ) -> contextlib.AbstractContextManager[dict[SideKey, torch.Tensor]]:
        """Divert the losses recorded inside the block into the yielded dict."""

    def add(self, adapter: SideKey, loss: torch.Tensor) -> None:
        """Record ``loss`` under ``adapter`` (or a ``RouterSlot``) in the current pass."""


@dataclass(frozen=True)
class _AutocastState:
    """The autocast settings of one forward, re-entered for its recomputation."""

    entries: tuple[tuple[str, bool, torch.dtype], ...]
    cache_enabled: bool

    @classmethod
    def capture(cls, device_type: str) -> _AutocastState:
        types = dict.fromkeys((device_type, "cpu"))
        return cls(
            entries=tuple(
                (t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in types
            ),
            cache_enabled=torch.is_autocast_cache_enabled(),
        )

    @contextlib.contextmanager
    def restore(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for device_type, enabled, dtype in self.entries:
                stack.enter_context(
                    torch.autocast(
                        device_type, dtype=dtype, enabled=enabled, cache_enabled=self.cache_enabled
                    )
                )
            yield


class RecomputeFunction(torch.autograd.Function):
    """Run ``run(*inputs)`` without saving activations; re-run it with grad during backward.

    The trainable parameters used inside ``run`` are passed as extra inputs. That makes the
    outputs require grad even when no input does (the first decoder layer of a frozen base gets
    hidden states that don't), and lets backward return parameter gradients to the autograd
    engine like any other input's, instead of accumulating them as a side effect.

    Args of ``apply``:
        run: Maps the input tensors to a tuple of output tensors; called twice.
        backend: Whose device RNG to snapshot and restore (the CPU RNG always is).
        streams: Further random streams to snapshot and restore (adapters' own), or None.
        num_inputs: How many of ``tensors`` are ``run``'s inputs; the rest are parameters.
        *tensors: ``run``'s input tensors, then the trainable parameters it uses.
    """

    @staticmethod
    def forward(
        ctx: Any,
        run: Callable[..., tuple[torch.Tensor, ...]],
        backend: Backend,
        streams: RandomStreams | None,
        num_inputs: int,
        *tensors: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        ctx.run = run
        ctx.backend = backend
        ctx.streams = streams
        ctx.num_inputs = num_inputs
        ctx.rng_state = backend.get_rng_state()
        ctx.streams_state = None if streams is None else streams.get_state()
        ctx.autocast = _AutocastState.capture(backend.device.type)
        inputs = tensors[:num_inputs]
        ctx.params = tensors[num_inputs:]  # live module parameters: nothing to save
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            outputs = run(*inputs)
        ctx.mark_non_differentiable(*(o for o in outputs if not o.is_floating_point()))
        return outputs

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        needs = ctx.needs_input_grad[4:]
        inputs = [
            t.detach().requires_grad_(need)
            for t, need in zip(ctx.saved_tensors, needs, strict=False)
        ]
        streams = ctx.streams
        after_forward = None if streams is None else streams.get_state()
        with ctx.backend.fork_rng():
            ctx.backend.set_rng_state(ctx.rng_state)
            if streams is not None:
                streams.set_state(ctx.streams_state)
            try:
                with torch.enable_grad(), ctx.autocast.restore():
                    outputs = ctx.run(*inputs)
            finally:
                if streams is not None:
                    streams.set_state(after_forward)
        wanted = [t for t, need in zip([*inputs, *ctx.params], needs, strict=True) if need]
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if o.requires_grad]
        grads = iter(
            torch.autograd.grad(
                [o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True
            )
            if pairs
            else [None] * len(wanted)
        )
        return (None, None, None, None, *(next(grads) if need else None for need in needs))


class _OffloadHooks:
    """Pack/unpack hooks that move saved activations to host memory and back.

    Tensors already on the host, and the layer's own parameters (saved by reference, so moving
    them would copy weights every step), stay where they are.
    """

    def __init__(self, pin_memory: bool, keep_storages: set[int]) -> None:
        self.pin_memory = pin_memory
        self.keep_storages = keep_storages

    def pack(self, tensor: torch.Tensor) -> Any:
        if tensor.device.type == "cpu" or self._storage(tensor) in self.keep_storages:
            return tensor
        host = torch.empty(
            tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=self.pin_memory
        )
        host.copy_(tensor, non_blocking=self.pin_memory)
        return tensor.device, host

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=self.pin_memory)

    @staticmethod
    def _storage(tensor: torch.Tensor) -> int:
        return tensor.untyped_storage().data_ptr()


def _is_cache(value: Any) -> bool:
    """A KV cache object, whatever keyword carries it (``past_key_values`` in transformers 4,
    ``cache`` in 5): an instance of transformers' ``Cache``."""
    from transformers.cache_utils import Cache

    return isinstance(value, Cache)


def _drop_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A training forward never reads a KV cache back, and a recomputation would write it twice.

    Caches are recognised by type, not by keyword name, so a renamed argument cannot slip by.
    """
    if not any(_is_cache(v) for v in kwargs.values()) and not kwargs.get("use_cache"):
        return kwargs
    kwargs = {k: (None if _is_cache(v) else v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return kwargs


def _recompute_forward(
    layer: nn.Module,
    original: Callable[..., Any],
    backend: Backend,
    side: SideLosses | None,
    streams: RandomStreams | None,
    passes: PassStates | None,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """``layer.forward`` under :class:`RecomputeFunction`.

    Side losses the layer records are returned by the Function as extra outputs (recorded
    without grad in the forward, recomputed with grad in backward) and re-added to ``side``.
    The recomputation runs under the pass state ``passes`` had at the forward.
    """
    leaves, spec = tree_flatten((args, _drop_cache(kwargs)))
    slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    inputs = [leaves[i] for i in slots]
    params = [p for p in layer.parameters() if p.requires_grad]
    if not params and not any(t.requires_grad for t in inputs):
        return original(*args, **kwargs)
    # The closure must not hold the input tensors: the Function saves them itself.
    template = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
    out_structure: list[tuple[list[Any], Any, list[SideKey]]] = []
    state = None if passes is None else passes.state  # the pass this forward belongs to

    def run(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        first = not out_structure
        call_leaves = list(template)
        for slot, tensor in zip(slots, tensors, strict=True):
            call_leaves[slot] = tensor
        call_args, call_kwargs = tree_unflatten(call_leaves, spec)
        capture = side.capture(keep_loads=first) if side is not None else contextlib.nullcontext()
        installed = contextlib.nullcontext() if passes is None else passes.install(state)
        with installed, capture as recorded:
            out_leaves, out_spec = tree_flatten(original(*call_args, **call_kwargs))
        recorded = recorded or {}
        if first:
            template_out = [None if isinstance(x, torch.Tensor) else x for x in out_leaves]
            out_structure.append((template_out, out_spec, list(recorded)))  # recording order
        extras = tuple(recorded[key] for key in out_structure[0][2])
        return (*(x for x in out_leaves if isinstance(x, torch.Tensor)), *extras)

    outputs = list(RecomputeFunction.apply(run, backend, streams, len(inputs), *inputs, *params))
    out_template, out_spec, side_keys = out_structure[0]
    for key, loss in zip(side_keys, outputs[len(outputs) - len(side_keys) :], strict=True):
        side.add(key, loss)  # type: ignore[union-attr]
    tensors = iter(outputs)
    out_leaves = [next(tensors) if x is None else x for x in out_template]
    return tree_unflatten(out_leaves, out_spec)


def _offload_forward(
    layer: nn.Module,
    original: Callable[..., Any],
    backend: Backend,
    side: SideLosses | None,
    streams: RandomStreams | None,
    passes: PassStates | None,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """``layer.forward`` with its saved activations parked in host memory."""
    keep = {_OffloadHooks._storage(p) for p in layer.parameters()}
    hooks = _OffloadHooks(backend.pin_memory, keep)
    with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
        return original(*args, **kwargs)


_FORWARDS = {"recompute": _recompute_forward, "offload": _offload_forward}


def _checkpointed_forward(
    mode_forward: Callable[..., Any],
    layer: nn.Module,
    original: Callable[..., Any],
    backend: Backend,
    side: SideLosses | None,
    streams: RandomStreams | None,
    passes: PassStates | None,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """The installed ``layer.forward``: the mode's forward while training with grad enabled,
    else the original (evaluation and generation keep nothing for a backward)."""
    if not (layer.training and torch.is_grad_enabled()):
        return original(*args, **kwargs)
    return mode_forward(layer, original, backend, side, streams, passes, *args, **kwargs)


def find_decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder layers of a transformers model (or a wrapper around one).

    Layers are the members of an ``nn.ModuleList`` whose class is named in the model's
    ``_no_split_modules`` (transformers' own list of blocks that must stay whole); failing that,
    the first ``nn.ModuleList`` of identical modules.

    Raises:
        MloraError: No such list exists in the model.
    """
    block_names: set[str] = set()
    for module in model.modules():
        block_names.update(getattr(module, "_no_split_modules", None) or ())
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    layers = [layer for m in lists for layer in m if type(layer).__name__ in block_names]
    if not layers:
        homogeneous = [m for m in lists if len({type(layer) for layer in m}) == 1]
        layers = list(homogeneous[0]) if homogeneous else []
    if not layers:
        raise MloraError(
            f"gradient_checkpoint: found no decoder layers in {type(model).__name__}; "
            "use gradient_checkpoint none"
        )
    # A block nested in another block is covered by the outer one.
    inner = {id(m) for layer in layers for m in layer.modules() if m is not layer}
    return [layer for layer in layers if id(layer) not in inner]


def apply_gradient_checkpointing(
    model: nn.Module,
    mode: str,
    backend: Backend | None = None,
    side_losses: SideLosses | None = None,
    random_streams: RandomStreams | None = None,
    pass_states: PassStates | None = None,
) -> list[nn.Module]:
    """Checkpoint every decoder layer of ``model`` in place (``none`` undoes it).

    Only training forwards with grad enabled are affected; evaluation and generation run the
    layers as before. Applying again replaces the previous mode.

    Args:
        model: A transformers model, possibly wrapped (PEFT, mlora).
        mode: One of :data:`CHECKPOINT_MODES`.
        backend: The backend whose RNG is restored on recompute; defaults to
            :func:`get_backend`.
        side_losses: Where the layers record losses they don't return (the model context's
            ``aux_losses``); recompute keeps their gradient path.
        random_streams: Random streams the layers draw from besides the global RNG (the model
            context's ``generators``); recompute replays them.
        pass_states: Where the layers read the pass in flight (the model context); recompute
            installs the state of each layer's forward again for its recomputation.

    Returns:
        The layers now checkpointed (empty for ``none``).

    Raises:
        MloraError: Unknown mode, or no decoder layers found.
    """
    if mode not in CHECKPOINT_MODES:
        raise MloraError(f"gradient_checkpoint {mode!r} is not one of {'|'.join(CHECKPOINT_MODES)}")
    layers = find_decoder_layers(model)
    for layer in layers:
        _restore_forward(layer)
    if mode == "none":
        return []
    backend = backend if backend is not None else get_backend()
    for layer in layers:
        previous = layer.__dict__.get("forward")
        original = layer.forward
        wrapped = functools.partial(
            _checkpointed_forward,
            _FORWARDS[mode],
            layer,
            original,
            backend,
            side_losses,
            random_streams,
            pass_states,
        )
        layer.forward = functools.update_wrapper(wrapped, original)
        setattr(layer, _STATE_ATTR, (mode, previous))
    return layers


def resolve_checkpoint_mode(mode: str, backend: Backend) -> str:
    """The mode the ``gradient_checkpoint`` key asks for, with ``auto`` decided by the device.

    ``auto`` recomputes on a GPU (CUDA, MPS), where activation memory is what limits the batch,
    and does nothing on CPU, where host memory is usually ample and recomputing costs time.
    """
    if mode != "auto":
        return mode
    return "none" if backend.name == "cpu" else "recompute"


def checkpoint_mode(model: nn.Module) -> str:
    """The mode :func:`apply_gradient_checkpointing` last applied to ``model``."""
    for module in model.modules():
        state = getattr(module, _STATE_ATTR, None)
        if state is not None:
            return state[0]
    return "none"


def _restore_forward(layer: nn.Module) -> None:
    state = layer.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return
    _, previous = state
    if previous is None:
        del layer.forward
    else:
        layer.forward = previous
