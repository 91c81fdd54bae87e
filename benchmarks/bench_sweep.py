"""A hyperparameter grid three ways: PEFT one trial after another, mlora's sweep, and mlora's
sweep with successive halving (issue 25's goal: (c) at least 4x faster than (a), its best
validation loss within 1% of (a)'s).

The grid: every learning rate of ``--lrs`` x every rank of ``--ranks`` (default 4 x 3 = 12
trials), AdamW, LoRA on q/k/v/o, the same training rows (``--rows``) and a held-out validation
set (``--val-rows``) of two-digit products, ``--epochs`` epochs of batches of ``--batch``:

- (a) PEFT: ``get_peft_model`` + a plain loop, each trial trained to its end one after another
  on the once-loaded base (what users do today), its validation loss computed at the end;
  padded batches, full-vocabulary logits (HF's loss). The rows of every batch are mlora's
  (``prepare_data`` + the trial's ``AdapterQueue``), so both engines see the same batches.
- (b) mlora: ``run_sweep``, grid sampler, no pruner, ``--concurrent`` trials at once.
- (c) mlora: the same with Optuna's ``SuccessiveHalvingPruner`` (``--min-resource``,
  ``--reduction-factor``), validated at the pruner's rungs only (``eval_steps`` as the list
  ``min_resource * reduction_factor**k``: 2, 6, 18, ...; a validation between rungs decides
  nothing), or every ``--eval-steps``.

All three train with the same recipe and score the same validation rows: AdamW (weight decay
0), a cosine schedule after a 10% linear warm-up, gradients clipped to norm 1 (transformers
Trainer's and TRL's usual recipe; ``--scheduler constant --warmup-ratio 0 --max-grad-norm 0``
gives mlora's plain defaults, under which one configuration's result swings by more than the
grid's spread at the top learning rate), LoRA dropout 0.05. (a) trains each configuration under
the name mlora's grid gives it, so both engines draw the same LoRA init and data order.

Each mode's wall time includes its model load (one-time imports are done before any clock
starts, so no mode pays them for another). The objective everywhere is the mean token
cross-entropy over the validation set's supervised tokens after the trial's last step. Quick
check on a tiny random model, then the issue's run on SmolLM2-135M (offline):

    python benchmarks/bench_sweep.py --model tiny
    python benchmarks/bench_sweep.py --model smollm2
    python benchmarks/bench_sweep.py --model smollm2 --lrs 1e-4,1e-3 --ranks 4,8 --epochs 1
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mlora.batching.dispatcher import AdapterQueue  # noqa: E402
from mlora.config.schema import parse_config  # noqa: E402
from mlora.data.rows import IGNORE_INDEX, TokenizedRow, pad_token_id  # noqa: E402
from mlora.sweep.runner import run_sweep  # noqa: E402
from mlora.sweep.study import SweepStudy  # noqa: E402
from mlora.training.data_preparation import adapter_seed  # noqa: E402
from mlora.training.optim import warmup_steps  # noqa: E402
from mlora.training.trainer import prepare_data  # noqa: E402
from mlora.training.validation import prepare_validation  # noqa: E402
from tests.helpers import write_json, write_template  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def task_row(i: int) -> dict[str, str]:
    """Row ``i`` of the task: a product of two two-digit numbers (hard enough that the
    validation loss stays well above 0 after a few steps, so the trials differ)."""
    a, b = (i * 37) % 90 + 10, (i * 53) % 90 + 10
    return {"instruction": "Multiply.", "input": f"{a} * {b}", "output": str(a * b)}


def sweep_raw(args: argparse.Namespace, data: str, val: str, pruner: str) -> dict:
    prompt = str(Path(data).parent / "short_template.json")
    base = {"data": data, "val_data": val, "prompt": prompt, "batch_size": args.batch,
            "num_epochs": args.epochs, "lora_alpha": 16, "lora_dropout": args.lora_dropout,
            "target_modules": TARGETS, "evaluate_batch_size": args.batch,
            "scheduler_type": args.scheduler, "warmup_ratio": args.warmup_ratio}  # fmt: skip
    if args.max_grad_norm:
        base["max_grad_norm"] = args.max_grad_norm
    if pruner != "none":  # the pruner needs a curve; without one, the last step's loss is all
        base["eval_steps"] = args.eval_steps or rungs(args)
    block = {"name": f"sweep-{pruner}", "base": base, "sampler": "grid", "pruner": pruner,
             "concurrent": args.concurrent,
             "search_space": {"lr": args.lrs, "r": args.ranks}}  # fmt: skip
    if pruner == "successive_halving":
        block["pruner_options"] = {"min_resource": args.min_resource,
                                   "reduction_factor": args.reduction_factor}  # fmt: skip
    return {"cutoff_len": args.cutoff_len, "save_step": 0, "log_step": 1000, "sweep": block}


def trial_steps(args: argparse.Namespace) -> int:
    """Optimizer steps of one trial trained to its end."""
    return -(-args.rows // args.batch) * args.epochs


def rungs(args: argparse.Namespace) -> list[int]:
    """The steps where ``SuccessiveHalvingPruner(min_resource, reduction_factor)`` decides:
    ``min_resource * reduction_factor**k`` before a trial's last step (validated anyway)."""
    steps, step = [], args.min_resource
    while step < trial_steps(args):
        steps.append(step)
        step *= args.reduction_factor
    return steps or [args.min_resource]


def padded(rows: list[TokenizedRow], pad: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row.input_ids)
        labels[i, : len(row)] = torch.tensor(row.labels)
        mask[i, : len(row)] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            "attention_mask": mask.to(device)}  # fmt: skip


@torch.no_grad()
def peft_val_loss(model, rows: list[TokenizedRow], pad: int, batch: int) -> float:
    """Token-mean cross-entropy over the supervised tokens of ``rows`` (HF's shifted loss)."""
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(rows), batch):
        inputs = padded(rows[start : start + batch], pad, model.device)
        logits = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).logits
        target = inputs["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )  # fmt: skip
        total += loss.item()
        tokens += int((target != IGNORE_INDEX).sum())
    model.train()
    return total / tokens


def warm_imports(model_path: str) -> None:
    """The one-time imports either engine needs (PEFT, datasets, the model's transformers
    module, transformers' schedulers, Optuna's SQLite storage, matplotlib), done before any
    clock starts: whichever mode ran first would otherwise pay them for the others."""
    import importlib

    import datasets  # noqa: F401
    import matplotlib.figure  # noqa: F401
    import optuna
    import peft  # noqa: F401
    from transformers import AutoConfig, get_scheduler  # noqa: F401

    model_type = AutoConfig.from_pretrained(model_path).model_type
    importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(storage="sqlite:///:memory:")  # SQLAlchemy, Alembic, the schema


def mlora_trial_names(args: argparse.Namespace, data: str, val: str) -> dict[tuple, str]:
    """The trial name mlora's grid sweep gives each ``(lr, r)``: asked from mlora's own study
    (the grid sampler's order depends only on the seed), so (a) can train each configuration
    under the same name, hence the same LoRA init and the same batches in the same order."""
    sweep = parse_config(sweep_raw(args, data, val, "none"), "bench").sweep
    with tempfile.TemporaryDirectory() as tmp:
        study = SweepStudy(sweep, Path(tmp), args.seed, resume=False)
        names = {}
        for number in range(sweep.trials):
            values = study.trial(number)
            names[(values["lr"], values["r"])] = sweep.trial_name(number)
    return names


def run_peft(args: argparse.Namespace, model_path: str, data: str, val: str, seed: int) -> dict:
    """(a): every trial to its end, one after another, on the once-loaded base. Each
    configuration starts from the LoRA init mlora gives it (PEFT's own initializer, seeded
    as mlora seeds that trial: the A matrices come out equal) and takes the same batches."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    pad = pad_token_id(tokenizer)
    results = {}
    names = mlora_trial_names(args, data, val)
    for lr in args.lrs:
        for r in args.ranks:
            name = names[(lr, r)]
            config = parse_config({"cutoff_len": args.cutoff_len, "lora": [
                {**sweep_raw(args, data, val, "none")["sweep"]["base"], "name": name, "lr": lr,
                 "r": r}]}, "bench")  # fmt: skip
            rows = prepare_data(config, tokenizer, seed)[name]
            val_rows = prepare_validation(config, tokenizer, seed)[name]
            queue = AdapterQueue(name, rows, args.batch, args.batch, args.epochs, seed=seed)
            torch.manual_seed(adapter_seed(seed, name))  # mlora's init of this trial
            lora = LoraConfig(
                r=r, lora_alpha=16, lora_dropout=args.lora_dropout, target_modules=TARGETS
            )
            model = get_peft_model(base, lora)
            model.train()
            trained = [p for p in model.parameters() if p.requires_grad]
            adapter = config.lora[0]  # mlora's optimizer settings, not torch's defaults
            optimizer = torch.optim.AdamW(trained, lr, weight_decay=adapter.weight_decay)
            assert adapter.optim == "adamw"
            schedule = get_scheduler(
                adapter.scheduler_type, optimizer, warmup_steps(adapter, trial_steps(args)),
                trial_steps(args),
            )  # fmt: skip
            while not queue.finished:
                inputs = padded(list(queue.pop().rows), pad, model.device)
                model(**inputs).loss.backward()
                if adapter.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(trained, adapter.max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
            results[(lr, r)] = peft_val_loss(model, val_rows, pad, args.batch)
            base = model.unload()  # the base without LoRA layers, for the next trial
    best = min(results, key=results.__getitem__)
    each = {params: f"{value:.4f}" for params, value in results.items()}
    return {"wall": time.perf_counter() - start, "best": results[best], "params": best,
            "trials": len(results), "pruned": 0, "each": each,
            "steps": len(results) * trial_steps(args)}  # fmt: skip


def run_mlora(args, model_path: str, data: str, val: str, pruner: str, out: Path) -> dict:
    """(b) / (c): one ``run_sweep``."""
    start = time.perf_counter()
    config = parse_config(sweep_raw(args, data, val, pruner), "bench")
    result = run_sweep(config, model_path, out, seed=args.seed, show=False)
    best = next(r for r in result.records if r.number == result.best)
    each = {(r.params["lr"], r.params["r"]): f"{r.value:.4f}" if r.state == "complete"
            else f"{r.state} at {r.steps}" for r in result.records}  # fmt: skip
    return {"wall": time.perf_counter() - start, "best": best.value, "each": each,
            "params": (best.params["lr"], best.params["r"]), "trials": len(result.records),
            "pruned": sum(r.state == "pruned" for r in result.records),
            "steps": sum(r.steps for r in result.records)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    number_list = lambda t: [float(x) for x in t.split(",")]  # noqa: E731
    parser.add_argument("--lrs", type=number_list, default=[1e-4, 3e-4, 1e-3, 3e-3])
    parser.add_argument(
        "--ranks", type=lambda t: [int(x) for x in t.split(",")], default=[4, 8, 16]
    )
    parser.add_argument("--rows", type=int, default=64, help="training rows")
    parser.add_argument("--val-rows", type=int, default=32, help="validation rows")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cutoff-len", type=int, default=64)
    parser.add_argument(
        "--eval-steps", type=int, help="(c) validates every N steps (default: at the rungs)"
    )
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--min-resource", type=int, default=2)
    parser.add_argument("--reduction-factor", type=int, default=3)
    parser.add_argument("--modes", default="a,b,c", help="which of a (PEFT), b, c to run")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--scheduler", default="cosine", help="scheduler_type, both engines")
    parser.add_argument("--warmup-ratio", type=float, default=0.1, help="both engines")
    parser.add_argument(
        "--max-grad-norm", type=float, default=1.0, help="clip each trial's gradient (both; 0: off)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.model == "smollm2":
            sys.path.insert(0, str(Path(__file__).parent))
            from smollm2 import smollm2_folder

            model_path = str(smollm2_folder())
        else:
            from toy_tasks import build_model

            build_model(work / "model", hidden=256, layers=4, vocab=512)
            model_path = str(work / "model")
        data = write_json(work / "train.json", [task_row(i) for i in range(args.rows)])
        held_out = range(args.rows, args.rows + args.val_rows)  # rows training never sees
        val = write_json(work / "val.json", [task_row(i) for i in held_out])
        write_template(work)  # "{instruction} {input}=": short rows
        modes = args.modes.split(",")
        warm_imports(model_path)
        found = {}
        if "a" in modes:
            found["a"] = run_peft(args, model_path, data, val, args.seed)
        if "b" in modes:
            found["b"] = run_mlora(args, model_path, data, val, "none", work / "b")
        if "c" in modes:
            found["c"] = run_mlora(args, model_path, data, val, "successive_halving", work / "c")
    names = {"a": "(a) PEFT, one after another", "b": "(b) mlora sweep, no pruning",
             "c": "(c) mlora sweep, successive halving"}  # fmt: skip
    print(f"grid: lr {args.lrs} x r {args.ranks}; {args.rows} training rows, {args.val_rows} "
          f"validation rows, {args.epochs} epochs of batch {args.batch}; model {args.model}; "
          f"{args.concurrent} at once; (c) validates at steps "
          f"{args.eval_steps or rungs(args)} and at the end; schedule {args.scheduler}, warm-up "
          f"ratio {args.warmup_ratio}, max_grad_norm {args.max_grad_norm}, lora_dropout "
          f"{args.lora_dropout}; CPU threads "
          f"{torch.get_num_threads()}")  # fmt: skip
    print(
        "| mode | wall s | trials (pruned) | trial-steps | best val loss | best (lr, r) "
        "| speed-up vs (a) | best vs (a) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for key, got in found.items():
        ref = found.get("a")
        speed = f"{ref['wall'] / got['wall']:.2f}x" if ref else "-"
        gap = f"{100 * (got['best'] - ref['best']) / ref['best']:+.2f}%" if ref else "-"
        print(f"| {names[key]} | {got['wall']:.1f} | {got['trials']} ({got['pruned']}) | "
              f"{got['steps']} | "
              f"{got['best']:.4f} | {got['params']} | {speed} | {gap} |")  # fmt: skip
    print("\nEach configuration's final validation loss (or where it was pruned):")
    print("| (lr, r) | " + " | ".join(found) + " |")
    print("|---|" + "---|" * len(found))
    for params in [(lr, r) for lr in args.lrs for r in args.ranks]:
        print(f"| {params} | " + " | ".join(got["each"].get(params, "-") for got in found.values())
              + " |")  # fmt: skip


if __name__ == "__main__":
    main()
