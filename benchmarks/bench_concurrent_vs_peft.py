"""mlora training N adapters together vs PEFT training the same adapters one after another.

Both sides train the same adapters on the same rows in the same order (mlora's own data
pipeline and queues build the micro-batches for both), same steps, cutoff_len, AdamW and lr,
base model loaded once per side. What differs (the printout says it again):

- mlora: ``mlora.train``, one forward and one backward per step over the rows of every adapter;
  ``lm_head`` and the loss only at supervised positions; each step's rows packed into one
  sequence without padding, or padded to the step's longest row where the engine does not pack
  (it decides per model; the printout says which, from mlora's log).
- PEFT: ``get_peft_model`` + a plain loop (benchmarks/peft_train_one.py), one adapter after
  another; full-vocabulary logits at every position; each micro-batch padded to its longest row.

Reported per side, median [min-max] over ``--repeat`` runs, each run a fresh process per side:

- same process: the whole run measured inside the process (tokenizer + data prep + model load +
  training + saving), and steady-state training tokens/s (real tokens, no padding, over the
  micro-batches after ``--warmup`` and before the last of each adapter); on CUDA also MFU;
- separate processes: wall time of mlora's one process vs one ``python`` process per PEFT
  adapter run one after another (each pays interpreter start, imports and model load);
- ratios are paired per repeat: PEFT time / mlora time, mlora tokens/s / PEFT tokens/s.

Rows are generated from ``--seed`` (benchmarks/common.py): ``longtail`` lengths (most rows
short, a few up to cutoff_len) or ``similar``. Quick CPU run (tiny model, 4 adapters of 8
micro-batches of 4 rows), the same on SmolLM2, and a GPU run:

    python benchmarks/bench_concurrent_vs_peft.py
    python benchmarks/bench_concurrent_vs_peft.py --model smollm2 --lengths similar
    python benchmarks/bench_concurrent_vs_peft.py --model smollm2 --device cuda --dtype bf16 \\
        --rows 256 --batch 8 --cutoff-len 1024 --rank 16
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from common import (
    Spread,
    add_common_args,
    describe_rows,
    exit_on_sigterm,
    mfu_note,
    prepare_model,
    print_table,
    resolve_device,
    run_child,
    side_notes,
    window_flops,
    write_config,
)


def tokens_per_s(report: dict[str, Any]) -> float:
    """Steady-state real tokens/s of a side's (single) run."""
    return report["window_tokens"] / report["runs"][0]["window_s"]


def measure(args: argparse.Namespace) -> tuple[dict[str, list[Any]], str, float]:
    """Run every side ``--repeat`` times, each run a fresh process.

    Returns:
        Per variant the list over repeats: ``mlora`` and ``peft`` (report, process wall time),
        ``separate`` (summed wall time of one PEFT process per adapter); the model's
        description; the useful FLOPs of the steady-state window (for MFU).
    """
    names = [f"adapter{i}" for i in range(args.adapters)]
    measured: dict[str, list[Any]] = {"mlora": [], "peft": [], "separate": []}
    with tempfile.TemporaryDirectory(prefix="mlora-bench-") as tmp:
        work = Path(tmp)
        model_dir, about = prepare_model(args, work)
        config = write_config(work, args, names)
        for rep in range(args.repeat):
            print(f"repeat {rep + 1}/{args.repeat} ...", flush=True)
            m, m_wall = run_child(args, "mlora", model_dir, config, work / "m")
            p, p_wall = run_child(args, "peft", model_dir, config, work / "p")
            alone = sum(
                run_child(args, "peft", model_dir, config, work / "s", [n])[1] for n in names
            )
            measured["mlora"].append((m, m_wall))
            measured["peft"].append((p, p_wall))
            measured["separate"].append(alone)
            print(  # kept if a later repeat runs out of time
                f"  mlora {m['runs'][0]['total_s']:.1f} s in-process, {m_wall:.1f} s process, "
                f"{tokens_per_s(m):.0f} tok/s | PEFT {p['runs'][0]['total_s']:.1f} s, "
                f"{p_wall:.1f} s, {tokens_per_s(p):.0f} tok/s | PEFT {len(names)} processes "
                f"{alone:.1f} s",
                flush=True,
            )
        flops = window_flops(model_dir, m, args.rank, args.targets.split(","))
    return measured, about, flops


def paired(label: str, m: list[float], p: list[float], unit: str, better: str) -> list[str]:
    """A table row: both sides' spreads and mlora's advantage, paired per repeat (PEFT time /
    mlora time when lower is better, mlora / PEFT when higher is)."""
    ratio = [b / a if better == "lower" else a / b for a, b in zip(m, p, strict=True)]
    return [label, Spread.of(m).show(unit), Spread.of(p).show(unit), Spread.of(ratio).show("x")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=4, help="adapters trained (N)")
    add_common_args(parser, rows=32, batch=4, repeat=3, warmup=2)
    args = parser.parse_args()
    exit_on_sigterm()
    resolve_device(args)
    measured, about, flops = measure(args)

    mlora, peft = [r for r, _ in measured["mlora"]], [r for r, _ in measured["peft"]]
    stats, first = mlora[0], [side[0]["runs"][0]["first_loss"] for side in (mlora, peft)]
    print(f"\nmodel: {about}; device {args.device}, base {args.dtype}, attention {args.attn_impl}")
    print(f"{args.adapters} adapters; {describe_rows(args, stats)}")
    for line in side_notes(stats, stats["runs"][0]):
        print(line)
    print(
        f"first-step loss (B = 0: both are the base model's): mlora {first[0]:.5f}, "
        f"PEFT {first[1]:.5f}"
    )
    print(f"{args.repeat} repeats, median [min-max]; ratios paired per repeat\n")
    walls = {side: [wall for _, wall in measured[side]] for side in ("mlora", "peft")}
    rows = [
        paired(
            "same process: load+data+train+save",
            [r["runs"][0]["total_s"] for r in mlora],
            [r["runs"][0]["total_s"] for r in peft],
            " s",
            "lower",
        ),
        paired(
            "same process: steady tokens/s",
            [tokens_per_s(r) for r in mlora],
            [tokens_per_s(r) for r in peft],
            "",
            "higher",
        ),
        paired("one process each: wall", walls["mlora"], walls["peft"], " s", "lower"),
        paired(
            f"PEFT {args.adapters} processes: wall",
            walls["mlora"],
            measured["separate"],
            " s",
            "lower",
        ),
    ]
    cuda = args.device.startswith("cuda")
    if cuda:
        peak = args.peak_tflops * 1e12
        mfu = [
            [100 * flops / r["runs"][0]["window_s"] / peak for r in side] for side in (mlora, peft)
        ]
        rows.append(paired("steady MFU", *mfu, " %", "higher"))
    print_table(["", "mlora", "PEFT", "mlora advantage"], rows)
    print(
        f"\npeak memory ({stats['memory']} of each side's process): mlora "
        f"{mlora[0]['peak_bytes'] / 2**20:.0f} MiB, PEFT {peft[0]['peak_bytes'] / 2**20:.0f} MiB"
    )
    if cuda:
        print(mfu_note(args.peak_tflops))


if __name__ == "__main__":
    main()
