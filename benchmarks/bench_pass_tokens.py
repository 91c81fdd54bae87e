"""The trade of ``pass_tokens``: mlora's whole-run time and peak memory per token budget.

The workload of ``bench_concurrent_vs_peft.py`` (same rows, adapters, steps), mlora's side only,
one fresh process per run; the budgets take turns within each repeat, so a slow period of a
shared machine hits every budget alike. Per budget, median [min-max] over ``--repeat``:

- process wall time, and the run's own time inside the process (load + data + train + save);
- steady-state training tokens/s (the window of ``bench_concurrent_vs_peft.py``);
- the process's peak memory (CPU: peak RSS; CUDA: the allocator's peak);
- each against the first budget given (paired per repeat).

    python benchmarks/bench_pass_tokens.py --model smollm2 --budgets 0 2048 1024 512 --repeat 3
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from common import (
    Spread,
    add_common_args,
    exit_on_sigterm,
    prepare_model,
    print_table,
    resolve_device,
    run_child,
    write_config,
)

MIB = 2**20


def tokens_per_s(report: dict[str, Any]) -> float:
    return report["window_tokens"] / report["runs"][0]["window_s"]


def measure(args: argparse.Namespace) -> tuple[dict[str, list[dict[str, float]]], str]:
    """Each budget's runs: wall, in-process time, tokens/s and peak memory."""
    names = [f"adapter{i}" for i in range(args.adapters)]
    runs: dict[str, list[dict[str, float]]] = {budget: [] for budget in args.budgets}
    with tempfile.TemporaryDirectory(prefix="mlora-passes-") as tmp:
        work = Path(tmp)
        model_dir, about = prepare_model(args, work)
        configs = {}
        for budget in args.budgets:
            folder = work / f"budget-{budget}"
            folder.mkdir()
            args.pass_tokens = budget
            configs[budget] = write_config(folder, args, names)
        for rep in range(args.repeat):
            for budget in args.budgets:
                report, wall = run_child(args, "mlora", model_dir, configs[budget], work / "out")
                run = {
                    "wall": wall,
                    "inside": report["runs"][0]["total_s"],
                    "tokens_per_s": tokens_per_s(report),
                    "peak": report["peak_bytes"] / MIB,
                }
                runs[budget].append(run)
                print(
                    f"repeat {rep + 1}: pass_tokens {budget}: {wall:.1f} s process, "
                    f"{run['inside']:.1f} s inside, {run['tokens_per_s']:.0f} tok/s, "
                    f"peak {run['peak']:.0f} MiB",
                    flush=True,
                )
    return runs, about


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=4, help="adapters trained (N)")
    parser.add_argument(
        "--budgets", nargs="+", default=["0", "auto"], help="pass_tokens values ('auto', ints)"
    )
    add_common_args(parser, rows=32, batch=4, repeat=2, warmup=2)
    args = parser.parse_args()
    exit_on_sigterm()
    resolve_device(args)
    runs, about = measure(args)
    print(f"\nmodel: {about}; {args.adapters} adapters, {args.device} {args.dtype}")
    first = runs[args.budgets[0]]
    rows = []
    for budget in args.budgets:
        mine = runs[budget]

        def spread(key: str, unit: str, digits: int = 1) -> str:
            return Spread.of([r[key] for r in mine]).show(unit, digits)  # noqa: B023

        speed = [r["wall"] / b["wall"] for r, b in zip(mine, first, strict=True)]
        memory = [r["peak"] / b["peak"] for r, b in zip(mine, first, strict=True)]
        rows.append([
            budget, spread("wall", " s"), spread("inside", " s"), spread("tokens_per_s", "", 0),
            spread("peak", " MiB", 0), Spread.of(speed).show("x"), Spread.of(memory).show("x"),
        ])  # fmt: skip
    print_table(
        ["pass_tokens", "process wall", "inside", "tokens/s", "peak", "wall vs first",
         "peak vs first"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
