"""The device-side skip of a non-finite step: fused AdamW / SGD leave everything untouched.

Reference: the same optimizer that simply never took the bad step (``step()`` not called).
"""

from __future__ import annotations

import copy

import pytest
import torch

from mlora.config.schema import parse_config
from mlora.training.optim import build_optimizer, step_unless


def optimizer_for(optim: str) -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
    adapter = {"name": "a", "data": "x.json", "optim": optim, "lr": 0.1, "momentum": 0.9}
    config = parse_config({"lora": [{**adapter, "weight_decay": 0.01}]}).lora[0]
    param = torch.nn.Parameter(torch.randn(6, generator=torch.Generator().manual_seed(0)))
    return param, build_optimizer(config, [("a.lora_A.weight", param)])


@pytest.mark.parametrize("optim", ["adamw", "sgd"])
def test_skipped_step_leaves_weights_state_and_step_count_untouched(optim: str) -> None:
    param, optimizer = optimizer_for(optim)
    assert optimizer.defaults["fused"]  # CPU has fused AdamW and SGD: the no-sync path
    param.grad = torch.ones(6)
    step_unless(optimizer, torch.zeros(()))  # a good step: applied
    reference_param, reference_optimizer = copy.deepcopy((param, optimizer))

    param.grad = torch.full((6,), float("nan"))
    step_unless(optimizer, torch.ones(()))  # a bad step: skipped on the device
    assert torch.equal(param, reference_param)
    for key, value in reference_optimizer.state[reference_param].items():
        assert torch.equal(torch.as_tensor(optimizer.state[param][key]), torch.as_tensor(value))

    for p, o in ((param, optimizer), (reference_param, reference_optimizer)):
        p.grad = torch.full((6,), 0.5)
        step_unless(o, torch.zeros(()))  # the next good step: the same as if none was skipped
    assert torch.equal(param, reference_param)
    assert not torch.equal(param, torch.randn(6, generator=torch.Generator().manual_seed(0)))
