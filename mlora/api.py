"""The library entry points behind ``mlora.py`` and notebooks: load a model, train a config."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from mlora.config.schema import TrainConfig, config_to_dict, load_config, report_to_problem
from mlora.core.atomic import output_lock
from mlora.core.errors import MloraError
from mlora.core.hub import before_loading
from mlora.core.interrupt import GracefulStop
from mlora.core.stderr_log import CurrentStderrHandler
from mlora.data.rows import TokenizedRow
from mlora.model.base_model import resolve_base_model
from mlora.model.loading import empty_base_model, plan_base_load
from mlora.model.multi_lora import MultiLoraModel
from mlora.training.checkpoints import (
    clear_run_state,
    drop_newer_files,
    find_resume_point,
    interrupted_run,
    read_run_state,
)
from mlora.training.distributed import (
    AgreedError,
    check_world_size,
    env_rank,
    env_world_size,
    fingerprint,
    load_sharded_base,
    process_group,
)
from mlora.training.metrics.plots import PlotSink
from mlora.training.metrics.sinks import MetricsFileSink
from mlora.training.metrics.trackers import check_trackers, open_trackers
from mlora.training.preflight import check_adapter_paths, check_seed, preflight
from mlora.training.run_records import RunIdentity
from mlora.training.trainer import Trainer, prepare_data
from mlora.training.validation import prepare_validation

logger = logging.getLogger("mlora")


def check_outputs(
    config: TrainConfig, output_dir: Path, overwrite: bool, load_adapter: bool
) -> None:
    """Refuse to replace an existing ``DIR/NAME`` unless asked (``--overwrite``/``--load_adapter``).

    Raises:
        MloraError: naming the first adapter folder that would be overwritten.
    """
    if overwrite or load_adapter:
        return
    for adapter in config.lora:
        folder = output_dir / adapter.name
        if folder.exists() and any(folder.iterdir()):
            hint = (
                " (or --resume to continue it)"
                if interrupted_run(output_dir, [a.name for a in config.lora])
                else ""
            )
            raise MloraError(f"{folder} already exists; pass --overwrite to replace it{hint}")


@contextmanager
def log_to_stderr_unless_configured(enabled: bool) -> Iterator[None]:
    """mlora's INFO lines (loss, lr, saves) on stderr for one call when nothing configured
    logging (a notebook or script; transformers' Trainer prints there too); a program that
    configured logging itself keeps its own setup."""
    if not enabled or logger.hasHandlers():
        yield
        return
    handler = CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def train(
    config: TrainConfig | str | Path,
    base_model: str,
    output_dir: str | Path = ".",
    seed: int = 42,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    load_adapter: bool = False,
    overwrite: bool = False,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    resume: bool = False,
    quantize: str | None = None,
    tf32: bool = False,
    log: bool = True,
    dist_backend: str | None = None,
    fsdp: bool = False,
    report_to: Sequence[str] | None = None,
) -> Trainer:
    """Train every adapter of ``config`` together on ``base_model``, saving to ``output_dir/NAME``.

    Args:
        config: a TrainConfig or the path of a JSON config.
        base_model: a local model directory, a hub id, a GGUF file (converted once, see
            ``mlora.model.base_model``) or ``"smollm2"``; recorded as given in each
            adapter_config.json.
        dtype: the frozen base's compute dtype; adapters are kept and updated in fp32 anyway.
        device: ``cpu``, ``cuda``, ``cuda:1``, ``mps``; ``None`` reads ``MLORA_BACKEND_TYPE``,
            else picks CUDA, then MPS, then CPU.
        attn_implementation: ``eager``, ``sdpa`` or ``flash_attn`` (``None``: flash-attn on
            CUDA in fp16/bf16 when installed, else sdpa; unusable flash-attn warns and uses sdpa).
        quantize: ``"4bit"`` (NF4, QLoRA) or ``"8bit"`` base through bitsandbytes (CUDA only).
        tf32: allow TF32 matmuls (CUDA).
        load_adapter: continue each adapter from ``output_dir/NAME`` (ours or any PEFT LoRA).
        overwrite: allow replacing existing ``output_dir/NAME`` folders.
        resume: continue from the newest complete checkpoint in ``output_dir`` (exactly: the
            result equals an uninterrupted run); finished adapters stay finished.
        log: when logging is not configured (a notebook), print mlora's progress lines to
            stderr for this call; False prints only warnings. Configured logging is kept.
        dist_backend: ``nccl`` or ``gloo`` when started by ``torchrun`` / ``accelerate launch``
            with several processes (default: nccl on CUDA, gloo on CPU); each process then
            trains on its share of every micro-batch and rank 0 writes (README "Distributed
            training").
        fsdp: with several processes, shard the frozen base over them with FSDP2 (each rank
            keeps 1/N of its weights between layers); adapters stay whole on every rank.
        report_to: trackers that also get the metrics (``tensorboard``, ``mlflow``,
            ``trackio``, ``wandb``, or ``none``); None: the config's ``report_to``. Every run
            writes ``output_dir/metrics.jsonl`` and, with matplotlib, ``output_dir/plots``.

    Returns:
        The finished Trainer (``trainer.model`` holds the trained adapters).

    Raises:
        MloraError: invalid config, data, paths or model (one line each).
    """
    with log_to_stderr_unless_configured(log):
        return _train(
            config, base_model, Path(output_dir), seed=seed, dtype=dtype, device=device,
            load_adapter=load_adapter, overwrite=overwrite,
            attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
            resume=resume, quantize=quantize, tf32=tf32, dist_backend=dist_backend, fsdp=fsdp,
            report_to=report_to,
        )  # fmt: skip


def _train(
    config: TrainConfig | str | Path,
    base_model: str,
    output_dir: Path,
    *,
    seed: int,
    dtype: torch.dtype,
    device: str | torch.device | None,
    load_adapter: bool,
    overwrite: bool,
    attn_implementation: str | None,
    trust_remote_code: bool,
    resume: bool,
    quantize: str | None,
    tf32: bool,
    dist_backend: str | None,
    fsdp: bool,
    report_to: Sequence[str] | None,
) -> Trainer:
    """``train`` with its logging settled (same arguments)."""
    if fsdp and quantize:  # before the plan's CUDA check: every rank stops, rank 0 prints
        raise AgreedError(
            f"--fsdp shards plain base weights, not a {quantize} quantized base "
            f"(--load_{quantize}): drop one of the two",
            env_rank(),
        )
    plan = plan_base_load(device, dtype, quantize, attn_implementation)  # before any device use
    backend = plan.backend
    if not isinstance(config, TrainConfig):
        config = load_config(config)
    for note in config.notes:  # upstream m-LoRA keys read with a different meaning or none
        logger.info(note)
    trackers = tracker_names(config, report_to)
    check_seed(seed)
    if tf32:
        backend.allow_tf32(True)
    check_world_size(config, env_world_size())  # before joining the group: fails in a second
    if fsdp and env_world_size() <= 1:
        raise MloraError(
            "--fsdp shards the base over several processes: start mlora.py with torchrun "
            "--nproc_per_node N (N > 1)"
        )
    with (
        GracefulStop() as stop,  # a signal before the first step or after the last is kept too
        process_group(backend.device, dist_backend) as dist,
        ExitStack() as lock,
    ):
        identity = RunIdentity(config, seed, base_model)  # names this run's records
        point, error = None, None
        try:
            if dist.is_main:  # before the checks: two runs must not both pass them
                lock.enter_context(output_lock(output_dir))
            check_adapter_paths(config, output_dir)
            point = find_resume_point(output_dir, identity) if resume else None
            if point is not None:
                load_adapter = load_adapter or bool(point.manifest.get("load_adapter"))
            else:
                check_outputs(config, output_dir, overwrite, load_adapter)
            model_path = resolve_base_model(base_model)  # a GGUF file: its converted folder
            before_loading(model_path, "base model")  # the preflight reads a hub id's config
            preflight(config, model_path, output_dir, trust_remote_code, load_adapter)
            backend.manual_seed(seed)
            tokenizer = plan.load_tokenizer(model_path, trust_remote_code)
            data = prepare_data(config, tokenizer, seed)  # before the model: fail fast on bad data
            validation = prepare_validation(config, tokenizer, seed)
        except MloraError as exc:
            if not dist.enabled:
                raise
            error = exc
        run = {"seed": seed, "base model": base_model, "dtype": str(dtype), "resume": resume}
        dist.agree_to_start(
            {} if error else _fingerprint(config, run, data, load_adapter, overwrite), error
        )
        init_from = {a.name: output_dir / a.name for a in config.lora} if load_adapter else None
        if fsdp and not dist.is_main:  # no base weights here: rank 0 sends this rank's shards
            attention = plan.options["attn_implementation"]
            hf_model = empty_base_model(model_path, dtype, attention, trust_remote_code)
        else:  # under --fsdp rank 0 reads the whole base into host memory, not the device
            device = torch.device("cpu") if fsdp else None
            hf_model, _ = plan.load(model_path, trust_remote_code, tokenizer, device=device)
        if fsdp:  # before the adapters: they are created whole on the sharded base
            sharded = load_sharded_base(hf_model, dist)
            logger.info(
                "fsdp: the frozen base is sharded over %d ranks (%d modules); rank 0 read "
                "%.1f MiB, each rank keeps about 1/%d",
                dist.world_size,
                sharded.units,
                sharded.full_bytes / 2**20,
                dist.world_size,
            )
        trainer = Trainer(
            MultiLoraModel(hf_model),
            tokenizer,
            config,
            data,
            output_dir,
            seed,
            base_model,
            init_from,
            dist,
            validation_rows=validation,
        )
        if point is not None:
            trainer.load_state_dict(
                read_run_state(point, output_dir, identity, dist.rank, dist.world_size)
            )
            if dist.is_main:
                drop_newer_files(output_dir, point, identity)
        elif dist.is_main:
            clear_run_state(output_dir, identity)  # stale records of this run, if any
        if dist.is_main:  # the file first: it is the record the others may be checked against
            for sink in [MetricsFileSink(), *open_trackers(trackers), PlotSink()]:
                trainer.row_sinks.add(sink)
        dist.barrier()  # every rank has read the checkpoint before rank 0 writes again
        trainer.train()
        if stop.signal_name:  # it came as the last files were written: nothing is left to do
            logger.warning("%s received as the run ended: every adapter is saved", stop.signal_name)
        return trainer


def tracker_names(config: TrainConfig, report_to: Sequence[str] | None) -> list[str]:
    """The trackers of a run: ``report_to`` when given, else the config's key; checked, and
    their packages found, before anything loads.

    Raises:
        MloraError: an unknown name, or a tracker whose package is not installed (naming the
            extra that installs it).
    """
    names = list(config.report_to if report_to is None else report_to)
    problem = report_to_problem(names)
    if problem is not None:
        raise MloraError(f"--report_to must be {problem}, got {' '.join(names)}")
    trackers = [name for name in names if name != "none"]
    check_trackers(trackers)
    return trackers


def _fingerprint(
    config: TrainConfig,
    run: dict,
    data: dict[str, list[TokenizedRow]],
    load_adapter: bool,
    overwrite: bool,
) -> dict[str, str]:
    """What every rank of a data-parallel run must agree on, hashed (see ``agree_to_start``)."""
    tokens = {}
    for name, rows in data.items():
        digest = hashlib.sha256()
        for row in rows:
            digest.update(repr((row.input_ids, row.labels)).encode())
        tokens[f"data of adapter {name!r}"] = digest.hexdigest()
    flags = {"--load_adapter": load_adapter, "--overwrite": overwrite}
    return fingerprint(config=config_to_dict(config), **run, flags=flags, **tokens)
