"""Where a CPU training run's resident memory goes, phase by phase, mlora vs PEFT.

The workload of ``bench_concurrent_vs_peft.py`` (same rows, adapters, targets, dropout,
cutoff; ``--model smollm2`` for the real model), each side in a fresh process, for its first
``--steps`` optimizer steps (mlora: one pass over every adapter; PEFT: each adapter's first
steps, one adapter after another, as ``peft_train_one.py`` trains them). After each phase it
reads ``/proc/self/status`` and glibc's ``mallinfo2``:

- ``RSS``: resident now (VmRSS); ``peak``: the most resident during the phase (VmHWM, reset at
  every mark through ``/proc/self/clear_refs``; where that is refused, the process's peak so
  far);
- ``malloc used`` / ``malloc free``: bytes glibc has handed out and bytes it holds freed
  (``uordblks + hblkhd`` and ``fordblks``): what the allocator keeps resident after tensors die.

Phases: ``setup`` (imports, tokenizer, data, model load, adapters), then per step ``forward``
(the loss computed), ``backward``, ``optimizer`` (step taken, gradients freed).

    python benchmarks/bench_memory_phases.py --model smollm2                 # mlora, 2 steps
    python benchmarks/bench_memory_phases.py --model smollm2 --sides mlora peft --steps 8
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import (
    DTYPES,
    ROOT,
    add_common_args,
    prepare_model,
    resolve_device,
    supervised,
    write_config,
)

MIB = 2**20


_MALLINFO2 = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO2.split()]


def _mallinfo() -> Callable[[], tuple[int, int]] | None:
    """glibc's (bytes in use, bytes held free), or None off glibc / before 2.33."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        call = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    call.restype = _MallInfo2

    def read() -> tuple[int, int]:
        info = call()
        return info.uordblks + info.hblkhd, info.fordblks

    return read


class PhaseLog:
    """Marks phases: resident now, peak during the phase, what malloc uses and holds."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.mallinfo = _mallinfo()
        self.resettable = self._reset_peak()
        self.start = time.perf_counter()

    @staticmethod
    def _reset_peak() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    @staticmethod
    def _status() -> dict[str, int]:
        fields = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
        return fields

    def mark(self, phase: str) -> None:
        status = self._status()
        used, free = self.mallinfo() if self.mallinfo else (0, 0)
        self.rows.append({
            "phase": phase, "rss": status["VmRSS"], "peak": status["VmHWM"],
            "malloc_used": used, "malloc_free": free, "t": time.perf_counter() - self.start,
        })  # fmt: skip
        self._reset_peak()


class _Stop(Exception):
    """Raised after the last measured step to leave the trainer's loop."""


def run_mlora(args: argparse.Namespace, log: PhaseLog) -> None:
    """``mlora.train`` with marks around its step; stops after ``--steps`` steps."""
    import mlora
    from mlora.model.multi_lora import MultiLoraModel
    from mlora.training.adapter_run import AdapterRun
    from mlora.training.trainer import Trainer

    train_step, segment_losses = Trainer.train_step, MultiLoraModel.segment_losses
    add_micro_batch = AdapterRun.add_micro_batch
    done, marked = [0], [0]

    def marked_losses(self: MultiLoraModel, *a: Any, **k: Any) -> torch.Tensor:
        losses = segment_losses(self, *a, **k)
        log.mark(f"step {done[0] + 1} forward")
        return losses

    def marked_add(self: AdapterRun, *a: Any, **k: Any) -> None:  # right after the backward
        if marked[0] == done[0]:
            log.mark(f"step {done[0] + 1} backward")
            marked[0] += 1
        add_micro_batch(self, *a, **k)

    def marked_step(self: Trainer, step: Any) -> None:
        if done[0] == 0:
            log.mark("setup")
        train_step(self, step)
        done[0] += 1
        log.mark(f"step {done[0]} optimizer")
        if done[0] == args.steps:
            raise _Stop

    Trainer.train_step = marked_step  # type: ignore[method-assign]
    MultiLoraModel.segment_losses = marked_losses  # type: ignore[method-assign]
    AdapterRun.add_micro_batch = marked_add  # type: ignore[method-assign]
    config = mlora.load_config(args.config)
    with contextlib.suppress(_Stop):
        mlora.train(
            config, base_model=args.model_dir, output_dir=args.out, seed=args.seed,
            dtype=getattr(torch, DTYPES[args.dtype]), device=args.device,
            attn_implementation=args.attn_impl, overwrite=True, log=False,
        )  # fmt: skip


def run_peft(args: argparse.Namespace, log: PhaseLog) -> None:
    """PEFT's loop of ``peft_train_one.py``, one adapter after another, ``--steps`` each."""
    from peft import LoraConfig, get_peft_model
    from peft_train_one import load_base_and_plan, padded_batch

    import mlora
    from mlora.data.rows import pad_token_id

    config = mlora.load_config(args.config)
    device = torch.device(args.device)
    tokenizer, plan, model = load_base_and_plan(args, config)
    torch.manual_seed(args.seed)
    log.mark("setup")
    for a in config.lora:
        lora = LoraConfig(
            r=a.r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
            target_modules=a.target_module_names, use_rslora=a.use_rslora, task_type="CAUSAL_LM",
        )  # fmt: skip
        peft_model = get_peft_model(model, lora).train()
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay)
        steps, step = 0, []
        for micro in plan[a.name]:
            step.append(micro)
            if not micro.ends_step:
                continue
            items = sum(supervised(row) for mb in step for row in mb.rows)
            for mb in step:
                batch = padded_batch(mb.rows, pad_token_id(tokenizer), device)
                loss = peft_model(**batch, num_items_in_batch=items).loss
                log.mark(f"{a.name} step {steps + 1} forward")
                loss.backward()
                del loss
                log.mark(f"{a.name} step {steps + 1} backward")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps, step = steps + 1, []
            log.mark(f"{a.name} step {steps} optimizer")
            if steps == args.steps:
                break
        model = peft_model.unload()
        del peft_model, optimizer, params


def child(args: argparse.Namespace) -> None:
    log = PhaseLog()
    (run_mlora if args.side == "mlora" else run_peft)(args, log)
    print(json.dumps({"rows": log.rows, "resettable": log.resettable}))


def show(side: str, report: dict[str, Any]) -> None:
    rows = report["rows"]
    peak_word = "peak in phase" if report["resettable"] else "peak so far"
    print(f"\n{side}: MiB ({peak_word}: VmHWM; malloc: glibc mallinfo2)")
    print(f"{'phase':<28}{'RSS':>8}{'peak':>8}{'malloc used':>13}{'malloc free':>13}{'t (s)':>8}")
    for r in rows:
        print(
            f"{r['phase']:<28}{r['rss'] / MIB:>8.0f}{r['peak'] / MIB:>8.0f}"
            f"{r['malloc_used'] / MIB:>13.0f}{r['malloc_free'] / MIB:>13.0f}{r['t']:>8.1f}"
        )
    print(f"{side}: highest peak {max(r['peak'] for r in rows) / MIB:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=4, help="adapters trained (N)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps measured")
    parser.add_argument("--sides", nargs="+", choices=["mlora", "peft"], default=["mlora"])
    for flag in ("--side", "--model-dir", "--config", "--out"):
        parser.add_argument(flag, help=argparse.SUPPRESS)  # the child's
    add_common_args(parser, rows=32, batch=4, repeat=1, warmup=1)
    args = parser.parse_args()
    resolve_device(args)
    if args.side:
        child(args)
        return
    names = [f"adapter{i}" for i in range(args.adapters)]
    with tempfile.TemporaryDirectory(prefix="mlora-phases-") as tmp:
        work = Path(tmp)
        model_dir, about = prepare_model(args, work)
        config = write_config(work, args, names)
        print(f"model: {about}; {args.adapters} adapters, {args.steps} steps, {args.device}")
        for side in args.sides:
            command = [
                sys.executable, __file__, "--side", side, "--model-dir", str(model_dir),
                "--config", str(config), "--out", str(work / side), *sys.argv[1:],
            ]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                raise SystemExit(f"{side} failed ({done.returncode}):\n{done.stderr[-4000:]}")
            show(side, json.loads(done.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
