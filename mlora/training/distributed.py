"""Data parallel training on ``torch.distributed``: the process group, and what ranks agree on.

mlora runs under the usual launchers (``torchrun``, ``accelerate launch``), which start one
process per device and describe the group in environment variables (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). With ``WORLD_SIZE`` > 1 this module joins that
group (nccl on CUDA, gloo on CPU); with one process every operation here is a no-op, so the
single-device path is the same code.

Ranks never exchange activations or rows: each takes its share of every adapter's micro-batch
(``mlora.batching.dispatcher.MicroBatch.shard``), and at an optimizer step the adapter gradients and
step losses are summed with ONE ``all_reduce`` over a flat buffer (``all_reduce_flat``; not DDP,
which fails when a rank has no rows of some adapter). Host-side decisions every rank must take
together (stop on a signal, errors before training) go through a small CPU (gloo) group, so
they never wait on the accelerator.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mlora.adapters.spec import AdapterModel
from mlora.batching.dispatcher import shard_bounds
from mlora.config.schema import TrainConfig
from mlora.core.errors import MloraError
from mlora.core.launcher_env import env_rank, env_world_size
from mlora.training.recompute import find_decoder_layers

logger = logging.getLogger("mlora")
BACKENDS = ("nccl", "gloo")


class AgreedError(MloraError):
    """An error every rank raises together; only rank 0 prints it (one line, not N)."""

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.quiet = rank != 0


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """nccl on CUDA, gloo elsewhere; an explicit request is checked against the device.

    Raises:
        AgreedError: nccl asked for without a CUDA device, or an unknown backend.
    """
    if requested is None:
        return "nccl" if device.type == "cuda" else "gloo"
    if requested not in BACKENDS:
        raise AgreedError(
            f"--dist_backend must be one of {', '.join(BACKENDS)}, got {requested!r}", env_rank()
        )
    if requested == "nccl" and (device.type != "cuda" or not dist.is_nccl_available()):
        raise AgreedError(
            f"--dist_backend nccl needs CUDA devices, but this run uses {device.type} "
            "(use gloo, or run on GPUs)",
            env_rank(),
        )
    return requested


def check_world_size(config: TrainConfig, world_size: int) -> None:
    """Every process takes a share of each micro-batch: none may be smaller than the group.

    Raises:
        AgreedError: naming the adapter and the key.
    """
    if world_size <= 1:
        return
    for adapter in config.lora:
        rows = adapter.micro_batch_size or adapter.batch_size
        if rows < world_size:
            key = "micro_batch_size" if adapter.micro_batch_size else "batch_size"
            raise AgreedError(
                f"adapter {adapter.name!r}: {key} {rows} is smaller than the world size "
                f"{world_size} (each process takes a share of every micro-batch); raise "
                f"{key} to at least {world_size} or start fewer processes",
                env_rank(),
            )


@dataclass
class Distributed:
    """This process's place in the group; ``world_size`` 1 means no group at all.

    Attributes:
        rank: global rank (0 writes every file and the log).
        world_size: processes in the group.
        backend: ``nccl`` or ``gloo`` (``none`` without a group).
        host_group: a gloo group for host-side flags and objects (the default group on CPU).
    """

    rank: int = 0
    world_size: int = 1
    backend: str = "none"
    host_group: Any = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes adapters, checkpoints, logs and progress."""
        return self.rank == 0

    def shard(self, count: int) -> tuple[int, int]:
        """This rank's contiguous share ``[start, end)`` of ``count`` items (see shard_bounds)."""
        return shard_bounds(count, self.rank, self.world_size)

    def all_reduce_flat(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Sum ``tensors`` over all ranks with one collective on one flat buffer.

        Args:
            tensors: same shapes, order and dtype (fp32) on every rank.

        Returns:
            The summed tensors, shaped as given (the inputs themselves with one process).
        """
        if not self.enabled or not tensors:
            return list(tensors)
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        return [
            part.view_as(t)
            for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)
        ]

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (a host-side collective; every rank calls it)."""
        if not self.enabled:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(value.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (picklable objects)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.host_group)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.host_group)

    def agree_to_start(self, fingerprint: dict[str, str], error: MloraError | None) -> None:
        """Every rank checks in before training: all start, or all stop with the same line.

        Args:
            fingerprint: what must be equal on every rank (config, seed, base model, data), as
                ``{what: hash}``.
            error: this rank's error in the checks before training, if any.

        Raises:
            AgreedError: some rank failed its checks (its message, naming the rank), or some
                rank's fingerprint differs from rank 0's (naming the rank and what differs).
        """
        reports = self.gather((fingerprint, None if error is None else str(error)))
        for rank, (_, message) in enumerate(reports):
            if message is not None:
                prefix = f"rank {rank}: " if self.enabled and rank else ""
                raise AgreedError(f"{prefix}{message}", self.rank)
        reference = reports[0][0]
        for rank, (theirs, _) in enumerate(reports[1:], start=1):
            keys = reference.keys() | theirs.keys()
            differing = sorted(k for k in keys if reference.get(k) != theirs.get(k))
            if differing:
                raise AgreedError(
                    f"rank {rank} does not run the same training as rank 0: its "
                    f"{', '.join(differing)} differ (every process must get the same command "
                    "line, config and data files)",
                    self.rank,
                )


def fingerprint(**parts: Any) -> dict[str, str]:
    """``{name: short hash}`` of JSON-able values, for ``agree_to_start``."""
    return {
        name: hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[
            :16
        ]
        for name, value in parts.items()
    }


def shard_frozen_base(model: nn.Module, adapter_params: set[nn.Parameter]) -> int:
    """FSDP2 over the frozen base of a transformers causal LM: each rank keeps 1/N of it.

    ``fully_shard`` on every decoder layer, on the backbone (embeddings, final norm) and on
    ``lm_head``; a layer's weights are gathered just before it runs and freed after. The
    adapters stay whole, ordinary tensors on every rank (``ignored_params``): their gradients
    are still summed by ``Distributed.all_reduce_flat`` and every rank steps them. A tied
    ``lm_head`` (the embedding matrix) stays whole too: mlora calls it outside the backbone.

    Args:
        model: the transformers model (``MultiLoraModel.model``) with its adapters attached.
        adapter_params: every adapter parameter.

    Returns:
        How many modules were sharded.
    """
    from torch.distributed.fsdp import fully_shard

    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    ignored = set(adapter_params) | ({head.weight} if tied else set())
    units = [*find_decoder_layers(model), model.base_model]
    if head is not None and not tied:
        units.append(head)
    for unit in units:
        fully_shard(unit, ignored_params=ignored)
    return len(units)


@dataclass(frozen=True)
class ShardedBase:
    """What ``--fsdp`` loading did: ``units`` modules sharded, a base of ``full_bytes``."""

    units: int
    full_bytes: int


def load_sharded_base(model: nn.Module, state: Distributed) -> ShardedBase:
    """FSDP2 over a base model that only rank 0 holds in full; the others built it on meta.

    The torchtune pattern: rank 0 takes the full state dict of the model it read (CPU), every
    rank shards the base (``shard_frozen_base``), then ``set_model_state_dict`` with
    ``broadcast_from_rank0`` sends each tensor from rank 0 and every rank keeps its shard. The
    buffers outside the state dict (rotary ``inv_freq``) are broadcast too. Call it before any
    adapter is attached: adapters are created on the sharded base, whole on every rank.

    Returns:
        How many modules were sharded, and the base's size.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    full_state = model.state_dict() if state.is_main else {}
    units = shard_frozen_base(model, set())
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full_state, options=options)
    del full_state
    device = next(p for p in model.parameters() if not p.is_meta).device
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            received = buffer if state.is_main else torch.empty_like(buffer, device=device)
            dist.broadcast(received, src=0)
            module._buffers[name] = received
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and head is not None:
        head.weight = embeddings.weight  # loading assigns new tensors: tie them again
    return ShardedBase(units, full_bytes)


def router_stat_slots(
    model: AdapterModel, names: Sequence[str]
) -> dict[str, tuple[dict[int, int], int]]:
    """The adapter modules whose router losses are means over a micro-batch, per adapter.

    Under data parallel they record router sums that the trainer reduces over ranks
    (``mlora.batching.aux_losses.AuxLossCollector.use_global_stats``): every module whose
    ``router_stat_experts`` hook says so (MixLoRA routers and MoLA mixtures with a router loss,
    MeteoRA gates with a gate loss). Every rank walks the same model, so slots agree across
    ranks without a collective.

    Returns:
        ``{adapter: ({id(module): slot}, E + 2)}`` in the model's walk order; adapters without
        a router loss are absent.
    """
    slots: dict[str, tuple[dict[int, int], int]] = {}
    for name in names:
        for _, module in model.adapter_modules(name):
            experts = getattr(module, "router_stat_experts", None)
            if experts is not None:
                ids, _ = slots.setdefault(name, ({}, experts + 2))
                ids[id(module)] = len(ids)
    return slots


@contextmanager
def process_group(device: torch.device, backend: str | None = None) -> Iterator[Distributed]:
    """Join the launcher's process group for the duration of a run (nothing with one process).

    A group that exists already (``accelerate`` or a notebook set it up) is used as is and left
    open; one created here is destroyed on exit.

    Raises:
        AgreedError: nccl requested without CUDA.
    """
    world_size = env_world_size()
    chosen = resolve_backend(backend, device)
    if world_size <= 1:
        yield Distributed()
        return
    created = not dist.is_initialized()
    if created:
        options: dict[str, Any] = {"backend": chosen}
        if chosen == "nccl":
            options["device_id"] = device
        dist.init_process_group(**options)
    chosen = dist.get_backend()
    host_group = dist.new_group(backend="gloo") if chosen != "gloo" else None
    state = Distributed(dist.get_rank(), dist.get_world_size(), chosen, host_group)
    if state.is_main:
        logger.info("distributed: world size %d, backend %s", state.world_size, chosen)
    try:
        yield state
    finally:
        if created:
            dist.destroy_process_group()
