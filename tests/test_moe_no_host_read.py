"""MoE layers read nothing back to the host in a training step (a CPU stand-in for CUDA's
sync debug mode, which ``tests/test_no_host_sync.py`` uses on a GPU).

Every way Python code can pull a tensor's value to the host (``item``, ``tolist``, ``bool``,
``int``, ``float``, ``nonzero``, ``numpy``) is made to raise while a MixLoRA FFN (top-k and
switch) and a MoLA linear run forward and backward on a collated batch, for each device-side
``routed_lora`` implementation. ``loop`` (which does read the counts) must trip it: the guard
is live.
"""

from __future__ import annotations

import pytest
import torch

from mlora.adapters.mixlora.feed_forward import MixLoraExperts
from mlora.batching.collate import collate
from mlora.config.schema import parse_config
from mlora.data.rows import IGNORE_INDEX, TokenizedRow
from mlora.model.multi_lora import MultiLoraModel
from mlora.training.trainer import spec_from_config
from tests.conftest import make_model

CPU = torch.device("cpu")
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "numpy")


class HostRead(AssertionError):
    pass


def _refuse(name: str):
    def method(self, *args, **kwargs):
        raise HostRead(f"Tensor.{name} in the step")

    return method


class Guard:
    """Host reads raise while ``on`` (module hooks turn it on around the adapter layers); on
    CUDA, the real thing: ``torch.cuda.set_sync_debug_mode("error")``."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.saved = {name: getattr(torch.Tensor, name) for name in READS}
        self.guarded = 0  # times the guard was switched on

    def on(self, *_: object) -> None:
        self.guarded += 1
        if self.cuda:
            torch.cuda.set_sync_debug_mode("error")
            return
        for name in READS:
            setattr(torch.Tensor, name, _refuse(name))

    def off(self, *_: object) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
            return
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)


ADAPTERS = {
    "mixlora": {"routing_strategy": "mixlora", "num_experts": 4, "top_k": 2, "jitter_noise": 0.1,
                "target_modules": ["gate_proj", "up_proj", "down_proj"]},
    "switch": {"routing_strategy": "mixlora-switch", "num_experts": 4, "expert_capacity": 3,
               "target_modules": ["gate_proj", "up_proj", "down_proj"]},
    "mola": {"routing_strategy": "mola", "num_experts": 4, "top_k": 2, "router_loss": True,
             "target_modules": ["q_proj", "down_proj"]},
    "dynamic": {"routing_strategy": "mixlora-dynamic", "num_experts": 4, "top_p": 0.7,
                "target_modules": ["gate_proj", "up_proj", "down_proj"]},
    "mixlora-dora": {"routing_strategy": "mixlora", "num_experts": 4, "top_k": 2,
                     "use_dora": True, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
    "switch-dora": {"routing_strategy": "mixlora-switch", "num_experts": 4, "expert_capacity": 3,
                    "use_dora": True, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
    "mola-dora": {"routing_strategy": "mola", "num_experts": 4, "top_k": 2, "use_dora": True,
                  "target_modules": ["q_proj", "down_proj"]},
}  # fmt: skip


def run_step(
    kind: str,
    device: torch.device = CPU,
    impl: str = "auto",
    drop_unused_slots: bool | None = None,
) -> None:
    """One forward + backward of adapter ``kind`` with host reads refused inside its layers and
    the backward; asserts the guard was live in every adapter layer and the step completed.

    ``impl`` and ``drop_unused_slots`` are set on the adapter's MoE modules (``routed_impl``;
    MixLoRA's ``drop_unused_slots``, None: chosen by the device)."""
    config = parse_config(
        {"lora": [{"name": kind, "data": "x.json", "r": 4, "lora_dropout": 0.1, **ADAPTERS[kind]}]}
    )
    model = MultiLoraModel(make_model(vocab_size=96))
    model.add_adapter(kind, spec_from_config(config.lora[0]))
    for _, module in model.adapter_modules(kind):
        module.routed_impl = impl
        if isinstance(module, MixLoraExperts):
            module.drop_unused_slots = drop_unused_slots
    model.to(device).train()
    rows = [
        TokenizedRow(list(range(4, 4 + n)), [IGNORE_INDEX, *range(5, 4 + n)]) for n in (9, 4, 5)
    ]
    batch = collate([(kind, rows)], pad_token_id=0, device=device)  # packed, padded, reordered
    assert batch.token_real_index is not None
    model.context.generators.get(kind, device)  # created (seeded on the host) beforehand
    # transformers reads the packed position ids on the host to build its attention mask, so
    # the guard is on inside the adapter layers' forward and for the whole backward
    guard = Guard(device)
    for path, _ in model.adapter_modules(kind):  # MixLoRA: the FFN holding the experts
        path = path.split(".moes.")[0]
        module = model.model.get_submodule(path)
        module.register_forward_pre_hook(guard.on)
        module.register_forward_hook(guard.off)
    with model.context.install(batch.pass_state()):
        try:
            hidden = model.model.model(
                input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
            ).last_hidden_state
            loss = hidden.float().pow(2).mean()
            guarded_layers = guard.guarded
            guard.on()
            loss.backward()
        finally:
            guard.off()
    modules = {path.split(".moes.")[0] for path, _ in model.adapter_modules(kind)}
    assert guarded_layers == len(modules) > 0  # each adapter layer ran under the guard
    params = [p for _, m in model.adapter_modules(kind) for p in m.parameters()]
    assert any(p.grad is not None and p.grad.any() for p in params)  # it trained
    assert torch.isfinite(loss.detach().cpu()).all()


@pytest.mark.parametrize("impl", ["grouped", "masked"])
@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_moe_step_reads_nothing_back(kind: str, impl: str) -> None:
    run_step(kind, impl=impl, drop_unused_slots=False)  # what accelerators choose


def test_the_guard_catches_a_host_read() -> None:
    with pytest.raises(HostRead):
        run_step("mola", impl="loop")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["auto", "masked"])
@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_moe_step_does_not_sync_on_cuda(kind: str, impl: str) -> None:
    run_step(kind, torch.device("cuda"), impl=impl)
