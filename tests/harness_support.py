"""Adapters on disk, local harness tasks and request objects for the lm-eval tests (offline)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LORA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def save_peft_lora(base: torch.nn.Module, folder: Path, seed: int, dora: bool = False) -> Path:
    """A PEFT LoRA (or DoRA) with random non-zero B, saved by PEFT itself."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0, use_dora=dora
    )
    model = get_peft_model(copy.deepcopy(base), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(folder)
    return folder


def save_mlora_kind(base_dir: Path, folder: Path, raw: dict[str, Any], seed: int) -> Path:
    """An adapter of any mlora kind (from a config entry) with random weights, saved by mlora."""
    from transformers import AutoModelForCausalLM

    from mlora.adapters.kinds import kind_for_config
    from mlora.config.schema import parse_config
    from mlora.model.multi_lora import MultiLoraModel
    from mlora.persistence.adapter_files import peft_config, save_adapter

    config = parse_config({"lora": [raw]}).lora[0]
    kind = kind_for_config(config)
    model = MultiLoraModel(AutoModelForCausalLM.from_pretrained(base_dir))
    spec = kind.spec_from_config(config)
    model.add_adapter(config.name, spec)
    if kind.load_fresh is not None:
        kind.load_fresh(model, config.name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_parameters(config.name):
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
    save_adapter(
        model,
        config.name,
        folder,
        peft_config(model.specs[config.name], None),
    )
    return folder


def moe_entry(name: str, strategy: str, **keys: Any) -> dict[str, Any]:
    """A config entry of a MoE kind (MixLoRA, LoRAMoE, MoLA) on the tiny LLaMA."""
    return {
        "name": name, "data": "unused.json", "routing_strategy": strategy, "num_experts": 3,
        "r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": ["q_proj", "down_proj"],
        **keys,
    }  # fmt: skip


def arc_rows(count: int) -> list[dict[str, Any]]:
    """Rows in the allenai/ai2_arc schema (mlora's arc-e / arc-c and the harness's arc_easy)."""
    rows = []
    for i in range(count):
        texts = [f"{i}", f"{i + i % 3}", f"x{i}", f"{i}{i}"]
        rows.append(
            {
                "id": str(i),
                "question": f"what is {i}+{i % 3}?",
                "choices": {"text": texts, "label": ["A", "B", "C", "D"]},
                "answerKey": "ABCD"[i % 4],
            }
        )
    return rows


def boolq_rows(count: int) -> list[dict[str, Any]]:
    """Rows in the google/boolq schema mlora reads (``answer``: a boolean)."""
    return [
        {"question": f"is {i} even", "passage": f"{i} is a number.", "answer": i % 2 == 0}
        for i in range(count)
    ]


def write_tasks(folder: Path, rows_file: Path) -> Path:
    """Three local tasks over ``rows_file`` (arc schema): multiple choice (``tiny_mc``),
    generation (``tiny_gen``) and rolling log-likelihood (``tiny_roll``)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {"data_files": {"test": str(rows_file)}}
    common = {"dataset_path": "json", "dataset_kwargs": data, "test_split": "test"}
    tasks = {
        "tiny_mc": {
            "output_type": "multiple_choice",
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_target": "{{choices.label.index(answerKey)}}",
            "doc_to_choice": "{{choices.text}}",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
        },
        "tiny_gen": {
            "output_type": "generate_until",
            "doc_to_text": "Q: {{question}} A:",
            "doc_to_target": "{{choices.text[1]}}",
            "generation_kwargs": {"until": ["\n", "?"], "max_gen_toks": 10, "do_sample": False},
            "metric_list": [{"metric": "exact_match"}],
        },
        "tiny_roll": {
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{question}} {{choices.text[1]}}",
            "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
        },
    }
    for name, config in tasks.items():
        text = json.dumps({"task": name, **common, **config}, indent=2)  # JSON is YAML
        (folder / f"{name}.yaml").write_text(text, encoding="utf-8")
    return folder


def requests(*args: tuple[Any, ...]) -> list[SimpleNamespace]:
    """Objects with ``.args``, as the harness's ``Instance``s are read by a model."""
    return [SimpleNamespace(args=a) for a in args]


def sample_answers(results: dict[str, Any], task: str) -> list[Any]:
    """Every request's raw answer of ``task`` in a ``log_samples`` result, in order."""
    return [resp[0] for sample in results["samples"][task] for resp in sample["resps"]]


def assert_same_answers(ours: list[Any], theirs: list[Any], atol: float = 1e-5) -> float:
    """Equal answers: continuation log-likelihoods within ``atol`` and greedy flags equal;
    whole-text (rolling) log-likelihoods, sums over every token that the harness's ``hf`` model
    adds in fp32, within ``atol`` relative; texts exactly. Returns the largest log-likelihood
    difference."""
    assert len(ours) == len(theirs)
    worst = 0.0
    for a, b in zip(ours, theirs, strict=True):
        if isinstance(a, tuple | list):
            worst = max(worst, abs(a[0] - b[0]))
            assert a[1] == b[1]
        elif isinstance(a, float):
            assert abs(a - b) <= atol * max(1.0, abs(b)), (a, b)
        else:
            assert a == b
    assert worst <= atol, worst
    return worst
