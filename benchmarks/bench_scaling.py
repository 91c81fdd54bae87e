"""How mlora scales with the number of adapters N, against PEFT training them one after another.

For each N (default 1, 2, 4, 8, 16) both sides train N adapters at the same per-adapter batch
(``--rows`` rows each, ``--batch`` rows per step) on the same rows in the same order, each side
in its own fresh process (benchmarks/common.py; benchmarks/peft_train_one.py), and report:

- steady-state training tokens/s (real tokens over the micro-batches after ``--warmup`` and
  before the last of each adapter), median [min-max] over ``--repeat`` runs inside that process
  (the model is loaded again for each run), and the ratio of the medians;
- peak memory: on CUDA ``torch.cuda.max_memory_allocated``, on CPU the process's peak resident
  set (``ru_maxrss``, which includes the interpreter and libraries: compare differences), both
  read after the first run;
- padding, from the rows and the batch composition: PEFT pads each adapter's micro-batch to its
  longest row; without packing mlora pads every row of a step (all N adapters) to the step's
  longest row; packed, nothing is padded (mlora's log says whether it packed);
- on CUDA, model FLOP utilisation (formula: ``window_flops`` in common.py).

mlora computes ``lm_head`` only at supervised positions; PEFT computes full-vocabulary logits at
every position. Quick CPU run (tiny model, 4 micro-batches of 2 rows per adapter), and a GPU run:

    python benchmarks/bench_scaling.py
    python benchmarks/bench_scaling.py --model smollm2 --device cuda --dtype bf16 --rank 16 \\
        --rows 32 --batch 4 --cutoff-len 1024
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from common import (
    Spread,
    add_common_args,
    describe_rows,
    exit_on_sigterm,
    mfu_note,
    mlora_padding,
    padding_fraction,
    prepare_model,
    print_table,
    resolve_device,
    run_child,
    window_flops,
    write_config,
)


def speeds(report: dict[str, Any]) -> list[float]:
    """Steady-state real tokens/s of each run in a side's report."""
    return [report["window_tokens"] / run["window_s"] for run in report["runs"]]


def measure(
    args: argparse.Namespace, model_dir: Path, folder: Path, n: int
) -> tuple[list[str], dict[str, Any]]:
    """Train ``n`` adapters on each side; returns the table row and mlora's report."""
    config = write_config(folder, args, [f"adapter{i}" for i in range(n)])
    mlora, _ = run_child(args, "mlora", model_dir, config, folder / "m", repeat=args.repeat)
    peft, _ = run_child(args, "peft", model_dir, config, folder / "p", repeat=args.repeat)
    m, p = speeds(mlora), speeds(peft)
    how, padding = mlora_padding(mlora, mlora["runs"][0])
    row = [
        str(n),
        Spread.of(m).show(digits=0),
        Spread.of(p).show(digits=0),
        f"{statistics.median(m) / statistics.median(p):.2f}x",
        f"{mlora['peak_bytes'] / 2**20:.0f}",
        f"{peft['peak_bytes'] / 2**20:.0f}",
        f"{padding_fraction(mlora, 'padded_per_micro_batch'):.0%}",
        f"{padding_fraction(mlora, 'padded_per_step'):.0%}",
        f"{padding:.0%} ({how})",
    ]
    if args.device.startswith("cuda"):
        flops = window_flops(model_dir, mlora, args.rank, args.targets.split(","))
        for report in (mlora, peft):
            median_s = statistics.median(run["window_s"] for run in report["runs"])
            row.append(f"{flops / median_s / (args.peak_tflops * 1e12):.1%}")
    return row, mlora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", default="1,2,4,8,16", help="comma-separated values of N")
    add_common_args(parser, rows=8, batch=2, repeat=3, warmup=1)
    args = parser.parse_args()
    exit_on_sigterm()
    resolve_device(args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mlora-bench-") as tmp:
        work = Path(tmp)
        model_dir, about = prepare_model(args, work)
        for n in [int(n) for n in args.adapters.split(",")]:
            print(f"N = {n} ...", flush=True)
            (work / f"n{n}").mkdir()
            row, mlora = measure(args, model_dir, work / f"n{n}", n)
            rows.append(row)
            print("  " + " | ".join(row), flush=True)  # kept if a later N runs out of time
    print(f"\nmodel: {about}; device {args.device}, base {args.dtype}, attention {args.attn_impl}")
    print(describe_rows(args, mlora))
    print(
        "mlora: all N adapters in every step, lm_head only at supervised positions | PEFT: "
        "adapters one after another, full-vocabulary logits at every position, padded micro-batches"
    )
    print(
        f"tokens/s: median [min-max] of {args.repeat} runs per process; peak memory: "
        f"{mlora['memory']} of each side's process, after its first run"
    )
    header = ["N", "mlora tok/s", "PEFT tok/s", "ratio", "mlora MiB", "PEFT MiB"]
    header += ["pad PEFT", "pad step", "pad mlora"]
    cuda = args.device.startswith("cuda")
    if cuda:
        header += ["MFU mlora", "MFU PEFT"]
    print()
    print_table(header, rows)
    print(
        "\npadded share of token slots: pad PEFT, of the per-adapter micro-batches; pad step, of "
        "one batch per step padded to its longest row; pad mlora, as mlora's log reports it "
        "(fully packed: 0)"
    )
    if cuda:
        print(mfu_note(args.peak_tflops))


if __name__ == "__main__":
    main()
