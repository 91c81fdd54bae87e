"""Training configuration: JSON file <-> typed dataclasses, validated before anything loads.

Key names follow upstream m-LoRA so existing configs keep working. Every key is checked up front
and every problem is reported as one line that names the file, the adapter and the key; unknown
keys are rejected so that a typo (``learning_rate`` for ``lr``) cannot pass silently.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlora.config.adapter_names import adapter_name_problem, folder_clash, shown_names
from mlora.config.sweep import SweepConfig, parse_sweep
from mlora.config.upstream import translate_adapter, translate_top
from mlora.core.errors import ConfigError
from mlora.core.jsonfile import read_json_file

SCHEDULER_TYPES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
# The built-in multiple-choice tasks a ``task_name`` may name; ``mlora.data.tasks`` holds how each
# one is read (a test keeps the two in step).
CHOICE_TASK_NAMES = ("arc-e", "arc-c", "boolq", "obqa", "piqa", "siqa", "hellaswag", "winogrande")
# Data formats (``mlora.data.formats`` reads each; a test keeps the two in step) and training
# objectives with their keys and defaults (``mlora.training.objectives`` computes each).
DATA_FORMATS = ("alpaca", "messages", "prompt_completion", "text", "preference")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
OBJECTIVE_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {},
    "dpo": {"loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.0},
    "orpo": {"beta": 0.1},
    "simpo": {"beta": 2.0, "gamma": 0.5},
    "cpo": {"beta": 0.1, "label_smoothing": 0.0},
}
OBJECTIVES = tuple(OBJECTIVE_DEFAULTS)
OBJECTIVE_KEYS = ("loss_type", "beta", "label_smoothing", "gamma")
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
# Names users often write for our keys (from PEFT / transformers / other trainers).
KEY_ALIASES = {
    "learning_rate": "lr",
    "lora_r": "r",
    "rank": "r",
    "epochs": "num_epochs",
    "num_train_epochs": "num_epochs",
    "optimizer": "optim",
    "lr_scheduler_type": "scheduler_type",
    "max_seq_length": "cutoff_len",
    "train_data": "data",
}

Check = Callable[[Any], str | None]


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    """The LoRA output scale: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


def _key(default: Any, help: str, check: Check | None = None, **extra: Any) -> Any:
    """A config key: its default, its ``--help`` text and the check its value must pass."""
    meta = {"help": help, "check": check, **extra}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _required(help: str, check: Check) -> Any:
    return field(default=None, metadata={"help": help, "check": check, "required": True})


# --- value checks: each returns None when valid, else what the value must be ---------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def int_at_least(low: int) -> Check:
    return lambda v: None if _is_int(v) and v >= low else f"an integer >= {low}"


def positive_number(v: Any) -> str | None:
    return None if _is_num(v) and v > 0 else "a number > 0"


def non_negative_number(v: Any) -> str | None:
    return None if _is_num(v) and v >= 0 else "a number >= 0"


def fraction(v: Any) -> str | None:
    return None if _is_num(v) and 0 <= v < 1 else "a number in [0, 1)"


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def non_empty_string(v: Any) -> str | None:
    return None if isinstance(v, str) and v.strip() else "a non-empty string"


def optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else "one of " + ", ".join(repr(c) for c in choices)


REPORT_TO_CHOICES = ("tensorboard", "mlflow", "trackio", "wandb", "none")


def report_to_problem(v: Any) -> str | None:
    """What ``report_to`` (the key, or ``--report_to``'s names) must be, or None when valid."""
    names = "a list of " + ", ".join(repr(c) for c in REPORT_TO_CHOICES)
    if not isinstance(v, list) or not all(isinstance(n, str) for n in v):
        return names
    if any(n not in REPORT_TO_CHOICES for n in v):
        return names
    if "none" in v and len(v) > 1:
        return "'none' alone, or a list of trackers without it"
    return None


def _packing(v: Any) -> str | None:
    ok = v in ("auto", "stream", "bins") or isinstance(v, bool)
    return None if ok else "'auto', 'stream', 'bins', true or false"


def _adapter_name(v: Any) -> str | None:
    problem = adapter_name_problem(v)
    if problem is None:
        return None
    return f"a name usable as a folder name and a module key on every platform: {problem}"


def _target_modules(v: Any) -> str | None:
    if isinstance(v, list) and v and all(isinstance(m, str) and m for m in v):
        return None
    if isinstance(v, dict) and v and all(isinstance(b, bool) for b in v.values()):
        return None if any(v.values()) else "a mapping with at least one module set to true"
    return "a non-empty list of module names, or a {name: true|false} mapping"


def _name_list(v: Any) -> str | None:
    ok = isinstance(v, list) and v and all(isinstance(m, str) and m.strip() for m in v)
    return None if ok else "a non-empty list of non-empty strings"


def _act_fn(v: Any) -> str | None:
    from transformers.activations import ACT2FN

    if isinstance(v, str) and v in ACT2FN:
        return None
    return "an activation name of transformers.activations.ACT2FN (e.g. 'silu', 'gelu_new')"


EXPERT_LORA_KEYS: dict[str, Check] = {
    "r": int_at_least(1),
    "lora_alpha": positive_number,
    "lora_dropout": fraction,
    "use_rslora": boolean,
}


def _expert_lora(v: Any) -> str | None:
    if not isinstance(v, dict):
        return "an object with any of " + ", ".join(EXPERT_LORA_KEYS)
    for key, value in v.items():
        check = EXPERT_LORA_KEYS.get(key)
        if check is None:
            return "an object with any of " + ", ".join(EXPERT_LORA_KEYS) + f" (not {key!r})"
        problem = check(value)
        if problem:
            return f"an object whose {key!r} is {problem}"
    return None


def half_fraction(v: Any) -> str | None:
    return None if _is_num(v) and 0 <= v < 0.5 else "a number in [0, 0.5)"


def eval_steps_problem(v: Any) -> str | None:
    """``eval_steps``: an interval, or the steps themselves (e.g. a pruner's rungs)."""
    if _is_int(v) and v >= 1:
        return None
    steps = isinstance(v, list) and v and all(_is_int(s) and s >= 1 for s in v)
    if steps and all(a < b for a, b in itertools.pairwise(v)):
        return None
    return "an integer >= 1 or an increasing list of integers >= 1 (the steps to validate at)"


def _val_set_size(v: Any) -> str | None:
    if (_is_int(v) and v >= 1) or (isinstance(v, float) and 0 < v < 1):
        return None
    return "a row count >= 1 or a fraction in (0, 1)"


def probability(v: Any) -> str | None:
    return None if _is_num(v) and 0 < v <= 1 else "a number in (0, 1]"


# Mixture-of-experts strategies: the keys each one reads and their defaults (num_experts has
# none: it is required).
# A MoE key set for a strategy that does not read it is an error, not silently ignored.
_MIXLORA_COMMON = {
    "num_experts": None,
    "router_aux_loss_coef": 0.001,
    "router_loss": True,
    "act_fn": None,  # the model's MLP activation
    "expert_lora": None,  # the adapter's r, lora_alpha, lora_dropout
}
MOE_STRATEGY_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixlora": {
        **_MIXLORA_COMMON,
        "top_k": 2,
        "router_init_range": 0.02,
        "jitter_noise": 0.0,
    },
    "mixlora-dynamic": {
        **_MIXLORA_COMMON,
        "top_p": 0.8,
        "temperature": 0.0,
        "router_init_range": 0.02,
        "jitter_noise": 0.0,
    },
    "mixlora-switch": {
        **_MIXLORA_COMMON,
        "router_init_range": 1.0,
        "jitter_noise": 0.01,
        "router_z_loss_coef": 0.001,
        "expert_capacity": 32,
        "ffn_dropout": 0.0,
    },
    "loramoe": {  # dense routing: no load-balancing loss (none upstream either)
        "num_experts": None,
        "router_init_range": 5.0,
    },
    "mola": {
        "num_experts": None,
        "top_k": 2,
        "router_init_range": 5.0,
        "router_aux_loss_coef": 0.001,
        "router_loss": False,
    },
    "meteora": {  # a trained gate over existing LoRA adapters (mlora.adapters.meteora.spec)
        "adapters": None,
        "top_k": 2,
        "temperature": 1.0,
        "gate_target_modules": None,  # every module the adapters target
        "train_loras": False,
        "gate_loss_coef": 50.0,
        "task_field": None,
        "forward_mode": "grouped",
    },
}
# LoRA-shape keys a MeteoRA adapter takes from its embedded adapters, never from the config.
METEORA_FIXED_KEYS = ("r", "lora_alpha", "target_modules", "use_dora", "use_rslora", "lora_init")
MOE_KEYS = sorted({key for table in MOE_STRATEGY_DEFAULTS.values() for key in table})
MIXLORA_STRATEGIES = ("mixlora", "mixlora-dynamic", "mixlora-switch")
LINEAR_MOE_STRATEGIES = ("loramoe", "mola")


# --- the schema ------------------------------------------------------------------------------


@dataclass
class AdapterConfig:
    """One adapter: its data, its LoRA shape and its own optimisation hyperparameters."""

    name: str = _required("Adapter name; also its output folder DIR/NAME.", _adapter_name)
    data: str = _required(
        "Training data: a local .json/.jsonl/.csv/.parquet file, or a hub dataset name.",
        non_empty_string,
    )
    task_name: str = _key(
        "casual",
        "Task type: 'casual' (causal LM fine-tuning; evaluation: loss, perplexity, exact match) or "
        "a built-in multiple-choice evaluation task: " + ", ".join(CHOICE_TASK_NAMES) + ".",
        one_of("casual", *CHOICE_TASK_NAMES),
    )
    test_data: str | None = _key(
        None,
        "Evaluation data, same schema as data (a choice task: a local file of its schema; unset: "
        "a local data file, else the hub dataset).",
        optional(non_empty_string),
    )
    prompt: str = _key(
        "alpaca", "Prompt template: 'alpaca' or a template JSON file.", non_empty_string
    )
    r: int = _key(8, "LoRA rank.", int_at_least(1))
    lora_alpha: float = _key(
        16, "LoRA alpha; scale = alpha / r (alpha / sqrt(r) with rsLoRA).", positive_number
    )
    lora_dropout: float = _key(0.05, "Dropout on the adapter input (0 disables it).", fraction)
    target_modules: list[str] | dict[str, bool] = _key(
        list(DEFAULT_TARGET_MODULES),
        "Linear layers to adapt, by their last name component (q_proj, down_proj, ...).",
        _target_modules,
    )
    target_parameters: list[str] | None = _key(
        None,
        "Parameter tensors to adapt, PEFT's target_parameters (a MoE base's "
        "experts.gate_up_proj, experts.down_proj, router gate.weight); needs lora_dropout 0.",
        optional(_name_list),
    )
    use_dora: bool = _key(False, "DoRA: train a magnitude vector as well.", boolean)
    use_rslora: bool = _key(False, "rsLoRA: scale = alpha / sqrt(r).", boolean)
    loraplus_lr_ratio: float | None = _key(
        None,
        "LoRA+: learning rate of lora_B = lr * ratio (unset: same lr).",
        optional(positive_number),
    )
    lora_init: str = _key(
        "original",
        "lora_A init: 'original' (Kaiming uniform) or 'gaussian'.",
        one_of("original", "gaussian"),
    )
    batch_size: int = _key(16, "Rows per optimizer step.", int_at_least(1))
    micro_batch_size: int | None = _key(
        None,
        "Rows per forward pass (divides batch_size; unset: batch_size).",
        optional(int_at_least(1)),
    )
    evaluate_batch_size: int = _key(
        16,
        "Test rows (questions, for choice tasks) of this adapter per evaluation batch; other "
        "adapters' rows share the batch.",
        int_at_least(1),
    )
    num_epochs: int = _key(3, "Passes over the training data.", int_at_least(1))
    save_step: int | None = _key(
        None,
        "Write DIR/NAME/checkpoint-STEP every this many of this adapter's optimizer steps "
        "(unset: the run-wide save_step; 0: only on Ctrl-C / SIGTERM).",
        optional(int_at_least(0)),
    )
    optim: str = _key("adamw", "Optimizer: 'adamw' or 'sgd'.", one_of("adamw", "sgd"))
    lr: float = _key(3e-4, "Learning rate.", positive_number)
    momentum: float = _key(0.0, "SGD momentum.", non_negative_number)
    weight_decay: float = _key(0.0, "Weight decay.", non_negative_number)
    scheduler_type: str = _key(
        "constant",
        "A transformers get_scheduler name that needs no extra arguments.",
        one_of(*SCHEDULER_TYPES),
    )
    warmup_ratio: float = _key(0.0, "Warm-up as a fraction of this adapter's steps.", fraction)
    warmup_steps: int = _key(
        0, "Warm-up steps; when > 0 it takes precedence over warmup_ratio.", int_at_least(0)
    )
    val_data: str | None = _key(
        None,
        "Validation data, same formats as data: its loss is computed while training (see "
        "eval_steps).",
        optional(non_empty_string),
    )
    val_set_size: int | float | None = _key(
        None,
        "Hold this many rows (an integer) or this fraction of data (0 < f < 1) out of training "
        "as validation data, chosen from the seed.",
        optional(_val_set_size),
    )
    eval_steps: int | list[int] | None = _key(
        None,
        "Validation loss every this many of this adapter's optimizer steps, or at the steps of "
        "an increasing list (e.g. a pruner's rungs [2, 6, 18]); and at its end (unset: at its "
        "end only).",
        optional(eval_steps_problem),
    )
    early_stopping_patience: int | None = _key(
        None,
        "Stop after this many validations in a row without an improvement of the validation "
        "loss (HF EarlyStoppingCallback's meaning).",
        optional(int_at_least(1)),
    )
    early_stopping_threshold: float = _key(
        0.0,
        "An improvement counts only when the loss drops below the best by more than this.",
        non_negative_number,
    )
    save_best: bool = _key(
        False,
        "DIR/NAME holds the weights of the best validation loss (best_step, best_val_loss in "
        "DIR/NAME/validation.json).",
        boolean,
    )
    group_by_length: bool = _key(False, "Order rows by length to cut padding.", boolean)
    shuffle: bool = _key(
        True, "Shuffle rows each epoch (seeded by --seed); false keeps file order.", boolean
    )
    train_on_inputs: bool = _key(
        False, "Also train on the prompt tokens (default: output only).", boolean
    )
    data_format: str = _key(
        "auto",
        "Shape of the data rows: 'alpaca' (instruction/input/output), 'messages' (chat turns, "
        "rendered by the tokenizer's chat template), 'prompt_completion', 'text', 'preference' "
        "(prompt/chosen/rejected); 'auto' tells them apart by the first row's fields.",
        one_of("auto", *DATA_FORMATS),
    )
    objective: str = _key(
        "sft",
        "Training objective: 'sft' (next-token cross-entropy), or on preference rows 'dpo', "
        "'orpo', 'simpo', 'cpo'.",
        one_of(*OBJECTIVES),
    )
    loss_type: str | None = _key(
        None, "dpo: 'sigmoid' (default), 'ipo' or 'hinge'.", optional(one_of(*DPO_LOSS_TYPES))
    )
    beta: float | None = _key(
        None,
        "dpo, orpo, simpo, cpo: the preference temperature (defaults: dpo 0.1, orpo 0.1, "
        "simpo 2.0, cpo 0.1).",
        optional(positive_number),
    )
    label_smoothing: float | None = _key(
        None,
        "dpo (sigmoid), cpo: probability that a preference label is flipped (conservative DPO; "
        "default 0).",
        optional(half_fraction),
    )
    gamma: float | None = _key(
        None, "simpo: the target reward margin (default 0.5).", optional(non_negative_number)
    )
    max_grad_norm: float | None = _key(
        None,
        "Clip this adapter's gradient to this global norm over its own parameters before each "
        "optimizer step (unset: no clipping).",
        optional(positive_number),
    )
    max_steps: int | None = _key(
        None,
        "Stop this adapter after this many optimizer steps (unset: num_epochs decides; the "
        "learning-rate schedule spans the steps it trains).",
        optional(int_at_least(1)),
    )
    routing_strategy: str | None = _key(
        None,
        "Mixture of LoRA experts: 'mixlora' (FFN experts, top-k), 'mixlora-dynamic' (top-p), "
        "'mixlora-switch' (top-1 with capacity), 'loramoe' (dense, per linear), 'mola' (top-k, "
        "per linear), 'meteora' (a trained gate over existing LoRA adapters); unset: plain LoRA.",
        optional(one_of(*MOE_STRATEGY_DEFAULTS)),
    )
    num_experts: int | None = _key(
        None, "MoE: number of LoRA experts (required with routing_strategy).",
        optional(int_at_least(1)),
    )  # fmt: skip
    top_k: int | None = _key(
        None, "mixlora, mola, meteora: experts (meteora: adapters) per token (default 2, at most "
        "num_experts or the number of adapters).",
        optional(int_at_least(1)),
    )  # fmt: skip
    top_p: float | None = _key(
        None, "mixlora-dynamic: keep the fewest experts whose probabilities sum past this "
        "(default 0.8).", optional(probability),
    )  # fmt: skip
    temperature: float | None = _key(
        None, "mixlora-dynamic: router softmax temperature (default 0: none); meteora: the "
        "gate's, > 0 (default 1).",
        optional(non_negative_number),
    )  # fmt: skip
    router_init_range: float | None = _key(
        None, "MoE: std of the router's normal init (default 0.02; switch 1.0); loramoe/mola: "
        "kaiming_uniform_(a=sqrt(range)) as upstream (default 5.0).",
        optional(non_negative_number),
    )  # fmt: skip
    router_aux_loss_coef: float | None = _key(
        None, "MoE: weight of the load-balancing loss over real tokens (default 0.001).",
        optional(non_negative_number),
    )  # fmt: skip
    router_z_loss_coef: float | None = _key(
        None, "mixlora-switch: weight of the router z-loss (default 0.001).",
        optional(non_negative_number),
    )  # fmt: skip
    router_loss: bool | None = _key(
        None, "MoE: add the router losses to the adapter's loss (default true; mola false; "
        "loramoe has none).", optional(boolean),
    )  # fmt: skip
    jitter_noise: float | None = _key(
        None, "mixlora*: multiplicative router-input noise in training (default 0; switch 0.01).",
        optional(fraction),
    )  # fmt: skip
    expert_capacity: int | None = _key(
        None, "mixlora-switch: tokens per expert per row in training; overflow tokens take the "
        "frozen FFN (default 32).", optional(int_at_least(1)),
    )  # fmt: skip
    ffn_dropout: float | None = _key(
        None, "mixlora-switch: dropout on the experts' output in training (default 0).",
        optional(fraction),
    )  # fmt: skip
    act_fn: str | None = _key(
        None, "mixlora*: experts' activation (default: the model's MLP activation).",
        optional(_act_fn),
    )  # fmt: skip
    expert_lora: dict[str, Any] | None = _key(
        None, "mixlora*: the experts' own {r, lora_alpha, lora_dropout, use_rslora} (default: "
        "the adapter's).",
        optional(_expert_lora),
    )  # fmt: skip

    adapters: list[str] | None = _key(
        None, "meteora: the LoRA adapter folders (PEFT format) to embed; the task label of "
        "each is its folder's base name (required).", optional(_name_list),
    )  # fmt: skip
    gate_target_modules: list[str] | None = _key(
        None, "meteora: linear layers that get a gate (default: every module the adapters "
        "target).", optional(_name_list),
    )  # fmt: skip
    train_loras: bool | None = _key(
        None, "meteora: train the embedded LoRAs too (default false: only the gates).",
        optional(boolean),
    )  # fmt: skip
    gate_loss_coef: float | None = _key(
        None, "meteora: weight of the gate's cross-entropy against the row's task label, "
        "averaged over gated layers (default 50).", optional(non_negative_number),
    )  # fmt: skip
    task_field: str | None = _key(
        None, "meteora: the data field naming each row's adapter (its folder's base name); "
        "unset: no gate loss.", optional(non_empty_string),
    )  # fmt: skip
    forward_mode: str | None = _key(
        None, "meteora: 'grouped' (all adapters in two stacked matmuls, default) or 'loop' "
        "(one adapter at a time: the reference).", optional(one_of("grouped", "loop")),
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.micro_batch_size is None:
            self.micro_batch_size = self.batch_size

    @property
    def scaling(self) -> float:
        """The LoRA output scale: alpha / r, or alpha / sqrt(r) for rsLoRA."""
        return lora_scaling(self.lora_alpha, self.r, self.use_rslora)

    def lora_fields(self) -> dict[str, Any]:
        """The LoRA keyword arguments the MoE spec builders take, as configured."""
        return {
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": tuple(self.target_module_names),
            "init": self.lora_init,
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora,
        }

    def checkpoint_every(self, run_wide: int) -> int:
        """This adapter's checkpoint interval in optimizer steps (0: none scheduled)."""
        return run_wide if self.save_step is None else self.save_step

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches whose gradients make one optimizer step."""
        if self.micro_batch_size is None:  # parse_config fills it: a config built elsewhere
            raise ValueError(f"adapter {self.name!r}: micro_batch_size is unset (not validated)")
        return self.batch_size // self.micro_batch_size

    def objective_value(self, key: str) -> Any:
        """An objective key's value: the one set, else its objective's default."""
        value = getattr(self, key)
        return OBJECTIVE_DEFAULTS[self.objective].get(key) if value is None else value

    def moe(self, key: str) -> Any:
        """A MoE key's value: the one set, else its routing_strategy's default."""
        if self.routing_strategy is None:
            raise ValueError(f"adapter {self.name!r} is no MoE adapter: it has no {key!r}")
        value = getattr(self, key)
        return MOE_STRATEGY_DEFAULTS[self.routing_strategy][key] if value is None else value

    @property
    def target_module_names(self) -> list[str]:
        if isinstance(self.target_modules, dict):
            return [name for name, on in self.target_modules.items() if on]
        return list(self.target_modules)


@dataclass
class TrainConfig:
    """A whole run: shared settings plus the list of adapters trained together."""

    lora: list[AdapterConfig] = _required("The adapters, one object each.", lambda v: None)
    cutoff_len: int = _key(256, "Maximum tokens per row (prompt + output + EOS).", int_at_least(2))
    save_step: int = _key(
        0,
        "Write each adapter's DIR/NAME/checkpoint-STEP every this many of its optimizer steps "
        "(0: only on Ctrl-C / SIGTERM); an adapter's own save_step overrides it.",
        int_at_least(0),
    )
    save_total_limit: int = _key(
        2, "Checkpoints kept per adapter (older ones are deleted).", int_at_least(1)
    )
    train_lora_candidate_num: int | None = _key(
        None, "Adapters held in training at once (unset: all).", optional(int_at_least(1))
    )
    train_lora_simultaneously_num: int | None = _key(
        None, "Adapters that share one step (unset: all candidates).", optional(int_at_least(1))
    )
    train_strategy: str = _key(
        "optim",
        "'optim' groups adapters whose next rows have similar lengths; 'none' takes them in order.",
        one_of("optim", "none"),
    )
    log_step: int = _key(
        10, "Print per-adapter loss, lr and tokens/s every this many steps.", int_at_least(1)
    )
    gradient_checkpoint: str = _key(
        "auto",
        "Per-decoder-layer activation checkpointing: 'none', 'recompute' (re-run each layer in "
        "backward), 'offload' (park saved activations in host memory); 'auto' is recompute on a "
        "GPU (CUDA/MPS) and none on CPU.",
        one_of("auto", "none", "recompute", "offload"),
    )
    loss_chunk_mb: float = _key(
        64,  # mlora.ops.linear_cross_entropy.DEFAULT_CHUNK_MB (this module imports no torch)
        "MiB of fp32 logits the loss holds at once: lm_head and cross-entropy run over row "
        "chunks of this size and backward recomputes each chunk's logits, so the full "
        "(tokens x vocab) logits never exist; 0 computes the full logits.",
        lambda v: None if _is_num(v) and v >= 0 else "a number >= 0",
    )
    pass_tokens: int | str = _key(
        "auto",
        "Most tokens one forward pass holds: a step whose adapters' micro-batches hold more "
        "runs as several passes of whole micro-batches, a backward after each, so only one "
        "pass's activations are kept at a time (each adapter's gradients are the same); 0: one "
        "pass per step (fastest); 'auto': 1536 on CPU, 0 on a GPU.",
        lambda v: None if v == "auto" or (_is_int(v) and v >= 0) else "'auto' or an integer >= 0",
    )
    packing: str | bool = _key(
        "auto",
        "Pack each step's rows instead of padding them: 'stream' lays them end to end in one "
        "sequence with no padding and attends per row (sdpa models), 'bins' fills rows as long "
        "as the step's longest row (position ids restart per row, no attention mask); true "
        "packs as a stream where the model allows it, else in bins; 'auto' does the same where "
        "a one-time probe finds the model keeps packed rows apart, else pads (and logs why); "
        "false pads.",
        _packing,
    )
    data_cache: bool = _key(
        True,
        "Cache each adapter's tokenized rows in $MLORA_HOME/tokenized, keyed by the data "
        "file's content, the tokenizer and the settings that shape the rows; false reads and "
        "tokenizes the data every run and writes nothing there.",
        boolean,
    )
    evaluate_result: str | None = _key(
        None,
        "Where evaluation writes its JSON (default DIR/evaluate_result.json).",
        optional(non_empty_string),
    )
    report_to: list[str] = _key(
        [],
        "Trackers that also receive the metrics (DIR/metrics.jsonl is always written): any of "
        "'tensorboard', 'mlflow', 'trackio', 'wandb', or 'none'; --report_to overrides it.",
        lambda v: report_to_problem(v),
    )
    sweep: SweepConfig | None = field(default=None, metadata={"internal": True})
    source: str = field(default="<config>", metadata={"internal": True})
    notes: list[str] = field(default_factory=list, metadata={"internal": True})

    def adapter(self, name: str) -> AdapterConfig:
        for adapter in self.lora:
            if adapter.name == name:
                return adapter
        raise ConfigError(f"{self.source}: no adapter named {name!r}")


# --- parsing ---------------------------------------------------------------------------------


def _user_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def _build(cls: type, raw: Any, where: str) -> Any:
    """Validate one JSON object against a dataclass schema and build it."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a JSON object")
    fields = {f.name: f for f in _user_fields(cls)}
    for key in raw:
        if key not in fields:
            hint = (
                [KEY_ALIASES[key]]
                if key in KEY_ALIASES
                else difflib.get_close_matches(key, fields, n=1)
            )
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{where}: unknown key {key!r}{suggestion}")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            if f.metadata.get("required"):
                raise ConfigError(f"{where}: missing required key {name!r}")
            continue
        value = raw[name]
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and f.type in ("float", "float | None")
        ):
            value = float(value)
        check = f.metadata.get("check")
        problem = check(value) if check else None
        if problem:
            raise ConfigError(f"{where}: key {name!r} must be {problem}, got {json.dumps(value)}")
        values[name] = value
    return cls(**values)


def _check_adapter(adapter: AdapterConfig, where: str, keys: set[str]) -> None:
    if adapter.batch_size % adapter.micro_batch_size:  # type: ignore[operator]
        raise ConfigError(
            f"{where}: key 'micro_batch_size' ({adapter.micro_batch_size}) must divide "
            f"'batch_size' ({adapter.batch_size})"
        )
    _check_validation(adapter, where)
    _check_moe(adapter, where)
    _check_objective(adapter, where)
    if adapter.target_parameters:
        _check_target_parameters(adapter, where)
    if adapter.routing_strategy == "meteora":
        _check_meteora(adapter, where, keys)


def _check_objective(adapter: AdapterConfig, where: str) -> None:
    """Objective keys only with an objective that reads them; preference objectives only on
    preference data (when data_format says so; detected formats are checked with the data)."""
    table = OBJECTIVE_DEFAULTS[adapter.objective]
    for key in OBJECTIVE_KEYS:
        if getattr(adapter, key) is not None and key not in table:
            readers = [o for o, t in OBJECTIVE_DEFAULTS.items() if key in t]
            raise ConfigError(
                f"{where}: key {key!r} does not apply to objective {adapter.objective!r} "
                f"(only to {', '.join(repr(o) for o in readers)})"
            )
    if adapter.label_smoothing and adapter.objective_value("loss_type") not in (None, "sigmoid"):
        raise ConfigError(
            f"{where}: key 'label_smoothing' applies to loss_type 'sigmoid' only "
            f"(not {adapter.loss_type!r})"
        )
    if adapter.data_format != "auto":
        preference = adapter.data_format == "preference"
        if preference != (adapter.objective != "sft"):
            raise ConfigError(f"{where}: {objective_data_problem(adapter.objective)}")
    if adapter.objective != "sft" and adapter.routing_strategy is not None:
        raise ConfigError(
            f"{where}: key 'objective' {adapter.objective!r} trains plain LoRA adapters only "
            "(not with routing_strategy)"
        )


def objective_data_problem(objective: str) -> str:
    """Why ``objective`` does not fit the data format it was given."""
    if objective == "sft":
        return (
            "preference rows (prompt/chosen/rejected) need key 'objective' set to one of "
            + ", ".join(repr(o) for o in OBJECTIVES if o != "sft")
        )
    return f"key 'objective' {objective!r} needs preference rows (prompt, chosen, rejected)"


def _check_validation(adapter: AdapterConfig, where: str) -> None:
    """Validation keys: one source of validation rows; the keys that use it need one."""
    if adapter.val_data is not None and adapter.val_set_size is not None:
        raise ConfigError(f"{where}: keys 'val_data' and 'val_set_size' exclude each other")
    if adapter.val_data is not None or adapter.val_set_size is not None:
        return
    for key, value in (
        ("eval_steps", adapter.eval_steps),
        ("early_stopping_patience", adapter.early_stopping_patience),
        ("save_best", adapter.save_best or None),
    ):
        if value is not None:
            raise ConfigError(f"{where}: key {key!r} needs 'val_data' or 'val_set_size'")


def _check_target_parameters(adapter: AdapterConfig, where: str) -> None:
    """A parameter LoRA is PEFT's weight delta: no dropout, no DoRA, plain LoRA only."""
    if adapter.routing_strategy is not None:
        raise ConfigError(
            f"{where}: key 'target_parameters' applies to plain LoRA, not routing_strategy "
            f"{adapter.routing_strategy!r}"
        )
    for key, off in (("lora_dropout", 0), ("use_dora", False)):
        if getattr(adapter, key) != off:
            raise ConfigError(
                f"{where}: key {key!r} must be {json.dumps(off)} with 'target_parameters' (PEFT "
                "applies a parameter LoRA to the weight, where input dropout and DoRA cannot "
                "act, and refuses both)"
            )


def _check_meteora(adapter: AdapterConfig, where: str, keys: set[str]) -> None:
    """MeteoRA: the LoRA shape comes from the adapters; top_k and temperature fit them."""
    fixed = [key for key in METEORA_FIXED_KEYS if key in keys]
    if fixed:
        raise ConfigError(
            f"{where}: key {fixed[0]!r} does not apply to routing_strategy 'meteora' (it comes "
            "from the embedded adapters)"
        )
    count = len(adapter.moe("adapters"))
    if adapter.top_k is not None and adapter.top_k > count:  # unset: 2, or 1 with one adapter
        raise ConfigError(
            f"{where}: key 'top_k' ({adapter.top_k}) must be <= the number of 'adapters' ({count})"
        )
    if adapter.moe("temperature") <= 0:
        raise ConfigError(f"{where}: key 'temperature' must be > 0 for routing_strategy 'meteora'")


def _check_moe(adapter: AdapterConfig, where: str) -> None:
    """MoE keys: only with a routing_strategy that reads them, num_experts set, top_k fits."""
    strategy = adapter.routing_strategy
    used = [key for key in MOE_KEYS if getattr(adapter, key) is not None]
    if strategy is None:
        if used:
            raise ConfigError(
                f"{where}: key {used[0]!r} needs 'routing_strategy' (one of "
                + ", ".join(repr(s) for s in MOE_STRATEGY_DEFAULTS)
                + ")"
            )
        return
    table = MOE_STRATEGY_DEFAULTS[strategy]
    for key in used:
        if key not in table:
            readers = [s for s, t in MOE_STRATEGY_DEFAULTS.items() if key in t]
            raise ConfigError(
                f"{where}: key {key!r} does not apply to routing_strategy {strategy!r} "
                f"(only to {', '.join(repr(s) for s in readers)})"
            )
    for key in ("num_experts", "adapters"):
        if key in table and getattr(adapter, key) is None:
            raise ConfigError(
                f"{where}: key {key!r} is required with routing_strategy {strategy!r}"
            )
    if "num_experts" in table and "top_k" in table and adapter.moe("top_k") > adapter.num_experts:
        raise ConfigError(
            f"{where}: key 'top_k' ({adapter.moe('top_k')}) must be <= 'num_experts' "
            f"({adapter.num_experts})"
        )


def parse_config(raw: Any, source: str = "<config>") -> TrainConfig:
    """Build and validate a TrainConfig from parsed JSON.

    Raises:
        ConfigError: one line naming ``source``, the adapter and the key at fault.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a JSON object")
    if "sweep" in raw:
        return _parse_sweep_config(raw, source)
    adapters_raw = raw.get("lora")
    if not isinstance(adapters_raw, list) or not adapters_raw:
        raise ConfigError(f"{source}: key 'lora' must be a non-empty list of adapters")
    raw, notes = translate_top(raw, source)  # upstream m-LoRA keys, as written there
    adapters_raw = raw["lora"]
    adapters = []
    seen: set[str] = set()
    folders: dict[str, str] = {}  # folder_key -> name
    for index, item in enumerate(adapters_raw):
        label = item.get("name") if isinstance(item, dict) else None
        where = (
            f"{source}: adapter {label!r}" if isinstance(label, str) else f"{source}: lora[{index}]"
        )
        if isinstance(item, dict):
            item, adapter_notes = translate_adapter(item, where, source)
            notes += [n for n in adapter_notes if n not in notes]
        adapter = _build(AdapterConfig, item, where)
        _check_adapter(adapter, where, set(item))
        if adapter.name in seen:
            raise ConfigError(f"{source}: duplicate adapter name {adapter.name!r}")
        seen.add(adapter.name)
        clash = folder_clash(adapter.name, folders)
        if clash is not None:
            first, second = shown_names(clash, adapter.name)
            raise ConfigError(
                f"{source}: adapter names {first} and {second} would be one folder on a "
                "case-insensitive or normalizing file system (macOS, Windows): they differ only "
                "in case or Unicode normalization; rename one"
            )
        adapters.append(adapter)
    top = _build(TrainConfig, {**raw, "lora": []}, source)
    top.lora = adapters
    top.source = source
    top.notes = notes
    return top


def build_adapter(raw: dict[str, Any], where: str) -> AdapterConfig:
    """Validate one adapter entry (its keys and their combinations) and build it.

    Raises:
        ConfigError: one line naming ``where`` and the key.
    """
    adapter = _build(AdapterConfig, raw, where)
    _check_adapter(adapter, where, set(raw))
    return adapter


def _parse_sweep_config(raw: dict[str, Any], source: str) -> TrainConfig:
    """A config with a ``sweep`` block (``mlora.config.sweep``) and no ``lora`` list."""
    if raw.get("lora"):
        raise ConfigError(f"{source}: keys 'sweep' and 'lora' exclude each other (a sweep's "
                          "adapters are its trials)")  # fmt: skip
    checks = {f.name: f.metadata["check"] for f in _user_fields(AdapterConfig)}
    sweep = parse_sweep(raw["sweep"], source, checks, build_adapter)
    top = _build(TrainConfig, {k: v for k, v in raw.items() if k != "sweep"} | {"lora": []}, source)
    top.lora, top.source, top.sweep = [], source, sweep
    return top


def read_config_json(path: str | Path) -> Any:
    """The parsed JSON of a config file, not yet validated: for callers that need the raw
    keys as well as the check (``launch.py`` templates), so the file is read only once.

    Raises:
        ConfigError: missing or unreadable file, invalid JSON (with line and column), a key
            repeated in one object, or a YAML file.
    """
    return read_json_file(path, "config files")


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a JSON config file.

    Raises:
        ConfigError: missing file, invalid JSON (with line and column), or an invalid key.
    """
    return parse_config(read_config_json(path), source=str(Path(path)))


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The JSON form of a config (what ``load_config`` reads back)."""
    top = {f.name: getattr(config, f.name) for f in _user_fields(TrainConfig) if f.name != "lora"}
    top["lora"] = [
        {f.name: getattr(a, f.name) for f in _user_fields(AdapterConfig)} for a in config.lora
    ]
    if config.sweep is not None:
        top["sweep"] = config.sweep.raw
    return top


def describe_keys(cls: type) -> list[tuple[str, Any, str]]:
    """(key, default, help) for each user key of a schema: the source of README's reference."""
    rows = []
    for f in _user_fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append(
            (f.name, "(required)" if f.metadata.get("required") else default, f.metadata["help"])
        )
    return rows
