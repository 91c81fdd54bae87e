"""The multi-adapter hot path never waits for the device: a CUDA step under sync debug mode.

``torch.cuda.set_sync_debug_mode("error")`` raises on any operation that synchronises the host
with the device (``.item()``, ``.tolist()``, a blocking copy, ``nonzero``...). The adapter-aware
layer (segmented LoRA op, per-adapter dropout streams) forward + backward and the fused
optimizer step with the device-side fault flag must run under it. (The whole model step is not
covered: transformers' packed-sequence detection reads the position ids on the host.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mlora.adapters import MultiLoraLinear
from mlora.batching.layout import BatchLayout, LayoutContext
from mlora.config.schema import parse_config
from mlora.training.optim import build_optimizer, step_unless


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_layer_and_optimizer_step_do_not_sync(dtype: torch.dtype) -> None:
    device = torch.device("cuda")
    context = LayoutContext()
    layer = MultiLoraLinear(nn.Linear(256, 256).to(device, dtype).requires_grad_(False), context)
    names = [f"a{i}" for i in range(16)]
    for name in names:
        layer.add_adapter(name, 16, 2.0, dropout=0.1)
    layer.train()
    layout = BatchLayout.from_lengths([(name, 64) for name in names])
    x = torch.randn(len(names) * 64, 256, device=device, dtype=dtype, requires_grad=True)
    adapter = parse_config({"lora": [{"name": "a", "data": "x.json"}]}).lora[0]
    optimizer = build_optimizer(adapter, list(layer.adapters.named_parameters()))
    assert optimizer.defaults["fused"]
    flag = torch.zeros((), device=device)
    for name in names:  # streams created before the checked region (creation seeds on host)
        context.generators.get(name, device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with context.use(layout):
            y = layer(x)
        y.float().pow(2).mean().backward()
        step_unless(optimizer, flag)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(y).all()
