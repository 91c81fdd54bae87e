"""MeteoRA: a trained gate over existing LoRA adapters, per token.

References: PEFT (a gate forced onto adapter i equals PeftModel with adapter i alone), a
hand-written ``softmax(top-k(logits) / T)`` mixture, the ``loop`` forward mode (the grouped one
equals it in outputs and gradients), each task's own LoRA (exact match of the composed model),
and the same MeteoRA trained alone (trained next to a plain LoRA it ends equal).
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from mlora.adapters.meteora.format import load_embedded_adapters, meteora_spec, peft_config
from mlora.adapters.meteora.layer import MeteoraAdapter
from mlora.adapters.meteora.spec import record_gates
from mlora.adapters.spec import AdapterInput
from mlora.api import train
from mlora.batching.layout import BatchLayout
from mlora.batching.randomness import SegmentRandom
from mlora.cli.generate import main as generate_main
from mlora.cli.train import main as mlora_main
from mlora.config.schema import parse_config
from mlora.core.errors import ConfigError, DataError, MloraError
from mlora.inference.generation import SamplingParams, generate
from mlora.inference.trained import attach_adapter
from mlora.model.multi_lora import MultiLoraModel
from mlora.persistence.adapter_files import read_adapter, save_adapter
from mlora.training.trainer import prepare_data
from tests.conftest import make_model, make_tokenizer
from tests.helpers import (
    adapter_tensors,
    max_relative_difference,
    run_in_memory,
    train_killed_then_resumed,
    write_json,
    write_template,
)
from tests.test_learning import greedy

PEFT_SHAPES = {  # two PEFT adapters of different ranks and targets
    "water": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "fire": {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "o_proj", "up_proj"]},
}


def peft_folders(base: nn.Module, folder: Path) -> dict[str, Path]:
    """PEFT LoRA adapters with random (non-zero) B, saved by PEFT itself."""
    out = {}
    for seed, (name, shape) in enumerate(PEFT_SHAPES.items()):
        model = get_peft_model(copy.deepcopy(base), LoraConfig(lora_dropout=0.0, **shape))
        torch.manual_seed(seed)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_B" in pname:
                    param.normal_(std=0.05)
        model.save_pretrained(folder / name)
        out[name] = folder / name
    return out


def meteora_config(folders: list[Path], **keys) -> dict:
    return {
        "name": "met",
        "data": "unused.json",
        "routing_strategy": "meteora",
        "adapters": [str(f) for f in folders],
        **keys,
    }


def with_meteora(base: nn.Module, folders: list[Path], **keys) -> MultiLoraModel:
    config = parse_config({"lora": [meteora_config(folders, **keys)]}).lora[0]
    model = MultiLoraModel(copy.deepcopy(base))
    model.add_adapter("met", meteora_spec(config))
    load_embedded_adapters(model, "met")
    return model.eval()


class ForcedGate(nn.Module):
    """Gate logits that put every token on adapter ``index``."""

    def __init__(self, num_adapters: int, index: int) -> None:
        super().__init__()
        self.num_adapters, self.index = num_adapters, index
        self.weight = nn.Parameter(torch.zeros(1))  # dtype and device for the gate's callers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.full((x.shape[0], self.num_adapters), -1e4)
        logits[:, self.index] = 1e4
        return logits


@pytest.mark.parametrize("mode", ["grouped", "loop"])
def test_gate_forced_onto_one_adapter_equals_that_adapter_in_peft(tmp_path: Path, mode) -> None:
    base = make_model()
    folders = peft_folders(base, tmp_path)
    model = with_meteora(base, list(folders.values()), forward_mode=mode)
    ids = torch.randint(4, 128, (3, 9))
    mask = torch.ones_like(ids)
    layout = BatchLayout.from_row_adapters(["met"] * 3)
    for index, folder in enumerate(folders.values()):
        for _, module in model.adapter_modules("met"):
            module.gate = ForcedGate(2, index)
        with torch.no_grad():
            ours = model(ids, mask, layout).logits
            peft = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
            theirs = peft(input_ids=ids, attention_mask=mask).logits
        assert (ours - theirs).abs().max() <= 1e-5
        assert (ours - base(input_ids=ids).logits).abs().max() > 1e-3  # the adapter does act


def mixture_pair(train_loras: bool = True) -> tuple[MeteoraAdapter, MeteoraAdapter]:
    """The same 3-adapter gate (ranks 2, 4, none) in both forward modes, random weights."""
    torch.manual_seed(0)
    loop = MeteoraAdapter(16, 12, [(2, 0.5), (4, 2.0), None], top_k=2, temperature=0.7,
                          dropout=0.2, forward_mode="loop")  # fmt: skip
    with torch.no_grad():
        for param in loop.parameters():
            param.normal_()
    loop.loras.requires_grad_(train_loras)
    grouped = copy.deepcopy(loop)
    grouped.forward_mode = "grouped"
    return loop.train(), grouped.train()


def test_weights_are_softmax_of_top_k_logits_over_temperature() -> None:
    loop, _ = mixture_pair()
    x = torch.randn(20, 16)
    logits = x @ loop.gate.weight.T
    top, chosen = logits.topk(2, dim=-1)
    weights = torch.zeros_like(logits).scatter(1, chosen, torch.softmax(top / 0.7, dim=-1))
    expected = sum(
        weights[:, i : i + 1] * loop.loras[str(i)].lora_B.weight.new_tensor(s)
        * (x @ loop.loras[str(i)].lora_A.weight.T @ loop.loras[str(i)].lora_B.weight.T)
        for i, s in ((0, 0.5), (1, 2.0))
    )  # fmt: skip
    loop.eval()
    assert torch.allclose(loop(AdapterInput(x, x)), expected, atol=1e-5)
    assert (weights[:, 2] > 0).any()  # the adapter absent from this layer is chosen, adds 0


@pytest.mark.parametrize("train_loras", [True, False])
def test_grouped_equals_loop_in_outputs_and_gradients(train_loras: bool) -> None:
    loop, grouped = mixture_pair(train_loras)
    x = torch.randn(40, 16, requires_grad=True)
    grads, outputs = [], []
    for module in (loop, grouped):
        generator = torch.Generator().manual_seed(5)  # the same dropout masks for both
        x.grad = None
        out = module(AdapterInput(x, x, random=SegmentRandom(generator)))
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs.append(out.detach())
        grads.append({"x": x.grad.clone()} | {
            n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None
        })  # fmt: skip
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    expected = {"x", "gate.weight"} | (
        {f"loras.{i}.lora_{m}.weight" for i in (0, 1) for m in "AB"} if train_loras else set()
    )
    assert set(grads[0]) == expected
    for key in grads[0]:
        assert torch.allclose(grads[0][key], grads[1][key], atol=1e-5), key


# --- end to end on synthetic tasks -----------------------------------------------------------

WORDS = ["cat", "dog", "owl", "ant", "bee", "yak", "elk", "emu", "fox", "gnu", "hen", "jay"]
SYLLABLES = ["".join(w) for w in itertools.product("bdgklmnprstvz", "aeiou", "bdgklmnprstvz")]
random.Random(0).shuffle(SYLLABLES)
TRAIN_WORDS, HELD_OUT = SYLLABLES[:24], SYLLABLES[24:44]  # made-up words, 20 never trained on
TASKS = {"yes": "a", "NO": "B"}  # task (its answer) -> instruction


def task_input(task: str, word: str) -> str:
    """Task "NO" writes in capitals and ends with "!": the task shows in every token of its
    prompt, as a domain shows in its vocabulary (the template adds nothing after it)."""
    return f"{word.upper()}!" if task == "NO" else f"{word}?"


def task_rows(task: str, words: list[str]) -> list[dict]:
    return [
        {"instruction": TASKS[task], "input": task_input(task, w), "output": task, "task": task}
        for w in words
    ]


def lora_entry(tmp_path: Path, template: str, task: str) -> dict:
    return {
        "name": task,
        "data": write_json(tmp_path / f"{task}.json", task_rows(task, TRAIN_WORDS)),
        "prompt": template,
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        "batch_size": 4,
        "num_epochs": 4,
        "lr": 2e-2,
    }


def dominant_adapter(traces: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    """(T,) the adapter most gated layers rank first at each token of the (one) pass."""
    votes = torch.stack([t[-1].argmax(-1) for t in traces.values()])  # (layers, T)
    return torch.mode(votes, dim=0).values


def answer_gate_accuracy(model, tokenizer, rows: list[dict], labels: list[int]) -> float:
    """Share of answer tokens (answer + EOS) whose dominant adapter is the row's task."""
    hits = total = 0
    for row, label in zip(rows, labels, strict=True):
        prompt = f"{row['instruction']} {row['input']}"
        ids = tokenizer(prompt + row["output"])["input_ids"] + [tokenizer.eos_token_id]
        start = len(tokenizer(prompt)["input_ids"])
        tensor = torch.tensor([ids])
        with record_gates(model, "met") as traces, torch.no_grad():
            model(tensor, torch.ones_like(tensor), BatchLayout.from_row_adapters(["met"]))
        picked = dominant_adapter(traces)[start:]
        hits += int((picked == label).sum())
        total += picked.numel()
    return hits / total


def exact_match(model, tokenizer, task: str, adapter: str) -> float:
    prompts = [f"{TASKS[task]} {task_input(task, w)}" for w in HELD_OUT]
    outputs = greedy(model, tokenizer, prompts, [adapter] * len(prompts), steps=len(task) + 1)
    return sum(o.startswith(task + tokenizer.eos_token) for o in outputs) / len(outputs)


def test_gate_learns_the_tasks_and_switches_mid_row(tmp_path: Path) -> None:
    tokenizer = make_tokenizer()
    template = tmp_path / "bare.json"  # "{instruction} {input}": nothing shared after the input
    template.write_text(json.dumps({"prompt_input": "{instruction} {input}",
                                    "prompt_no_input": "{instruction}"}))  # fmt: skip
    template = str(template)
    factory = lambda: make_model(vocab_size=len(tokenizer), init_range=0.2)  # noqa: E731
    out = tmp_path / "out"
    loras = run_in_memory(
        factory,
        tokenizer,
        {
            "cutoff_len": 32,
            "log_step": 100,
            "lora": [lora_entry(tmp_path, template, t) for t in TASKS],
        },
        out,
    )
    mixed = [
        row
        for pair in zip(*(task_rows(t, TRAIN_WORDS) for t in TASKS), strict=True)
        for row in pair
    ]
    entry = meteora_config(
        [out / task for task in TASKS],
        data=write_json(tmp_path / "mix.json", mixed),
        prompt=template,
        task_field="task",
        batch_size=4,
        num_epochs=6,
        lr=2e-2,
    )
    trainer = run_in_memory(
        factory, tokenizer, {"cutoff_len": 32, "log_step": 24, "lora": [entry]}, out
    )
    model = trainer.model.eval()
    # the gate statistics: shares of routed tokens, about even on this even mix of tasks
    loads = trainer.runs[0].expert_load
    assert len(loads) == 3 and all(abs(sum(load) - 1) < 1e-5 for load in loads)
    assert 0.35 < loads[-1][0] < 0.65, loads
    # train_loras false: the embedded LoRAs are bit-identical to their folders
    saved = read_adapter(out / "met")[1]
    for task in TASKS:
        for key, tensor in read_adapter(out / task)[1].items():
            ours = saved[key.replace("lora_", f"loras.{task}.lora_", 1)]
            assert torch.equal(ours, tensor), key
    for index, task in enumerate(TASKS):
        held_out = task_rows(task, HELD_OUT)
        assert answer_gate_accuracy(model, tokenizer, held_out, [index] * len(HELD_OUT)) > 0.9
        own = exact_match(loras.model.eval(), tokenizer, task, task)
        assert own >= 0.9, (task, own)  # the LoRAs learned their tasks
        assert exact_match(model, tokenizer, task, "met") >= own - 0.05, task
    # a composite row: the first task's answer, then the second task's prompt and answer
    text = "a cow?yes B PIG!NO"
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with record_gates(model, "met") as traces, torch.no_grad():
        model(ids, torch.ones_like(ids), BatchLayout.from_row_adapters(["met"]))
    picked = dominant_adapter(traces)[1:].tolist()  # without BOS: one per character
    assert picked[text.index("yes") : text.index("yes") + 3] == [0, 0, 0], picked
    assert picked[text.index("!NO") + 1 :] == [1, 1], picked
    # and its second question is answered by the second task, as that task's own LoRA answers
    answer = greedy(model, tokenizer, [text.removesuffix("NO")], ["met"], steps=3)[0]
    own = greedy(loras.model, tokenizer, [text.removesuffix("NO")], ["NO"], steps=3)[0]
    assert answer.startswith("NO") and answer == own, (answer, own)
    # the saved folder loads into a fresh model with equal outputs
    fresh = MultiLoraModel(factory()).eval()
    attach_adapter(fresh, "met", out / "met")
    layout = BatchLayout.from_row_adapters(["met"])
    with torch.no_grad():
        assert torch.equal(
            fresh(ids, torch.ones_like(ids), layout).logits,
            model(ids, torch.ones_like(ids), layout).logits,
        )


def test_only_gates_get_gradients_when_loras_are_frozen(tmp_path: Path) -> None:
    base = make_model()
    model = with_meteora(base, list(peft_folders(base, tmp_path).values())).train()
    ids = torch.randint(4, 128, (2, 7))
    out = model(ids, torch.ones_like(ids), BatchLayout.from_row_adapters(["met", "met"]))
    out.logits.square().mean().backward()
    for path, module in model.adapter_modules("met"):
        assert module.gate.weight.grad is not None and module.gate.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in module.loras.parameters()), path


def test_meteora_next_to_lora_and_mixlora_equals_meteora_alone(tmp_path: Path) -> None:
    tokenizer = make_tokenizer()
    base = make_model(vocab_size=len(tokenizer))
    folders = list(peft_folders(base, tmp_path).values())
    template = write_template(tmp_path)
    rows = [
        {"instruction": "x", "input": w, "output": w[::-1], "task": task}
        for w, task in zip(WORDS[:8], ["water", "fire"] * 4, strict=True)
    ]
    data = write_json(tmp_path / "rows.json", rows)
    met = meteora_config(folders, data=data, prompt=template, task_field="task", batch_size=4,
                         num_epochs=1, lr=1e-2, lora_dropout=0.1, train_loras=True)  # fmt: skip
    lora = {"name": "plain", "data": data, "prompt": template, "batch_size": 4, "num_epochs": 2,
            "lora_dropout": 0.1, "target_modules": ["q_proj", "up_proj"]}  # fmt: skip
    mix = lora | {"name": "mix", "routing_strategy": "mixlora", "num_experts": 2,
                  "target_modules": ["q_proj", "up_proj", "down_proj"]}  # fmt: skip
    factory = lambda: copy.deepcopy(base)  # noqa: E731
    together = run_in_memory(
        factory, tokenizer, {"cutoff_len": 16, "lora": [lora, met, mix]}, tmp_path / "a"
    )
    alone = run_in_memory(  # recomputed in backward: the gate loss keeps its gradient
        factory,
        tokenizer,
        {"cutoff_len": 16, "gradient_checkpoint": "recompute", "lora": [met]},
        tmp_path / "b",
    )
    before = with_meteora(base, folders)
    start = {
        f"{p}.{n}": t.detach()
        for p, m in before.adapter_modules("met")
        for n, t in m.named_parameters()
    }
    trained = adapter_tensors(alone, "met")
    assert max_relative_difference(adapter_tensors(together, "met"), trained) <= 1e-4
    assert any(not torch.equal(trained[k], start[k]) for k in trained if ".loras." in k)


# --- bad input -------------------------------------------------------------------------------


def write_lora(folder: Path, **config) -> Path:
    folder.mkdir(parents=True)
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(base | config))
    from safetensors.torch import save_file

    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(
                config.get("out", 64), 4
            ),
        },
        folder / "adapter_model.safetensors",
    )
    return folder


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"top_k": 3}, "key 'top_k' (3) must be <= the number of 'adapters' (2)"),
        ({"r": 8}, "key 'r' does not apply to routing_strategy 'meteora'"),
        ({"temperature": 0}, "key 'temperature' must be > 0"),
        ({"forward_mode": "fast"}, "key 'forward_mode' must be one of 'grouped', 'loop'"),
    ],
)
def test_config_errors_are_one_line(keys: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config({"lora": [meteora_config([Path("a"), Path("b")], **keys)]}, "c.json")
    with pytest.raises(ConfigError, match="key 'adapters' is required"):
        parse_config({"lora": [{"name": "m", "data": "d", "routing_strategy": "meteora"}]})
    with pytest.raises(ConfigError, match="key 'task_field' needs 'routing_strategy'"):
        parse_config({"lora": [{"name": "m", "data": "d", "task_field": "task"}]})


@pytest.mark.parametrize(
    ("second", "keys", "message"),
    [
        (None, {}, "no adapter at .*missing"),
        ({"use_dora": True}, {}, "is a DoRA adapter"),
        ({"peft_type": "MIXLORA"}, {}, "is a MIXLORA adapter"),
        ({"target_parameters": ["experts.down_proj"]}, {}, "sets 'target_parameters'"),
        ({"out": 32}, {}, "do not share a base model .*q_proj has 32 output features"),
        ({}, {"gate_target_modules": ["down_proj"]}, "no adapter targets 'down_proj'"),
    ],
)
def test_adapter_folder_errors_are_one_line(tmp_path: Path, second, keys, message) -> None:
    first = write_lora(tmp_path / "one")
    other = tmp_path / "missing" if second is None else write_lora(tmp_path / "two", **second)
    config = parse_config({"lora": [meteora_config([first, other], **keys)]}).lora[0]
    with pytest.raises(MloraError, match=message) as info:
        meteora_spec(config)
    assert "\n" not in str(info.value)


def test_duplicate_names_and_bad_task_labels(tmp_path: Path) -> None:
    one, two = write_lora(tmp_path / "a" / "x"), write_lora(tmp_path / "b" / "x")
    config = parse_config({"lora": [meteora_config([one, two])]}).lora[0]
    with pytest.raises(MloraError, match="two folders named 'x'"):
        meteora_spec(config)
    other = write_lora(tmp_path / "y")
    rows = write_json(tmp_path / "d.json", [{"instruction": "i", "output": "o", "task": "z"}])
    raw = {"lora": [meteora_config([one, other], data=rows, task_field="task")]}
    with pytest.raises(DataError, match="row 0: 'task' is 'z', not one of the embedded adapters"):
        prepare_data(parse_config(raw), make_tokenizer())


def test_saved_folder_with_a_wrong_shape_is_refused(tmp_path: Path) -> None:
    base = make_model()
    folders = list(peft_folders(base, tmp_path).values())
    model = with_meteora(base, folders)
    save_adapter(model, "met", tmp_path / "met", peft_config(model.specs["met"], None))
    fresh = MultiLoraModel(copy.deepcopy(base))
    attach_adapter(fresh, "ok", tmp_path / "met")  # loads as saved
    config = json.loads((tmp_path / "met" / "adapter_config.json").read_text())
    config["adapters"][0]["r"] = 6
    (tmp_path / "met" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(
        MloraError, match=r"loras\.water\.lora_A\.weight has shape \(4, 64\), expected \(6, 64\)"
    ):
        attach_adapter(fresh, "bad", tmp_path / "met")
    assert "bad" not in fresh.specs


# --- the entry points ------------------------------------------------------------------------


def test_trained_folder_serves_evaluation_generate_and_inference(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """Train through ``mlora.train`` (preflight included), then the saved folder through
    ``mlora.py --evaluate``, ``generate.py`` and ``mlora.py --inference``; answers equal the
    trained in-memory model's."""
    folders = list(
        peft_folders(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path).values()
    )
    rows = [{"instruction": w, "output": w[::-1], "task": t}
            for w, t in zip(WORDS[:8], ["water", "fire"] * 4, strict=True)]  # fmt: skip
    data = write_json(tmp_path / "rows.json", rows)
    entry = meteora_config(
        folders, data=data, test_data=data, prompt=write_template(tmp_path), task_field="task",
        batch_size=4, num_epochs=1, evaluate_batch_size=4,
    )  # fmt: skip
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"cutoff_len": 16, "lora": [entry]}), encoding="utf-8")
    out = tmp_path / "out"
    trainer = train(config, str(tiny_model_dir), out)
    model, tokenizer = trainer.model.eval(), trainer.tokenizer
    expected = generate(model, tokenizer, [("owl=", "met")], SamplingParams(max_new_tokens=5))[0]
    assert expected.text
    common = ["--base_model", str(tiny_model_dir), "--config", str(config), "--dir", str(out)]
    assert mlora_main([*common, "--evaluate"]) == 0
    result = json.loads((out / "evaluate_result.json").read_text())["met"]
    assert result["rows"] == len(result["predictions"]) == 8
    hits = [p.strip() == r["output"] for p, r in zip(result["predictions"], rows, strict=True)]
    assert result["exact_match"] == sum(hits) / 8  # the score of the answers it wrote
    capsys.readouterr()
    assert (
        generate_main([*common, "--use", "met", "owl=", "--max_new_tokens", "5", "--output", "-"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["text"] == expected.text
    monkeypatch.setattr("sys.stdin", io.StringIO("/set max_new_tokens 5\nowl\n/quit\n"))
    assert mlora_main([*common, "--inference"]) == 0
    assert expected.text in capsys.readouterr().out


def test_interrupted_run_resumes_exactly(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = [{"instruction": w, "output": w[::-1], "task": t}
            for w, t in zip(WORDS[:8], ["water", "fire"] * 4, strict=True)]  # fmt: skip
    entry = meteora_config(
        list(peft_folders(base, tmp_path).values()), data=write_json(tmp_path / "rows.json", rows),
        task_field="task", prompt=write_template(tmp_path), batch_size=2, num_epochs=1, lr=1e-2,
        lora_dropout=0.1, train_loras=True,
    )  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"cutoff_len": 32, "save_step": 1, "lora": [entry]}))
    clean_dir, cut_dir = train_killed_then_resumed(path, tiny_model_dir, tmp_path)
    clean = read_adapter(clean_dir / "met")[1]
    assert max_relative_difference(read_adapter(cut_dir / "met")[1], clean) <= 1e-6
