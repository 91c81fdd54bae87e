"""Shared pieces of the mlora-vs-PEFT benchmarks: data, models, the mlora side, figures.

The two sides train the same adapters on the same rows in the same order; only the engine
differs. The mlora side (here) is ``mlora.train``, the public API: every adapter together, one
forward and one backward per step, ``lm_head`` only at supervised positions. The PEFT side
(peft_train_one.py) is the ordinary user workflow, one adapter after another. Both build their
rows and micro-batches with mlora's pipeline (``mlora.prepare_data``,
``mlora.batching.dispatcher.AdapterQueue``; see ``schedule``), so both see identical batches.

Each side runs in a fresh child process (``python benchmarks/common.py ...`` for mlora,
``python benchmarks/peft_train_one.py ...`` for PEFT, same flags, see ``child_parser``) that
prints one JSON line: its in-process times, its steady-state window, its peak memory and the
statistics of the rows it trained on. Steady state = micro-batches ``warmup+1 .. M-1`` of every
adapter (the first ``warmup`` carry one-off costs, the last one the final save); mlora's step
ends are read from its per-step log line (``log_step`` 1), PEFT's after a device sync.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import random
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from smollm2 import DESCRIPTION, smollm2_folder
from tokenizers import Tokenizer, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `import mlora` from a checkout that is not pip-installed

import mlora  # noqa: E402
from mlora.batching.dispatcher import AdapterQueue, MicroBatch  # noqa: E402
from mlora.data.rows import TokenizedRow  # noqa: E402

# Common English words that SmolLM2's tokenizer (and our word-level one) encode as one token
# each, so a row of n words is about n tokens on every benchmark model.
_WORD_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were their one all we can her has there been if more when will "
    "would who so no she other its may these about them than some time into only do could new "
    "two then first any my now such like our over man me even most made after also did many "
    "before must through back years where much your way well down should because each just "
    "those people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us great "
    "old year off come since against go came right used take three"
)
WORDS = tuple(_WORD_TEXT.split())
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
HF_ATTENTION = {"eager": "eager", "sdpa": "sdpa", "flash_attn": "flash_attention_2"}
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Random models (no download): name -> LlamaConfig keywords. Llama-3.2-1B's shape; its rope
# scaling is left out, it does not change the cost.
SHAPES = {
    "smollm2-shape": {  # SmolLM2-135M's config: its cost per token without its weights
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
    "llama1b": {
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "tie_word_embeddings": True,
    },
}  # fmt: skip
TEMPLATE_TOKENS = 64  # room for the alpaca template's own tokens, on any benchmark tokenizer
STEP_LOG = re.compile(r"step (\d+) \|")  # mlora's per-step log line: "step 12 | name | ..."
# its end-of-run line "padding: 0.0% of 320 tokens (rows in one stream)"; older engines said
# "(packing on)" / "(packing off)"
PADDING_LOG = re.compile(r"padding: ([\d.]+)% of \d+ tokens \((?:packing |rows )?([^)]+)\)")


# --- data -----------------------------------------------------------------------------------------


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def make_rows(count: int, seed: int, lengths: str, cutoff_len: int) -> list[dict[str, str]]:
    """Alpaca-style rows whose lengths (in words, about tokens) follow ``lengths``.

    ``longtail``: prompt and answer word counts lognormal (medians 20 and 40, sigma 0.8 and 1.0),
    so most rows are short and a few reach ``cutoff_len`` (as in instruction data sets).
    ``similar``: prompt 18-22 and answer 36-44 words. Prompts are capped well below the cutoff
    (the prompt template adds ~50 tokens) so mlora's pipeline never drops a row: a prompt that
    fills the cutoff has nothing to learn, and adapters need equal row counts here.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        if lengths == "longtail":
            prompt = round(rng.lognormvariate(math.log(20), 0.8))
            answer = round(rng.lognormvariate(math.log(40), 1.0))
        else:
            prompt, answer = rng.randint(18, 22), rng.randint(36, 44)
        prompt = max(3, min(prompt, (cutoff_len - TEMPLATE_TOKENS) // 2))
        answer = min(max(answer, 1), cutoff_len)
        head = min(prompt, 12)  # a short instruction, the rest of the prompt as input
        rows.append({
            "instruction": _words(rng, head).capitalize() + "?",
            "input": _words(rng, prompt - head),
            "output": _words(rng, answer) + ".",
        })  # fmt: skip
    return rows


def write_config(folder: Path, args: argparse.Namespace, names: Sequence[str]) -> Path:
    """Write each adapter's data set and one mlora config for them; returns the config path.

    Every adapter gets the same number of rows (its own seed), so all have the same number of
    micro-batches and every mlora step holds one micro-batch of each.
    """
    adapters = []
    for index, name in enumerate(names):
        data = folder / f"{name}.json"
        rows = make_rows(args.rows, args.seed * 1000 + index, args.lengths, args.cutoff_len)
        data.write_text(json.dumps(rows))
        adapters.append({
            "name": name, "data": str(data), "r": args.rank, "lora_alpha": 2 * args.rank,
            "lora_dropout": 0.05, "target_modules": args.targets.split(","),
            "batch_size": args.batch, "micro_batch_size": args.micro_batch or args.batch,
            "num_epochs": args.epochs, "optim": "adamw", "lr": args.lr,
        })  # fmt: skip
    config = {
        "cutoff_len": args.cutoff_len,
        "log_step": 1,  # one log line per step: the step ends the steady-state window reads
        "save_step": 0,
        "gradient_checkpoint": args.gradient_checkpoint,
        "lora": adapters,
    }
    if args.pass_tokens is not None:  # else the engine's default
        config["pass_tokens"] = (
            args.pass_tokens if args.pass_tokens == "auto" else int(args.pass_tokens)
        )
    if args.mlora_packing is not None:  # else the engine's default
        config["packing"] = {"on": True, "off": False, "auto": "auto"}[args.mlora_packing]
    path = folder / "bench.json"
    path.write_text(json.dumps(config, indent=1))
    return path


# --- models ---------------------------------------------------------------------------------------


def word_tokenizer() -> PreTrainedTokenizerFast:
    """An offline word-level tokenizer over ``WORDS`` (one token per word or punctuation mark;
    other words, e.g. the prompt template's, map to <unk>), with LLaMA's BOS/EOS convention."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for word in [*WORDS, ".", "?", ":", "#", ","]:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip


def build_random_llama(folder: Path, shape: dict[str, Any], dtype: str, device: str) -> None:
    """Save a random LLaMA of ``shape`` (weights in ``dtype``) and the word tokenizer."""
    torch.manual_seed(0)
    config = LlamaConfig(
        **shape, bos_token_id=1, eos_token_id=2, pad_token_id=3, max_position_embeddings=4096
    )
    with torch.device(device):  # initialising a 1B model on the GPU takes seconds, not minutes
        model = LlamaForCausalLM(config).to(getattr(torch, DTYPES[dtype]))
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the measured child processes need the memory, not this one


def prepare_model(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """The model folder both sides load, and a one-line description of it."""
    if args.model == "smollm2":
        return smollm2_folder(), DESCRIPTION
    if args.model == "tiny":
        shape = {
            "hidden_size": args.hidden, "intermediate_size": args.hidden * 8 // 3,
            "num_hidden_layers": args.layers, "num_attention_heads": 8,
            "num_key_value_heads": 4, "vocab_size": args.vocab,
        }  # fmt: skip
        about = f"random LLaMA, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}"
    else:
        shape = SHAPES[args.model]
        about = {"llama1b": "Llama-3.2-1B's", "smollm2-shape": "SmolLM2-135M's"}[args.model]
        about = f"random LLaMA with {about} shape"
    build_random_llama(work / "model", shape, args.dtype, args.device)
    return work / "model", about + " (word-level tokenizer)"


# --- the schedule both sides follow -----------------------------------------------------------


def schedule(
    config: mlora.TrainConfig, data: dict[str, list[TokenizedRow]], seed: int
) -> dict[str, list[MicroBatch]]:
    """Each adapter's micro-batches in training order, exactly as mlora's trainer walks them.

    Raises:
        SystemExit: adapters with different micro-batch counts (the window needs equal ones).
    """
    out = {}
    for a in config.lora:
        queue = AdapterQueue(
            a.name, data[a.name], a.batch_size, a.micro_batch_size or a.batch_size, a.num_epochs,
            shuffle=a.shuffle, group_by_length=a.group_by_length, seed=seed,
        )  # fmt: skip
        out[a.name] = [queue.pop() for _ in range(queue.total_micro_batches)]
    if len({len(batches) for batches in out.values()}) != 1:
        raise SystemExit("every adapter needs the same number of micro-batches")
    return out


def supervised(row: TokenizedRow) -> int:
    """Positions of a row that predict a label (token t predicts label t + 1)."""
    return sum(label != -100 for label in row.labels[1:])


def row_stats(plan: dict[str, list[MicroBatch]], warmup: int) -> dict[str, Any]:
    """Token counts of the steady-state window, padding of both batch shapes, row lengths."""
    micro = len(next(iter(plan.values())))
    if micro < warmup + 2:
        raise SystemExit(f"{micro} micro-batches per adapter; the window needs >= {warmup + 2}")
    window = [
        row for batches in plan.values() for mb in batches[warmup : micro - 1] for row in mb.rows
    ]
    lengths = sorted(len(row) for batches in plan.values() for mb in batches for row in mb.rows)
    per_micro = sum(len(mb.rows) * mb.max_len for batches in plan.values() for mb in batches)
    per_step = 0  # one padded batch per step (mlora without packing): all rows to the longest
    for k in range(micro):
        step = [batches[k] for batches in plan.values()]
        per_step += sum(len(mb.rows) for mb in step) * max(mb.max_len for mb in step)
    return {
        "window_tokens": sum(len(row) for row in window),
        "window_supervised": sum(supervised(row) for row in window),
        "window_len_sq": sum(len(row) * (len(row) + 1) for row in window),
        "real_tokens": sum(lengths),
        "padded_per_micro_batch": per_micro,
        "padded_per_step": per_step,
        "micro_batches": micro,
        "lengths": [
            statistics.median(lengths),
            lengths[int(0.9 * (len(lengths) - 1))],
            lengths[-1],
        ],
    }


# --- the two sides (child process) --------------------------------------------------------------


class TrainerLog(logging.Handler):
    """Reads mlora's log as it is written: when each step is logged (with ``log_step`` 1 that is
    the end of every step: the line follows a host read of the losses, so device work is done)
    and the run's padding as the engine reports it (whether it packed: ``packing`` "auto" probes
    the model; packed rows fill bins of one width, so a little padding can remain).
    """

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.ends: dict[int, float] = {}
        self.packing: str | None = None  # None: the engine did not say (it predates packing)
        self.padding: float | None = None  # padded share of the token slots, reported

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if match := STEP_LOG.match(message):
            self.ends.setdefault(int(match.group(1)), time.perf_counter())
        elif match := PADDING_LOG.match(message):
            self.padding, self.packing = float(match.group(1)) / 100, match.group(2)


def synced_now(device: torch.device) -> float:
    """Now, after the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run_mlora(args: argparse.Namespace, config: mlora.TrainConfig, run: int) -> dict[str, Any]:
    """Train every adapter with ``mlora.train``; returns times, first loss and the plan."""
    log = TrainerLog()
    logger = logging.getLogger("mlora")
    logger.setLevel(logging.INFO)
    logger.addHandler(log)
    start = time.perf_counter()
    trainer = mlora.train(
        config, base_model=args.model_dir, output_dir=Path(args.out) / f"run{run}",
        seed=args.seed, dtype=getattr(torch, DTYPES[args.dtype]), device=args.device,
        attn_implementation=args.attn_impl, overwrite=True,
    )  # fmt: skip
    total = time.perf_counter() - start
    logger.removeHandler(log)
    plan = schedule(config, mlora.prepare_data(config, trainer.tokenizer), args.seed)
    micro = len(next(iter(plan.values())))
    if trainer.global_step != micro or len(log.ends) != micro:
        raise SystemExit(
            f"mlora ran {trainer.global_step} steps and logged {len(log.ends)}; expected "
            f"{micro} (one micro-batch of every adapter per step, one log line per step)"
        )
    return {
        "total_s": total,
        "window_s": log.ends[micro - 1] - log.ends[args.warmup],
        "first_loss": statistics.mean(r.history[0] for r in trainer.runs),
        "packing": log.packing,
        "padding": log.padding,
        "plan": plan,
    }


def peak_memory(device: str) -> tuple[int, str]:
    """This process's peak memory so far, and how it was measured."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS (ru_maxrss)"


def child_main(
    run_side: Callable[[argparse.Namespace, mlora.TrainConfig, int], dict[str, Any]],
) -> None:
    """A side's process: run it ``--repeat`` times and print one JSON line with its times, its
    peak memory (after the first run, which loaded the model once) and its rows' statistics."""
    args = child_parser().parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    config = mlora.load_config(args.config)
    if args.adapters:
        config.lora = [config.adapter(name) for name in args.adapters.split(",")]
    runs, peak = [], None
    for run in range(args.repeat):
        result = run_side(args, config, run)
        plan = result.pop("plan")
        runs.append(result)
        if peak is None:
            peak = peak_memory(args.device)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(
        json.dumps(
            {"runs": runs, "peak_bytes": peak[0], "memory": peak[1], **row_stats(plan, args.warmup)}
        )
    )


# --- the parent side ----------------------------------------------------------------------------


def add_common_args(
    parser: argparse.ArgumentParser, rows: int, batch: int, repeat: int, warmup: int
) -> None:
    """The model, data and training flags every benchmark shares; the defaults given here are
    each benchmark's quick CPU run."""
    add = parser.add_argument
    add(
        "--model",
        choices=["tiny", "smollm2", *SHAPES],
        default="tiny",
        help="tiny: random LLaMA (--hidden/--layers/--vocab); smollm2: pretrained "
        "SmolLM2-135M-Instruct (offline, see smollm2.py); llama1b / smollm2-shape: random, "
        "Llama-3.2-1B's / SmolLM2-135M's shape",
    )
    add("--hidden", type=int, default=256, help="tiny model only")
    add("--layers", type=int, default=4, help="tiny model only")
    add("--vocab", type=int, default=32000, help="tiny model only (LLaMA-2's size)")
    add("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    add("--dtype", choices=DTYPES, default="fp32", help="base model dtype (adapters stay fp32)")
    add("--attn-impl", choices=HF_ATTENTION, default="sdpa", help="same kernel on both sides")
    add("--gradient-checkpoint", choices=["none", "recompute"], default="none", help="both sides")
    add(
        "--mlora-packing",
        choices=["auto", "on", "off"],
        default=None,
        help="mlora's packing key (default: not set, the engine's default)",
    )
    add(
        "--pass-tokens",
        default=None,
        help="mlora's pass_tokens key: 'auto', or most tokens per forward pass, 0 for one pass "
        "per step (default: not set, the engine's default)",
    )
    add("--rows", type=int, default=rows, help="training rows per adapter")
    add("--batch", type=int, default=batch, help="rows per optimizer step per adapter")
    add("--micro-batch", type=int, default=None, help="rows per forward (default: --batch)")
    add("--epochs", type=int, default=1)
    add("--cutoff-len", type=int, default=256)
    add("--lengths", choices=["longtail", "similar"], default="longtail", help="row length mix")
    add("--rank", type=int, default=8)
    add("--targets", default="q_proj,k_proj,v_proj,o_proj", help="comma-separated")
    add("--lr", type=float, default=1e-4)
    add(
        "--warmup",
        type=int,
        default=warmup,
        choices=range(1, 100),
        metavar="W",
        help="first micro-batches per adapter left out of steady state (>= 1)",
    )
    add("--repeat", type=int, default=repeat)
    add("--seed", type=int, default=42)
    add("--peak-tflops", type=float, default=989.0, help="for MFU on CUDA (H100 bf16 dense)")


def exit_on_sigterm() -> None:
    """Turn SIGTERM (what ``timeout`` sends, see gpu_suite.sh) into a normal exit, so the
    running child is killed and the temporary folders (model copy, adapters) are removed."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def resolve_device(args: argparse.Namespace) -> None:
    """``--device`` default: CUDA when torch sees it, else the CPU."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"


def run_child(
    args: argparse.Namespace,
    side: str,
    model_dir: Path,
    config: Path,
    out: Path,
    adapters: Sequence[str] = (),
    repeat: int = 1,
) -> tuple[dict[str, Any], float]:
    """Run one side in a fresh process; returns its JSON report and the process's wall time."""
    script = Path(__file__) if side == "mlora" else Path(__file__).with_name("peft_train_one.py")
    command = [
        sys.executable, str(script), "--model-dir", str(model_dir),
        "--config", str(config), "--out", str(out), "--adapters", ",".join(adapters),
        "--device", args.device, "--dtype", args.dtype, "--attn-impl", args.attn_impl,
        "--warmup", str(args.warmup), "--repeat", str(repeat), "--seed", str(args.seed),
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{side} child failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), wall


@dataclass(frozen=True)
class Spread:
    """Median and range of repeated measurements."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    def show(self, unit: str = "", digits: int = 2) -> str:
        low, high = f"{self.low:.{digits}f}", f"{self.high:.{digits}f}"
        return f"{self.median:.{digits}f}{unit} [{low}-{high}]"


def window_flops(
    model_dir: Path, stats: dict[str, Any], rank: int, targets: Sequence[str]
) -> float:
    """Useful training FLOPs of the steady-state window (the same for both sides).

    Per real token: 2P forward + 2P backward through the frozen decoder linears (input
    gradients only), P = their parameter count; 6r(d_in + d_out) per adapted linear (forward,
    input and weight gradients); attention 2 * q_dim * L(L + 1) per row per layer forward,
    x3 with backward; lm_head 4 * hidden * vocab per supervised token. Padding and the logits
    PEFT computes at unsupervised positions are not counted: MFU is useful work.
    """
    c = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv, d, f = (
        c.num_attention_heads * head_dim,
        c.num_key_value_heads * head_dim,
        c.hidden_size,
        c.intermediate_size,
    )
    shapes = dict(
        zip(LINEAR_NAMES, [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)], strict=True)
    )
    body = sum(i * o for i, o in shapes.values())
    lora = sum(rank * (i + o) for name, (i, o) in shapes.items() if name in targets)
    per_token = c.num_hidden_layers * (4 * body + 6 * lora)
    attention = 6 * c.num_hidden_layers * q * stats["window_len_sq"]
    return (
        per_token * stats["window_tokens"]
        + attention
        + 4 * d * c.vocab_size * stats["window_supervised"]
    )


def mfu_note(peak_tflops: float) -> str:
    """The MFU formula, for the printout (``window_flops`` computes it)."""
    return (
        f"MFU = useful FLOPs / time / {peak_tflops:g} TFLOP/s; useful FLOPs = real tokens x "
        "layers x (4 P + 6 r sum(d_in + d_out) over adapted linears) + 6 layers q_dim sum L(L+1) "
        "over rows + 4 hidden vocab x supervised tokens (P: a decoder layer's frozen linear "
        "weights, forward + input-gradient backward; padding and unused logits not counted)"
    )


def padding_fraction(stats: dict[str, Any], padded_key: str) -> float:
    """Padded slots / all slots of the batches, from the rows and batch composition."""
    return 1 - stats["real_tokens"] / stats[padded_key]


def mlora_padding(stats: dict[str, Any], run: dict[str, Any]) -> tuple[str, float]:
    """How mlora batched its rows in ``run`` and the padded share of its token slots: as its log
    reports it, or (an engine from before packing, which says nothing) computed from the rows."""
    if run["packing"] is None:
        return "padded to each step's longest row", padding_fraction(stats, "padded_per_step")
    return f"rows {run['packing']}", run["padding"]


def side_notes(stats: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """What differs between the sides, for the printout (``run``: one of mlora's runs)."""
    how, padding = mlora_padding(stats, run)
    return [
        f"mlora: mlora.train, all adapters in every step, one forward+backward; lm_head only at "
        f"supervised positions; {how}: {padding:.0%} of token slots are padding (one padded "
        f"batch per step would be {padding_fraction(stats, 'padded_per_step'):.0%})",
        f"PEFT : get_peft_model + plain loop, adapters one after another; full-vocabulary logits "
        f"at every position; pads each micro-batch to its longest row: "
        f"{padding_fraction(stats, 'padded_per_micro_batch'):.0%} of token slots are padding",
    ]


def describe_rows(args: argparse.Namespace, stats: dict[str, Any]) -> str:
    median, p90, longest = stats["lengths"]
    return (
        f"rows: {args.lengths} lengths, median {median:.0f} / p90 {p90} / max {longest} tokens, "
        f"cutoff_len {args.cutoff_len}; {stats['micro_batches']} micro-batches per adapter of "
        f"{args.micro_batch or args.batch} rows, batch {args.batch}; LoRA r {args.rank} on "
        f"{args.targets}; AdamW lr {args.lr}; steady state leaves out each adapter's first "
        f"{args.warmup} and last micro-batch"
    )


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def child_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="one benchmark side (run by the benchmarks)")
    add = parser.add_argument
    for flag in ("--model-dir", "--config", "--out", "--device", "--dtype", "--attn-impl"):
        add(flag, required=True)
    add("--adapters", default="", help="comma-separated subset (default: all)")
    for flag in ("--warmup", "--repeat", "--seed"):
        add(flag, type=int, required=True)
    return parser


if __name__ == "__main__":
    child_main(run_mlora)
