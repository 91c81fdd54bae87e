"""Fixed costs of a small run: where the wall time of ``python mlora.py --config ...`` goes.

Builds a tiny random LLaMA and a config of 4 adapters x ``--steps`` steps x 8 rows (the small
job of issue 29) and runs the real command in fresh processes, each wrapped by this script
(``--child``: the checkout's ``mlora.py`` run as ``__main__``), which timestamps the phases of
the run as it goes (no profiler: the figures are the run's own):

- start: the interpreter up to mlora's command line; imports: ``mlora.api`` and what it pulls
  in (torch, transformers); config: reading and checking the config file;
- preflight checks, tokenizer, data (read + tokenize, training and validation rows), model
  load, trainer setup (adapters, of it the packing probe), the first optimizer step (warm-up
  included), the other steps, plots at the end, saving (the writes after the last step and
  the rest of ``mlora.train``), exit (thread joins and interpreter teardown).

Runs: ``cold`` (an empty ``$MLORA_HOME``: the tokenized data cache is written), ``warm`` (the
same home again: rows read from the cache) and, with ``--baseline``, ``data_cache: false``
(no cache at all). ``--code PATH ...`` runs these checkouts' mlora, interleaved (e.g. this
one and the main branch, for a before/after comparison; each needs the same phase functions).
``--threads N`` sets the runs' ``OMP_NUM_THREADS`` (on a busy machine torch's default threads
wait on each other for most of a tiny model's time). ``--tokenize N`` instead times preparing
N alpaca rows in-process: uncached, cold (tokenize + write) and warm (read).

    python benchmarks/bench_startup.py --repeat 3 --baseline
    python benchmarks/bench_startup.py --repeat 3 --threads 1 --code . /path/to/main/checkout
    python benchmarks/bench_startup.py --tokenize 20000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and "--child" not in sys.argv:
    sys.path.insert(0, str(ROOT))

WORDS = (
    "the", "a", "of", "to", "and", "in", "is", "it", "you", "that", "he", "was", "for", "on",
    "are", "with", "as", "I", "his", "they", "alpaca", "instruction", "response", "number",
)  # fmt: skip
PHASES = (
    "start", "imports", "config", "preflight", "tokenizer", "data", "model load",
    "trainer setup", "first step", "other steps", "plots", "saving", "exit",
)  # fmt: skip


def write_job(folder: Path, steps: int, data_cache: bool | None) -> list[str]:
    """The tiny model, data and config; returns the command's arguments after ``mlora.py``
    (``data_cache`` None: the key is left out, for checkouts that do not know it)."""
    from tests.conftest import make_model, make_tokenizer
    from tests.helpers import addition_rows, write_json, write_template

    if not (folder / "tiny").exists():
        tokenizer = make_tokenizer()
        make_model(vocab_size=len(tokenizer)).save_pretrained(folder / "tiny")
        tokenizer.save_pretrained(folder / "tiny")
    template, data = (
        write_template(folder),
        write_json(folder / "add.json", addition_rows(steps * 8)),
    )
    adapters = [
        {"name": f"a{i}", "data": data, "prompt": template, "r": 4, "batch_size": 8,
         "num_epochs": 1, "target_modules": ["q_proj", "v_proj"]}
        for i in range(4)
    ]  # fmt: skip
    config: dict = {"cutoff_len": 64, "lora": adapters}
    if data_cache is not None:
        config["data_cache"] = data_cache
    name = {True: "config.json", False: "config-nocache.json", None: "config-plain.json"}[
        data_cache
    ]
    (folder / name).write_text(json.dumps(config))
    return [
        "--base_model", str(folder / "tiny"), "--config", str(folder / name),
        "--dir", str(folder / "out"), "--overwrite",
    ]  # fmt: skip


# --- the child: mlora.py's main, its phases timestamped ---------------------------------------


def child(marks_path: str, argv: list[str]) -> None:
    """Run the checkout's ``mlora.py argv`` (the working folder's) as ``__main__`` in this
    process, as the interpreter would, writing each phase's (start, end) times to
    ``marks_path`` when the process exits (an ``atexit`` handler: ``mlora.py`` may end
    without the interpreter's teardown)."""
    import atexit
    import runpy

    marks: dict[str, list[list[float]]] = {}
    atexit.register(lambda: Path(marks_path).write_text(json.dumps(marks)))

    def timed(owner: object, name: str, label: str) -> None:
        function = getattr(owner, name)

        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            start = time.time()
            try:
                return function(*args, **kwargs)
            finally:
                marks.setdefault(label, []).append([start, time.time()])

        setattr(owner, name, wrapper)

    start = time.time()
    import mlora.api
    import mlora.cli.train
    import mlora.config.schema
    import mlora.model.loading
    import mlora.model.multi_lora
    import mlora.training.metrics.plots
    import mlora.training.trainer

    marks["imports"] = [[start, time.time()]]
    timed(mlora.cli.train, "main", "main")
    timed(mlora.config.schema, "load_config", "config")
    timed(mlora.api, "preflight", "preflight")
    timed(mlora.api, "prepare_data", "data")
    timed(mlora.api, "prepare_validation", "data")
    timed(mlora.model.loading.BaseLoad, "load_tokenizer", "tokenizer")
    timed(mlora.model.loading.BaseLoad, "load", "model load")
    timed(mlora.training.trainer.Trainer, "__init__", "trainer setup")
    timed(mlora.model.multi_lora.MultiLoraModel, "set_packing", "packing probe")
    timed(mlora.training.trainer.Trainer, "train_step", "step")
    timed(mlora.training.trainer.Trainer, "_loop", "loop")
    timed(mlora.training.metrics.plots.PlotSink, "close", "plots")
    timed(mlora.api, "train", "train")
    script = str(Path.cwd() / "mlora.py")
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


# --- the parent: runs and tables --------------------------------------------------------------


def spans(marks: dict, label: str) -> float:
    return sum(end - start for start, end in marks.get(label, []))


def phases(marks: dict, launched: float, ended: float) -> dict[str, float]:
    """Seconds per phase (``PHASES``) from one child's marks and the parent's clock."""
    out = {"start": marks["imports"][0][0] - launched, "imports": spans(marks, "imports")}
    for label in ("config", "preflight", "tokenizer", "data", "model load", "plots"):
        out[label] = spans(marks, label)
    out["trainer setup"] = spans(marks, "trainer setup")
    out["  of it: packing probe"] = spans(marks, "packing probe")
    steps = marks.get("step", [])
    out["first step"] = steps[0][1] - steps[0][0] if steps else 0.0
    out["other steps"] = spans(marks, "loop") - out["first step"]
    inside = ("preflight", "tokenizer", "data", "model load", "trainer setup", "plots")
    out["saving"] = spans(marks, "train") - spans(marks, "loop") - sum(out[k] for k in inside)
    out["exit"] = ended - marks["main"][0][1]  # after main: threads, exit handlers, teardown
    out["total"] = ended - launched
    return out


def run_once(
    code: Path, command: list[str], home: Path, folder: Path, threads: int | None
) -> dict[str, float]:
    """One whole ``mlora.py`` process of checkout ``code`` (wrapped by ``--child``); its phases."""
    marks_path = folder / "marks.json"
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "MLORA_HOME": str(home)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    launched = time.time()
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(marks_path), "--", *command],
        env=env,
        capture_output=True,
        text=True,
        cwd=code,
    )
    ended = time.time()
    if done.returncode != 0:
        raise SystemExit(f"error: mlora.py of {code} exited {done.returncode}:\n{done.stderr}")
    return phases(json.loads(marks_path.read_text()), launched, ended)


def table(results: dict[str, list[dict[str, float]]]) -> None:
    """Median seconds per phase of each kind of run (and the spread of the totals)."""
    kinds = list(results)
    width = max(14, *(len(k) + 2 for k in kinds))
    print(f"{'phase':<24}" + "".join(f"{k:>{width}}" for k in kinds))
    rows = [*PHASES[:8], "  of it: packing probe", *PHASES[8:], "total"]
    for phase in rows:
        cells = [statistics.median(r[phase] for r in results[k]) for k in kinds]
        print(f"{phase:<24}" + "".join(f"{c:>{width}.2f}" for c in cells))
    spread = [
        f"{min(r['total'] for r in results[k]):.2f}-{max(r['total'] for r in results[k]):.2f}"
        for k in kinds
    ]
    print(f"{'total [min-max]':<24}" + "".join(f"{s:>{width}}" for s in spread))


def whole_runs(args: argparse.Namespace) -> None:
    """Each checkout's runs (cold, warm, and with ``--baseline`` no cache; a checkout without
    the cache: one plain run), interleaved so a busy spell hits every kind alike."""
    folder = args.keep or Path(tempfile.mkdtemp(prefix="mlora-startup-"))
    folder.mkdir(parents=True, exist_ok=True)
    kinds: dict[str, tuple[Path, list[str]]] = {}
    for code in args.code:
        prefix = f"{code.name}: " if len(args.code) > 1 else ""
        if (code / "mlora" / "data" / "token_cache.py").exists():
            cached = write_job(folder, args.steps, True)
            kinds[prefix + "cold"] = kinds[prefix + "warm"] = (code, cached)
            if args.baseline:
                kinds[prefix + "no cache"] = (code, write_job(folder, args.steps, False))
        else:
            kinds[prefix + "no cache"] = (code, write_job(folder, args.steps, None))
    results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    for repeat in range(args.repeat):
        for kind, (code, command) in kinds.items():
            home = folder / f"home-{code.name}-{repeat}"  # empty: cold; the next run: warm
            results[kind].append(run_once(code, command, home, folder, args.threads))
    threads = f"OMP_NUM_THREADS={args.threads}" if args.threads else "default threads"
    print(f"4 adapters x {args.steps} steps x 8 rows, tiny LLaMA, {threads}; "
          f"median seconds of {args.repeat} runs")  # fmt: skip
    table(results)


# --- tokenizing many rows in-process ----------------------------------------------------------


def tokenize_runs(args: argparse.Namespace) -> None:
    """Prepare ``args.tokenize`` alpaca rows: uncached, cold cache, warm cache (median)."""
    import random

    from mlora.config.schema import parse_config
    from mlora.model.loading import load_tokenizer
    from mlora.training.data_preparation import prepare_data

    folder = Path(tempfile.mkdtemp(prefix="mlora-tokenize-"))
    rng = random.Random(0)
    rows = [
        {"instruction": " ".join(rng.choices(WORDS, k=rng.randint(5, 40))),
         "input": " ".join(rng.choices(WORDS, k=rng.randint(0, 30))),
         "output": " ".join(rng.choices(WORDS, k=rng.randint(5, 80)))}
        for _ in range(args.tokenize)
    ]  # fmt: skip
    data = folder / "rows.json"
    data.write_text(json.dumps(rows))
    tokenizer_path = args.tokenizer
    if tokenizer_path == "smollm2":
        from benchmarks.smollm2 import smollm2_folder

        tokenizer_path = str(smollm2_folder())
    tokenizer = load_tokenizer(tokenizer_path)

    def timed(cache: bool, home: str) -> float:
        os.environ["MLORA_HOME"] = home
        raw = {"cutoff_len": 256, "data_cache": cache,
               "lora": [{"name": "a", "data": str(data), "prompt": "alpaca"}]}  # fmt: skip
        start = time.perf_counter()
        prepare_data(parse_config(raw, "bench"), tokenizer)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"uncached": [], "cold cache": [], "warm cache": []}
    for _ in range(args.repeat):
        home = tempfile.mkdtemp(prefix="mlora-home-")
        times["uncached"].append(timed(False, home))
        times["cold cache"].append(timed(True, home))
        times["warm cache"].append(timed(True, home))
    print(f"{args.tokenize} alpaca rows, tokenizer {args.tokenizer}, cutoff_len 256; "
          f"seconds, median [min-max] of {args.repeat}")  # fmt: skip
    for kind, values in times.items():
        print(f"{kind:<12} {statistics.median(values):8.2f} [{min(values):.2f}-{max(values):.2f}]")


def main() -> None:
    if "--child" in sys.argv:  # python bench_startup.py --child MARKS -- mlora.py's arguments
        split = sys.argv.index("--")
        child(sys.argv[sys.argv.index("--child") + 1], sys.argv[split + 1 :])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per adapter")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each kind")
    parser.add_argument("--baseline", action="store_true", help="also runs with data_cache off")
    parser.add_argument(
        "--code", type=Path, nargs="+", default=[ROOT], help="the mlora checkouts to run"
    )
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the runs")
    parser.add_argument("--keep", type=Path, help="write the job here and keep it")
    parser.add_argument("--tokenize", type=int, help="time preparing this many rows instead")
    parser.add_argument("--tokenizer", default="smollm2", help="--tokenize: a tokenizer folder")
    args = parser.parse_args()
    args.code = [path.resolve() for path in args.code]
    if args.tokenize:
        tokenize_runs(args)
    else:
        whole_runs(args)


if __name__ == "__main__":
    main()
