"""Backends, precision, quantization, attention and gradient checkpointing wired end to end:
through ``mlora.train`` / ``mlora.py`` and the real trainer/model path, on CPU; the CUDA-only
paths (4/8-bit, flash-attn, bf16 speed, CUDA RNG restore) are ``gpu`` tests."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mlora.training.recompute as checkpointing
from mlora.adapters.linear import dense_weight
from mlora.adapters.spec import LoraSpec
from mlora.api import train
from mlora.batching.layout import BatchLayout
from mlora.cli import launch
from mlora.cli.train import main
from mlora.config.schema import parse_config
from mlora.core.errors import ConfigError
from mlora.hardware.backends import CpuBackend, CudaBackend, get_backend
from mlora.hardware.precision import build_quantization_config
from mlora.model.multi_lora import MultiLoraModel
from mlora.ops.varlen_attention import VARLEN_ATTENTION
from mlora.training.recompute import find_decoder_layers, resolve_checkpoint_mode
from mlora.training.trainer import Trainer, prepare_data
from tests.conftest import make_model, make_tokenizer
from tests.helpers import adapter_tensors, addition_rows, reverse_rows, write_json, write_template

PACKAGE = Path(__file__).resolve().parents[1] / "mlora"
DEVICE_CALL = re.compile(
    r"torch\.(cuda|mps)\b|torch\.backends\.(cuda|cudnn|mps)\b|from torch import .*\b(cuda|mps)\b"
    r"|\.cuda\("
)


def test_no_device_calls_outside_the_backend_module() -> None:
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if "backends" not in path.relative_to(PACKAGE).parts
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if DEVICE_CALL.search(line)
    ]
    assert not offenders, "route these through mlora.hardware.backends:\n" + "\n".join(offenders)


# --- configs and runs -------------------------------------------------------------------------


def raw_config(tmp_path: Path, gradient_checkpoint: str = "none", **extra) -> dict:
    """Three adapters of different shapes sharing each step, dropout on, one DoRA."""
    template = write_template(tmp_path)
    add = write_json(tmp_path / "add.json", addition_rows(8))
    rev = write_json(tmp_path / "rev.json", reverse_rows(8))
    common = {"prompt": template, "num_epochs": 1, "lora_dropout": 0.1, "lr": 1e-2, **extra}
    return {
        "cutoff_len": 32,
        "log_step": 1,
        "gradient_checkpoint": gradient_checkpoint,
        "lora": [
            {"name": "a", "data": add, "r": 4, "batch_size": 4, "micro_batch_size": 2, **common},
            {"name": "b", "data": rev, "r": 2, "batch_size": 4, "micro_batch_size": 2,
             "target_modules": ["q_proj", "up_proj", "down_proj"], "use_dora": True, **common},
            {"name": "c", "data": rev, "r": 8, "batch_size": 4, "micro_batch_size": 2,
             "lora_init": "gaussian", **common},
        ],
    }  # fmt: skip


def make_trainer(tmp_path: Path, mode: str, device: str = "cpu", **extra) -> Trainer:
    tokenizer = make_tokenizer()
    config = parse_config(raw_config(tmp_path, mode, **extra), "test-config")
    model = make_model(vocab_size=len(tokenizer), init_range=0.2).to(device)
    model.config.attention_dropout = 0.1  # the base's own dropout must replay too
    trainer = Trainer(
        MultiLoraModel(model), tokenizer, config, prepare_data(config, tokenizer), tmp_path, seed=5
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B != 0, so lora_A's gradient (behind the dropout mask) is not zero
        for run in trainer.runs:
            for _, module in trainer.model.adapter_modules(run.name):
                for name, weight in module.named_parameters():
                    if "lora_B" in name:  # also MoE experts' lora_B
                        weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)
    return trainer


def first_step_grads(trainer: Trainer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run the trainer's first step (a micro-batch of every adapter, no optimizer step yet)."""
    trainer.model.train()
    by_queue = {id(run.queue): run for run in trainer.runs}
    step = [(by_queue[id(q)], mb) for q, mb in trainer.dispatcher.next_step()]
    assert len(step) == 3 and not any(mb.ends_step for _, mb in step)
    trainer.train_step(step)
    grads = {  # an expert that got no token has no gradient: zero
        f"{run.name}/{path}.{n}": torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        for run in trainer.runs
        for path, module in trainer.model.adapter_modules(run.name)
        for n, p in module.named_parameters()
    }
    losses = torch.stack([run.step_loss for run, _ in step])
    return losses, grads


def assert_same_grads(reference, candidate, all_nonzero: bool = True) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = reference, candidate
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 20
    nonzero = [name for name, grad in grads_a.items() if grad.abs().sum() > 0]
    assert len(nonzero) == len(grads_a) if all_nonzero else len(nonzero) > len(grads_a) / 2
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-6, rtol=1e-5, msg=name)


# --- gradient checkpointing through the trainer ------------------------------------------------


def test_recompute_and_offload_equal_plain_through_the_trainer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = first_step_grads(make_trainer(tmp_path, "none"))

    recompute = make_trainer(tmp_path, "recompute")
    assert recompute.gradient_checkpoint == "recompute"
    calls: list[int] = []
    for layer in find_decoder_layers(recompute.model.model):
        layer.mlp.register_forward_hook(lambda *_: calls.append(1))
    assert_same_grads(reference, first_step_grads(recompute))
    assert len(calls) == 2 * 2  # each of the 2 layers ran again in backward

    # On CPU, offload's hooks leave host tensors in place; make them store copies instead, as
    # a device -> host move would, so the unpacked activations are really new tensors.
    packed: list[int] = []

    def copy_pack(self, tensor: torch.Tensor):
        if self._storage(tensor) in self.keep_storages:
            return tensor
        packed.append(1)
        return tensor.device, tensor.detach().clone()

    monkeypatch.setattr(checkpointing._OffloadHooks, "pack", copy_pack)
    offload = make_trainer(tmp_path, "offload")
    assert_same_grads(reference, first_step_grads(offload))
    assert len(packed) > 20


@pytest.mark.parametrize("strategy", ["mixlora", "mixlora-switch"])
def test_checkpointing_with_mixlora_adapters_through_the_trainer(
    tmp_path: Path, strategy: str
) -> None:
    # Router losses recorded on the side, jitter noise and expert dropout must all replay.
    moe = {"routing_strategy": strategy, "num_experts": 3, "jitter_noise": 0.1,
           "target_modules": ["q_proj", "gate_proj", "up_proj", "down_proj"]}  # fmt: skip
    reference = first_step_grads(make_trainer(tmp_path, "none", **moe))
    assert any(".router" in name or "gate." in name for name in reference[1])
    for mode in ("recompute", "offload"):
        candidate = first_step_grads(make_trainer(tmp_path, mode, **moe))
        # switch routing may leave an expert without tokens (a zero gradient, in both runs)
        assert_same_grads(reference, candidate, all_nonzero=strategy == "mixlora")


def test_whole_runs_with_checkpointing_equal_plain(tmp_path: Path) -> None:
    weights = {}
    for mode in ("none", "recompute"):
        (tmp_path / mode).mkdir()
        trainer = make_trainer(tmp_path / mode, mode)
        trainer.train()
        weights[mode] = {run.name: adapter_tensors(trainer, run.name) for run in trainer.runs}
    for name, tensors in weights["none"].items():
        for key, value in tensors.items():
            torch.testing.assert_close(weights["recompute"][name][key], value, msg=key)


def test_gradient_checkpoint_key_and_auto_default(tmp_path: Path) -> None:
    assert parse_config(raw_config(tmp_path, "auto"), "c").gradient_checkpoint == "auto"
    with pytest.raises(ConfigError, match="key 'gradient_checkpoint' must be one of 'auto'"):
        parse_config(raw_config(tmp_path, "full"), "c.json")
    assert resolve_checkpoint_mode("auto", CpuBackend()) == "none"
    assert resolve_checkpoint_mode("auto", _FakeCuda()) == "recompute"
    assert resolve_checkpoint_mode("offload", CpuBackend()) == "offload"
    assert make_trainer(tmp_path, "auto").gradient_checkpoint == "none"  # on this CPU


class _FakeCuda(CudaBackend):
    def __init__(self) -> None:
        self._device = torch.device("cpu")


# --- precision and attention through mlora.train ------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Trainer]:
    """The same two-adapter config trained four ways on CPU."""
    root = tmp_path_factory.mktemp("precision")
    raw = raw_config(root, "none", lora_dropout=0.0)
    raw["lora"] = raw["lora"][:2]
    config = parse_config(raw, "c")
    kinds = {
        "fp32": {},
        "bf16": {"dtype": torch.bfloat16},
        "eager": {"attn_implementation": "eager"},
        "flash": {"attn_implementation": "flash_attn"},
    }
    out = {}
    for kind, kwargs in kinds.items():
        if kind == "flash":
            with pytest.warns(UserWarning, match="--attn_impl flash_attn: .*; using sdpa"):
                out[kind] = train(config, str(tiny_model_dir), root / kind, device="cpu", **kwargs)
        else:
            out[kind] = train(config, str(tiny_model_dir), root / kind, device="cpu", **kwargs)
    return out


def histories(trainer: Trainer) -> torch.Tensor:
    return torch.tensor([run.history for run in trainer.runs])


def test_bf16_base_keeps_adapters_fp32_and_matches_fp32_loss(runs: dict[str, Trainer]) -> None:
    trainer = runs["bf16"]
    base = trainer.model.model
    assert base.get_input_embeddings().weight.dtype == torch.bfloat16
    for run in trainer.runs:
        params = trainer.model.adapter_parameters(run.name)
        assert params and all(p.dtype == torch.float32 for p in params)
        state = [s for s in run.optimizer.state.values() if "exp_avg" in s]
        assert state and all(s["exp_avg"].dtype == torch.float32 for s in state)
    reference = histories(runs["fp32"])
    assert reference.shape[1] >= 2
    torch.testing.assert_close(histories(trainer), reference, rtol=3e-2, atol=0)


def test_attention_kernels_give_equal_losses(runs: dict[str, Trainer]) -> None:
    # sdpa models train on one stream of rows with sdpa per row (mlora.ops.varlen_attention)
    assert runs["fp32"].model.model.config._attn_implementation == VARLEN_ATTENTION
    assert runs["eager"].model.model.config._attn_implementation == "eager"
    assert runs["flash"].model.model.config._attn_implementation == VARLEN_ATTENTION  # sdpa
    reference = histories(runs["fp32"])
    torch.testing.assert_close(histories(runs["eager"]), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(histories(runs["flash"]), reference, rtol=0, atol=0)


# --- the command line ---------------------------------------------------------------------------


def cli_args(tmp_path: Path, model_dir: Path) -> list[str]:
    config = tmp_path / "c.json"
    config.write_text(json.dumps(raw_config(tmp_path)))
    return ["--base_model", str(model_dir), "--config", str(config), "--dir", str(tmp_path / "o")]


@pytest.mark.parametrize("flag", ["--load_4bit", "--load_8bit"])
def test_quantization_without_cuda_is_a_one_line_error(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    assert main([*cli_args(tmp_path, tiny_model_dir), "--device", "cpu", flag]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {flag} needs a CUDA device; the selected backend is CPU\n"
    assert not (tmp_path / "o").exists()


def test_quantization_flags_are_exclusive(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(SystemExit):
        main([*cli_args(tmp_path, tiny_model_dir), "--load_4bit", "--load_8bit"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("how", ["env", "flag"])
def test_forced_missing_backend_is_a_one_line_error(
    tmp_path: Path,
    tiny_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    args = cli_args(tmp_path, tiny_model_dir)
    if how == "env":
        monkeypatch.setenv("MLORA_BACKEND_TYPE", "CUDA")
        expected = "error: MLORA_BACKEND_TYPE='CUDA': the CUDA backend is not available here\n"
    else:
        args += ["--device", "cuda"]
        expected = "error: --device='cuda': the CUDA backend is not available here\n"
    assert main(args) == 2
    assert capsys.readouterr().err == expected


def test_env_var_picks_the_backend_of_a_run(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLORA_BACKEND_TYPE", "cpu")
    args = cli_args(tmp_path, tiny_model_dir)
    assert main([*args, "--bf16", "--attn_impl", "eager"]) == 0
    assert (tmp_path / "o" / "a" / "adapter_model.safetensors").is_file()


def test_launch_run_flags_reach_mlora_py() -> None:
    def mapped(*flags: str) -> str:
        return " ".join(launch.mlora_argv(launch.build_parser().parse_args(["run", *flags])))

    assert mapped("--quantize", "4bit", "--attn_impl", "flash_attn", "--dtype", "bf16") == (
        "--config mlora.json --bf16 --load_4bit --attn_impl flash_attn"
    )
    assert mapped("--quantize", "8bit") == "--config mlora.json --load_8bit"


# --- CUDA only ----------------------------------------------------------------------------------


@pytest.mark.gpu
def test_recompute_restores_cuda_rng_through_the_trainer(tmp_path: Path) -> None:
    reference = first_step_grads(make_trainer(tmp_path, "none", "cuda"))
    for mode in ("recompute", "offload"):
        trainer = make_trainer(tmp_path, mode, "cuda")
        assert isinstance(trainer.backend, CudaBackend)
        assert_same_grads(reference, first_step_grads(trainer))


@pytest.mark.gpu
@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_quantized_training_on_cuda(tmp_path: Path, tiny_model_dir: Path, quantize: str) -> None:
    pytest.importorskip("bitsandbytes")
    config = parse_config(raw_config(tmp_path, "recompute", lora_dropout=0.0), "c")
    full = train(config, str(tiny_model_dir), tmp_path / "full", dtype=torch.bfloat16)
    quant = train(
        config, str(tiny_model_dir), tmp_path / "q", dtype=torch.bfloat16, quantize=quantize
    )
    layer = find_decoder_layers(quant.model.model)[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == ("Linear4bit" if quantize == "4bit" else "Linear8bitLt")
    for run in quant.runs:
        assert all(p.dtype == torch.float32 for p in quant.model.adapter_parameters(run.name))
        assert (tmp_path / "q" / run.name / "adapter_model.safetensors").is_file()
    losses, reference = histories(quant), histories(full)
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses, reference, rtol=0.1, atol=0.1)  # quantization error


@pytest.mark.gpu
def test_dora_on_4bit_base_equals_dequantized_reference(tiny_model_dir: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    backend = get_backend("cuda")
    quant_config = build_quantization_config(True, False, torch.float32, backend)
    quant = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=quant_config, device_map={"": str(backend.device)}
    )
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(backend.device)
    targets = ("q_proj", "v_proj", "down_proj")
    for (name, module), (_, twin) in zip(quant.named_modules(), dense.named_modules(), strict=True):
        if name.rsplit(".", 1)[-1] in targets:
            twin.weight.data.copy_(dense_weight(module).float())  # the same (dequantized) W
    spec = LoraSpec(r=4, scaling=2.0, target_modules=targets, use_dora=True)
    models = []
    for hf in (quant, dense):
        torch.manual_seed(0)
        model = MultiLoraModel(hf)
        model.add_adapter("d", spec)
        for _, module in model.adapter_modules("d"):
            torch.nn.init.normal_(module.lora_B.weight, std=0.05)
        models.append(model)
    ids = torch.randint(0, 64, (2, 16), device=backend.device)
    mask = torch.ones_like(ids)
    layout = BatchLayout.from_row_adapters(["d", "d"])
    outs = [m(ids, mask, layout).logits.float() for m in models]
    for out in outs:
        out.square().mean().backward()
    torch.testing.assert_close(outs[0], outs[1], atol=1e-3, rtol=1e-3)
    for (_, a), (_, b) in zip(
        models[0].adapter_modules("d"), models[1].adapter_modules("d"), strict=True
    ):
        torch.testing.assert_close(a.magnitude.weight, b.magnitude.weight, atol=1e-4, rtol=1e-4)
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(pa.grad, pb.grad, atol=1e-3, rtol=1e-2)


@pytest.mark.gpu
def test_flash_attn_equals_sdpa_through_training(tmp_path: Path, tiny_model_dir: Path) -> None:
    pytest.importorskip("flash_attn")
    config = parse_config(raw_config(tmp_path, "none", lora_dropout=0.0), "c")
    kwargs = {"dtype": torch.bfloat16, "device": "cuda"}
    flash = train(config, str(tiny_model_dir), tmp_path / "f", attn_implementation=None, **kwargs)
    sdpa = train(config, str(tiny_model_dir), tmp_path / "s", attn_implementation="sdpa", **kwargs)
    assert flash.model.model.config._attn_implementation == "flash_attention_2"  # the default
    torch.testing.assert_close(histories(flash), histories(sdpa), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_bf16_step_on_cuda_keeps_adapters_fp32_and_follows_fp32() -> None:
    """A training step with a bf16 base on CUDA: adapter weights and gradients stay fp32, and
    the loss and LoRA gradients follow the fp32 model's (bf16 rounding). Its speed against fp32
    is a benchmark, not a test: ``python benchmarks/bench_precision.py``."""
    backend = get_backend("cuda")
    backend.allow_tf32(False)
    ids = torch.randint(0, 512, (4, 64), device=backend.device)
    layout = BatchLayout.from_row_adapters(["a"] * 4)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        base = make_model(vocab_size=512, hidden=256, layers=2)
        model = MultiLoraModel(base.to(device=backend.device, dtype=dtype))
        model.add_adapter("a", LoraSpec(r=8, scaling=2.0))
        torch.manual_seed(0)
        for _, module in model.adapter_modules("a"):
            torch.nn.init.normal_(module.lora_B.weight, std=0.05)
        model.train()
        logits = model(ids, torch.ones_like(ids), layout).logits.float()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        params = model.adapter_parameters("a")
        assert params and all(p.dtype == torch.float32 for p in params)
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
        results[dtype] = (loss.detach(), [p.grad.detach() for p in params])
    (loss32, grads32), (loss16, grads16) = results[torch.float32], results[torch.bfloat16]
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=2e-2)
    for g16, g32 in zip(grads16, grads32, strict=True):  # relative to the tensor's norm
        assert ((g16 - g32).norm() / g32.norm()).item() < 0.05  # 0.016 measured in bf16 on CPU


# --- DoRA over a quantized base (bitsandbytes, in the test extra: on CPU, and on CUDA) ---------

NEEDS_BNB = "needs bitsandbytes (in the test extra: pip install -e '.[test]')"


def _quantized_linear(weight: torch.Tensor, bits: int, device: str) -> torch.nn.Module:
    """A bitsandbytes 4-bit (NF4) or 8-bit layer holding ``weight``, quantized onto ``device``."""
    bnb = pytest.importorskip("bitsandbytes", reason=NEEDS_BNB)
    out_features, in_features = weight.shape
    if bits == 4:
        layer = bnb.nn.Linear4bit(
            in_features, out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4"
        )
        layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(
            weight.clone(), requires_grad=False, has_fp16_weights=False
        )
    return layer.to(device)  # quantizes


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("bits", [4, 8])
def test_dora_over_quantized_base_equals_dequantized_reference(bits: int, device: str) -> None:
    """DoRA (dropout on) over a 4/8-bit base equals DoRA over the dequantized weight W: as a
    dense layer, and as the formula on W with the adapter's own masks (``tests.references``).
    On CUDA, bitsandbytes' 8-bit matmul quantizes the input too (LLM.int8), so the base output
    is only close to ``x W^T`` there; the adapter's part and its gradients are exact."""
    from mlora.adapters import MultiLoraLinear
    from mlora.batching.layout import LayoutContext
    from tests.references import keep_multipliers, lora_delta, twin_generator

    torch.manual_seed(0)
    quantized = _quantized_linear(torch.randn(48, 32) * 0.2, bits, device)
    dense = torch.nn.Linear(32, 48, bias=False, device=device).requires_grad_(False)
    dense.weight.copy_(dense_weight(quantized).float())
    x = torch.randn(3, 5, 32, device=device)
    grad_out = torch.randn(3, 5, 48, device=device)
    int8_input = device == "cuda" and bits == 8
    base_tolerance = {"atol": 0.05, "rtol": 0.05} if int8_input else {"atol": 1e-5, "rtol": 1e-5}
    with torch.no_grad():  # the dequantized W is what the quantized layer computes with
        torch.testing.assert_close(quantized(x).float(), dense(x), **base_tolerance)
    tolerance = {"atol": 1e-3, "rtol": 1e-2} if int8_input else {"atol": 1e-5, "rtol": 1e-4}
    layers, deltas, grads = [], [], []
    for base in (quantized, dense):
        context = LayoutContext()
        layer = MultiLoraLinear(base, context)
        torch.manual_seed(1)
        adapter = layer.add_adapter("d", r=4, scaling=2.0, dropout=0.2, use_dora=True)
        torch.nn.init.normal_(adapter.lora_B.weight, std=0.1)
        layers.append(layer.train())
        twin = twin_generator(context.generators.get("d", torch.device(device)))
        with context.use(BatchLayout.from_row_adapters(["d", "d", None])):
            out = layer(x)
        (out.float() * grad_out).sum().backward()
        grads.append({n: p.grad for n, p in layer.adapters.named_parameters()})
        with torch.no_grad():
            deltas.append((out.float() - base(x).float())[:2].reshape(-1, 48))
        # the formula on the dequantized W, masks drawn from a twin of the adapter's stream
        leaves = [p.detach().clone().requires_grad_(True) for p in adapter.parameters()]
        a, b, magnitude = (leaves[i] for i in (0, 1, 2))
        rows = x[:2].reshape(-1, 32)
        keep = keep_multipliers(rows.shape, 0.2, twin)
        expected = lora_delta(rows, a, b, 2.0, dense.weight, None, magnitude, keep)
        (expected * grad_out[:2].reshape(-1, 48)).sum().backward()
        torch.testing.assert_close(deltas[-1], expected.detach(), **tolerance)
        for (name, param), leaf in zip(adapter.named_parameters(), leaves, strict=True):
            torch.testing.assert_close(param.grad, leaf.grad, **tolerance, msg=name)
    torch.testing.assert_close(deltas[0], deltas[1], **tolerance)
    magnitudes = [layer.adapters["d"].magnitude.weight for layer in layers]
    torch.testing.assert_close(magnitudes[0], magnitudes[1])  # norm of the dequantized W
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 3
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, **tolerance, msg=name)
