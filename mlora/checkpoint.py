"""Resumable checkpoints: per-adapter folders tied together by run-level cuts.

Adapters share steps, so an exact resume needs every adapter's state *at the same global step*.
A **cut** is that consistent snapshot; it has two parts, each written atomically (complete or
absent) and the run-level one last:

1. ``DIR/NAME/checkpoint-STEP/`` for every running adapter (STEP = its optimizer steps): the
   adapter in PEFT format, ``optimizer.pt``, ``scheduler.pt`` and ``trainer_state.json``. Weights,
   optimizer and schedule change only at optimizer steps, so a folder written earlier at the same
   STEP is reused instead of rewritten.
2. ``DIR/.mlora-run/RUN_ID/step-G/`` (G = global step; RUN_ID names this run's config, seed
   and base model, so other runs in the same folder keep their own records: see
   ``run_records.py``): ``manifest.json`` (step counters and dispatcher
   position of every adapter, which checkpoint folder it uses, finished/failed status, loss
   bookkeeping, the config, the world size) and ``state.safetensors`` (RNG states of torch CPU
   and device, of every rank, the partial gradients of adapters that are mid
   gradient-accumulation, summed over ranks, pending loss sums).

With several processes only rank 0 writes; every rank reads the same cut on ``--resume``.

A cut can therefore be taken after any global step. ``--resume`` picks the newest cut of this
run whose parts all exist and are intact (sizes, safetensors headers, JSON shapes; a damaged
one is skipped with a warning naming the file) and restores it; since the RNG streams,
gradients, optimizer, schedule and data position are all restored, the rest of the run is the
same computation as without the interruption. A cut is taken at the start (``step-0``),
whenever an adapter reaches a multiple of ``save_step`` or finishes, on Ctrl-C / SIGTERM, and
at the end.

Retention: each adapter keeps its newest ``save_total_limit`` folders; a cut that references a
deleted folder is deleted first, so every cut left on disk is complete.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save

from mlora.atomic import atomic_directory, atomic_write_bytes, atomic_write_text
from mlora.backends import RngState
from mlora.dispatcher import AdapterQueue
from mlora.errors import MloraError, first_line
from mlora.integrity import json_problem, safetensors_problem, shape_problem, torch_file_problem
from mlora.persistence import (
    adapter_files_problem,
    load_adapter_weights,
    save_adapter,
)
from mlora.run_records import (
    RESUME_FREE_KEYS,
    RUN_DIR,
    RunIdentity,
    base_model_identity,
    run_folders,
)

if TYPE_CHECKING:
    from mlora.trainer import AdapterRun, Trainer

logger = logging.getLogger("mlora")
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
CUT_PATTERN = re.compile(r"^step-(\d+)$")
TEMP_PATTERN = re.compile(r"^\..+\.tmp(\.old)?$")  # leftovers of atomic writes cut short
STATE_NAME = "trainer_state.json"
MANIFEST_NAME = "manifest.json"
TENSORS_NAME = "state.safetensors"
FORMAT = 1
STATUSES = ("running", "finished", "failed")
# The shape of a manifest and of one adapter's entry in it (what a resume reads).
MANIFEST_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": int,
    "global_step": int,
    "seed": int,
    "config": dict,
    "adapters": dict,
}
ENTRY_FIELDS: dict[str, type | tuple[type, ...]] = {
    "status": str, "steps_done": int, "queue": dict, "loss_count": (int, float), "tokens": int,
    "history": list, "checkpoint": (str, type(None)), "message": (str, type(None)),
}  # fmt: skip
STATE_FIELDS: dict[str, type | tuple[type, ...]] = {"queue": dict}


# --- listing ---------------------------------------------------------------------------------


def _numbered(folder: Path, pattern: re.Pattern[str], marker: str) -> list[tuple[int, Path]]:
    """``(number, child)`` of the children of ``folder`` whose name matches ``pattern`` and that
    hold ``marker`` (the file written last: without it the folder is incomplete), oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = pattern.match(child.name)
        if match and (child / marker).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def list_checkpoints(adapter_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of one adapter, oldest first."""
    return _numbered(adapter_dir, CHECKPOINT_PATTERN, STATE_NAME)


def list_cuts(records: Path) -> list[tuple[int, Path]]:
    """Run-level cuts in a run's records folder (``DIR/.mlora-run/RUN_ID``), oldest first."""
    return _numbered(records, CUT_PATTERN, MANIFEST_NAME)


def identity_of(trainer: Trainer) -> RunIdentity:
    return RunIdentity(trainer.config, trainer.seed, trainer.base_model_name)


def _read_json(path: Path, fields: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """A JSON object with ``fields``; else one line naming the file."""
    value, problem = json_problem(path)
    problem = problem or shape_problem(value, fields)
    if problem:
        raise MloraError(f"{path}: {problem}")
    return value


def read_manifest(cut: Path) -> dict[str, Any]:
    return _read_json(cut / MANIFEST_NAME, MANIFEST_FIELDS)


def manifest_problem(manifest: Any) -> str | None:
    """What is wrong with a manifest's shape (it is read without further checks), or None."""
    problem = shape_problem(manifest, MANIFEST_FIELDS)
    if problem:
        return problem
    if manifest["format"] != FORMAT:
        return f"format {manifest['format']} (this mlora reads format {FORMAT})"
    if not isinstance(manifest["config"].get("lora"), list):
        return "its config has no list 'lora'"
    for name, entry in manifest["adapters"].items():
        problem = shape_problem(entry, ENTRY_FIELDS)
        if problem is None and entry["status"] not in STATUSES:
            problem = f"status {entry['status']!r} is not one of {', '.join(STATUSES)}"
        if problem:
            return f"adapter {name!r}: {problem}"
    return None


# --- writing ---------------------------------------------------------------------------------


def _torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_checkpoint(trainer: Trainer, run: AdapterRun) -> Path:
    """Write ``DIR/NAME/checkpoint-STEP/`` for ``run``'s current optimizer step."""
    target = trainer.output_dir / run.name / f"checkpoint-{run.steps_done}"
    with atomic_directory(target) as tmp:
        save_adapter(trainer.model, run.name, tmp, trainer.adapter_config_json(run))
        atomic_write_bytes(tmp / "optimizer.pt", _torch_bytes(run.optimizer.state_dict()))
        atomic_write_bytes(tmp / "scheduler.pt", _torch_bytes(run.scheduler.state_dict()))
        state = {
            "adapter": run.name,
            "steps_done": run.steps_done,
            "global_step": trainer.global_step,
            "queue": run.queue.state_dict(),
            "epoch_order": current_epoch_order(run.queue),
            "seed": trainer.seed,
        }
        atomic_write_text(tmp / STATE_NAME, json.dumps(state, indent=2) + "\n")
    logger.info("adapter %s: checkpoint %s", run.name, target)
    return target


def current_epoch_order(queue: AdapterQueue) -> list[int] | None:
    """Row indices of the queue's current epoch, in training order (None once finished).

    A resume recomputes it from the seed; the checkpoint keeps it to show where it stands and
    to notice a data file that changed since (see ``check_same_data``).
    """
    return None if queue.finished else queue.epoch_order(queue.epoch)


def check_same_data(folder: Path, queue: AdapterQueue) -> None:
    """Refuse to resume on data whose rows changed in number (or, grouped by length, in length).

    Raises:
        MloraError: naming the adapter and the checkpoint.
    """
    state = _read_json(folder / STATE_NAME, STATE_FIELDS)
    saved = state.get("epoch_order")
    if saved is not None and queue.epoch_order(state["queue"]["epoch"]) != saved:
        raise MloraError(
            f"cannot resume adapter {queue.name!r} from {folder}: its training data changed "
            f"since (now {len(queue.rows)} usable rows, and the row order differs); resume "
            "with the same data, or start over with --overwrite"
        )


def _status(run: AdapterRun) -> str:
    if run.failed is not None:
        return "failed"
    return "finished" if run.finished else "running"


def cut_path(trainer: Trainer) -> Path:
    """Where the cut of ``trainer``'s current global step goes."""
    return identity_of(trainer).records(trainer.output_dir) / f"step-{trainer.global_step}"


def write_cut(trainer: Trainer, rng: list[RngState]) -> Path:
    """Write a consistent snapshot of the whole run at ``trainer.global_step``; returns it.

    Adapter folders come first, the run-level folder (the manifest) last, so a cut that exists
    is complete. Then old checkpoints are pruned (``save_total_limit`` per adapter).

    Args:
        rng: every rank's global RNG state, in rank order (one entry with one process).
    """
    tensors: dict[str, torch.Tensor] = {}
    adapters: dict[str, dict[str, Any]] = {}
    for run in trainer.runs:
        status = _status(run)
        entry: dict[str, Any] = {
            "status": status,
            "steps_done": run.steps_done,
            "queue": run.queue.state_dict(),
            "loss_count": run.loss_count,
            "tokens": run.tokens,
            "history": run.history,
            "checkpoint": None,
            "message": run.failed,
        }
        if status == "running" and run.steps_done > 0:  # at step 0 the init is reproducible
            folder = trainer.output_dir / run.name / f"checkpoint-{run.steps_done}"
            if trainer.checkpoints_written.get(run.name) != run.steps_done or not folder.is_dir():
                write_checkpoint(trainer, run)
                trainer.checkpoints_written[run.name] = run.steps_done
            entry["checkpoint"] = folder.name
        if status == "running":
            for i, param in enumerate(run.params):
                if param.grad is not None:  # mid gradient-accumulation
                    tensors[f"grad/{run.name}/{i}"] = _own(param.grad)
            if run.step_loss is not None:
                tensors[f"step_loss/{run.name}"] = _own(run.step_loss.reshape(1))
        if run.loss_sum is not None:
            tensors[f"loss_sum/{run.name}"] = _own(run.loss_sum.reshape(1))
        adapters[run.name] = entry
    for key, state in trainer.model.context.generators.state_dict().items():
        tensors[f"adapter_rng/{key}"] = state  # each adapter's dropout / jitter stream
    for rank, state in enumerate(rng):
        prefix = "rng" if rank == 0 else f"rng/rank{rank}"
        tensors[f"{prefix}/cpu"] = state.cpu
        if state.device is not None:
            tensors[f"{prefix}/device"] = state.device.cpu()
    identity = identity_of(trainer)
    manifest = {
        "format": FORMAT,
        "world_size": len(rng),
        "global_step": trainer.global_step,
        "seed": trainer.seed,
        "base_model": base_model_identity(trainer.base_model_name),
        "config_file": trainer.config.source,
        "load_adapter": bool(trainer.init_from),
        "config": identity.config_json,
        "adapters": adapters,
    }
    records = identity.records(trainer.output_dir)
    target = cut_path(trainer)
    with atomic_directory(target) as tmp:
        atomic_write_bytes(tmp / TENSORS_NAME, save(tensors))
        atomic_write_text(tmp / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    prune(trainer.output_dir, records, identity.names, trainer.config.save_total_limit)
    logger.debug("run state %s", target)
    return target


def _own(value: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy with its own storage (safetensors refuses shared storage, and the
    loss sums can be views of the same step's losses)."""
    return value.detach().cpu().clone(memory_format=torch.contiguous_format)


def _referenced(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (name, entry["checkpoint"])
        for name, entry in manifest["adapters"].items()
        if entry.get("checkpoint")
    ]


def prune(output_dir: Path, records: Path, names: list[str], keep: int) -> None:
    """Keep each adapter's newest ``keep`` checkpoints; drop this run's cuts that need a dropped
    one (other runs' records are theirs)."""
    doomed: set[tuple[str, str]] = set()
    for name in names:
        for _, folder in list_checkpoints(output_dir / name)[:-keep]:
            doomed.add((name, folder.name))
    cuts = list_cuts(records)
    for index, (_, cut) in enumerate(cuts):
        too_old = index < len(cuts) - max(keep, 2)
        if too_old or any(ref in doomed for ref in _referenced(read_manifest(cut))):
            shutil.rmtree(cut, ignore_errors=True)
    for name, folder in sorted(doomed):
        shutil.rmtree(output_dir / name / folder, ignore_errors=True)


def _newest_manifest(records: Path) -> dict[str, Any] | None:
    """The manifest of the newest cut in ``records`` when it is well-formed, else None."""
    cuts = list_cuts(records)
    if not cuts:
        return None
    manifest, problem = json_problem(cuts[-1][1] / MANIFEST_NAME)
    return manifest if problem is None and manifest_problem(manifest) is None else None


def _resumable(manifest: dict[str, Any] | None) -> bool:
    return manifest is not None and any(
        entry["status"] == "running" for entry in manifest["adapters"].values()
    )


def interrupted_run(output_dir: Path, names: list[str]) -> bool:
    """Whether ``output_dir`` holds a stopped run that trained any of ``names``."""
    for records in [*run_folders(output_dir), output_dir / RUN_DIR]:
        manifest = _newest_manifest(records)
        if _resumable(manifest) and set(manifest["adapters"]) & set(names):  # type: ignore[index]
            return True
    return False


def clear_run_state(output_dir: Path, identity: RunIdentity) -> None:
    """Before a fresh run: forget this run's earlier records and its adapters' checkpoints.

    Other runs' records stay (a neighbour interrupted in the same folder can still resume).
    """
    shutil.rmtree(identity.records(output_dir), ignore_errors=True)
    for name in identity.names:
        for _, folder in list_checkpoints(output_dir / name):
            shutil.rmtree(folder, ignore_errors=True)
    _drop_temporaries([output_dir / name for name in identity.names])


# --- resuming --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResumePoint:
    """A complete cut to resume from."""

    path: Path
    manifest: dict[str, Any]

    @property
    def global_step(self) -> int:
        return int(self.manifest["global_step"])


def _file_problem(path: Path, check: Any) -> str | None:
    if not path.is_file():
        return f"{path} is missing"
    problem = check(path)
    return f"{path}: {problem}" if problem else None


def _checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder (first problem found), or None."""
    problem = adapter_files_problem(folder)
    if problem:
        return problem
    for name in ("optimizer.pt", "scheduler.pt"):
        problem = _file_problem(folder / name, torch_file_problem)
        if problem:
            return problem
    state, problem = json_problem(folder / STATE_NAME)
    problem = problem or shape_problem(state, STATE_FIELDS)
    return f"{folder / STATE_NAME}: {problem}" if problem else None


def cut_problem(output_dir: Path, cut: Path) -> str | None:
    """Why the cut ``cut`` cannot be resumed from (a missing or damaged file), or None.

    Reads headers and JSON only: sizes against safetensors headers, torch archives, shapes.
    """
    manifest, problem = json_problem(cut / MANIFEST_NAME)
    problem = problem or manifest_problem(manifest)
    if problem:
        return f"{cut / MANIFEST_NAME}: {problem}"
    problem = _file_problem(cut / TENSORS_NAME, safetensors_problem)
    if problem:
        return problem
    for name, entry in manifest["adapters"].items():
        if entry["status"] == "finished":
            problem = adapter_files_problem(output_dir / name)
        elif entry["checkpoint"]:
            problem = _checkpoint_problem(output_dir / name / entry["checkpoint"])
        if problem:
            return problem
    return None


def _newest_intact(output_dir: Path, records: Path) -> ResumePoint | None:
    """The newest cut in ``records`` with nothing missing or damaged; says which it skips."""
    for _, cut in reversed(list_cuts(records)):
        problem = cut_problem(output_dir, cut)
        if problem is None:
            return ResumePoint(cut, read_manifest(cut))
        logger.warning("skipping checkpoint %s: %s", cut, problem)
    return None


def _adopt_legacy(output_dir: Path, identity: RunIdentity) -> None:
    """Move records of the layout before run ids (``DIR/.mlora-run/step-G``) of a run with
    these adapters into this run's folder, once it is clear they are this run's.

    Raises:
        MloraError: they are of these adapters but another seed or config (naming the key).
    """
    legacy = [
        cut
        for _, cut in list_cuts(output_dir / RUN_DIR)
        if manifest_problem(manifest := json_problem(cut / MANIFEST_NAME)[0]) is None
        and sorted(manifest["adapters"]) == sorted(identity.names)
    ]
    if not legacy:
        return
    check_same_run(ResumePoint(legacy[-1], read_manifest(legacy[-1])), identity)
    records = identity.records(output_dir)
    records.mkdir(parents=True, exist_ok=True)
    for cut in legacy:
        cut.rename(records / cut.name)
    logger.info("moved %d run record(s) of an older mlora into %s", len(legacy), records)


def _describe(records: Path, manifest: dict[str, Any]) -> str:
    where = manifest.get("config_file") or "an unnamed config"
    return (
        f"{records.name} (adapters {', '.join(manifest['adapters'])} from {where}, "
        f"--seed {manifest['seed']}, step {manifest['global_step']})"
    )


def find_resume_point(output_dir: Path, identity: RunIdentity) -> ResumePoint:
    """The newest intact cut of this run (by its id: config, seed, base model).

    Raises:
        MloraError: there is none (one line): a run of these adapters with another seed or
            config names what differs; otherwise the folder's resumable runs are listed.
    """
    _adopt_legacy(output_dir, identity)
    point = _newest_intact(output_dir, identity.records(output_dir))
    if point is not None:
        return point
    others = []
    for records in run_folders(output_dir):
        manifest = _newest_manifest(records)
        if records.name == identity.run_id or not _resumable(manifest):
            continue
        assert manifest is not None
        if sorted(manifest["adapters"]) == sorted(identity.names):
            check_same_run(ResumePoint(list_cuts(records)[-1][1], manifest), identity)
        others.append(_describe(records, manifest))
    listing = f"; resumable runs there: {'; '.join(others)}" if others else ""
    raise MloraError(
        f"nothing to resume in {output_dir}: no complete checkpoint of adapters "
        f"{', '.join(identity.names)} with this config"
        + (listing or " (run without --resume to start)")
    )


def check_same_run(point: ResumePoint, identity: RunIdentity) -> None:
    """Refuse to resume a run with a different seed, base model or training settings.

    Raises:
        MloraError: naming the first key that differs.
    """
    saved, now = point.manifest, identity.config_json
    if saved["seed"] != identity.seed:
        raise MloraError(
            f"cannot resume {point.path}: it was trained with --seed {saved['seed']}, "
            f"not {identity.seed}"
        )
    base = base_model_identity(identity.base_model)
    if saved.get("base_model") not in (None, base):
        raise MloraError(
            f"cannot resume {point.path}: it was trained on {saved['base_model']}, not {base}"
        )
    old_order = [a["name"] for a in saved["config"]["lora"]]
    if old_order != [a["name"] for a in now["lora"]]:  # the dispatcher goes by config order
        raise MloraError(
            f"cannot resume {point.path}: the adapters were in the order {', '.join(old_order)} "
            "(resume with the same config, or start over with --overwrite)"
        )
    old_top = {k: v for k, v in saved["config"].items() if k not in RESUME_FREE_KEYS | {"lora"}}
    new_top = {k: v for k, v in now.items() if k not in RESUME_FREE_KEYS | {"lora"}}
    pairs = [(None, old_top, new_top)]
    old_adapters = {a["name"]: a for a in saved["config"]["lora"]}
    pairs += [(a["name"], old_adapters[a["name"]], a) for a in now["lora"]]
    for adapter, old, new in pairs:
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                where = f"adapter {adapter!r} key {key!r}" if adapter else f"key {key!r}"
                raise MloraError(
                    f"cannot resume {point.path}: {where} was {json.dumps(old.get(key))}, "
                    f"now {json.dumps(new.get(key))} (resume with the same config, or start "
                    "over with --overwrite)"
                )


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is one line naming it
        raise MloraError(f"cannot read {path}: {first_line(exc)}") from None


def restore(trainer: Trainer, point: ResumePoint) -> None:
    """Put ``trainer`` back in the exact state of the cut ``point`` and drop newer leftovers."""
    from mlora.persistence import read_adapter

    identity = identity_of(trainer)
    check_same_run(point, identity)
    output_dir = trainer.output_dir
    tensors = load_file(point.path / TENSORS_NAME)
    device = trainer.model.device
    for run in trainer.runs:
        entry = point.manifest["adapters"][run.name]
        run.queue.load_state_dict(entry["queue"])
        run.steps_done = entry["steps_done"]
        run.loss_count, run.tokens = entry["loss_count"], entry["tokens"]
        run.history = list(entry["history"])
        loss_sum = tensors.get(f"loss_sum/{run.name}")
        run.loss_sum = None if loss_sum is None else loss_sum.to(device).reshape(())
        if entry["status"] == "failed":
            run.failed = entry["message"]
        elif entry["status"] == "finished":
            _, weights = read_adapter(output_dir / run.name)
            load_adapter_weights(trainer.model, run.name, weights, str(output_dir / run.name))
        if entry["status"] != "running":
            continue
        if entry["checkpoint"] is not None:
            folder = output_dir / run.name / entry["checkpoint"]
            check_same_data(folder, run.queue)
            _, weights = read_adapter(folder)
            load_adapter_weights(trainer.model, run.name, weights, str(folder))
            run.optimizer.load_state_dict(_load_torch(folder / "optimizer.pt"))
            run.scheduler.load_state_dict(_load_torch(folder / "scheduler.pt"))
            trainer.checkpoints_written[run.name] = run.steps_done
        main = trainer.dist.is_main  # the cut's partial sums are the whole run's: rank 0 takes
        for i, param in enumerate(run.params):  # them, the others start the step from zero
            grad = tensors.get(f"grad/{run.name}/{i}") if main else None
            param.grad = None if grad is None else grad.to(device=param.device, dtype=param.dtype)
        step_loss = tensors.get(f"step_loss/{run.name}")
        if step_loss is not None and not main:
            step_loss = torch.zeros_like(step_loss)
        run.step_loss = None if step_loss is None else step_loss.to(device).reshape(())
        if main:
            _drop_after(list_checkpoints(output_dir / run.name), run.steps_done)
    if trainer.dist.is_main:
        records = identity.records(output_dir)
        _drop_after(list_cuts(records), point.global_step)
        _drop_temporaries([records, *(output_dir / run.name for run in trainer.runs)])
    trainer.global_step = point.global_step
    trainer.last_cut_step = point.global_step
    trainer.backend.set_rng_state(
        _rank_rng(tensors, point, trainer.dist.rank, trainer.dist.world_size)
    )
    prefix = "adapter_rng/"
    trainer.model.context.generators.load_state_dict(
        {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    )
    done = [run.name for run in trainer.runs if run.finished and run.failed is None]
    logger.info(
        "resuming from %s (global step %d)%s",
        point.path,
        point.global_step,
        f"; already finished: {', '.join(done)}" if done else "",
    )


def _rank_rng(
    tensors: dict[str, torch.Tensor], point: ResumePoint, rank: int, world_size: int
) -> RngState:
    """This rank's global RNG state from the cut: its own when the world size is the same,
    else rank 0's (adapter noise does not come from it; see ``mlora.randomness``)."""
    saved_world = int(point.manifest.get("world_size", 1))
    prefix = "rng" if rank == 0 or saved_world != world_size else f"rng/rank{rank}"
    if saved_world != world_size and rank == 0:
        logger.info(
            "resuming a run of %d process(es) with %d: each adapter's micro-batches and "
            "random draws are the same, only the sharding of rows changes",
            saved_world,
            world_size,
        )
    return RngState(cpu=tensors[f"{prefix}/cpu"], device=tensors.get(f"{prefix}/device"))


def _drop_after(numbered: list[tuple[int, Path]], step: int) -> None:
    """Folders written after the cut by the interrupted process (they will be written again)."""
    for number, folder in numbered:
        if number > step:
            shutil.rmtree(folder, ignore_errors=True)


def _drop_temporaries(folders: list[Path]) -> None:
    for folder in folders:
        if not folder.is_dir():
            continue
        for child in folder.iterdir():
            if TEMP_PATTERN.match(child.name):
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)


def last_good_checkpoint(trainer: Trainer, run: AdapterRun) -> str:
    """The newest checkpoint folder of ``run`` (for messages), or a note that there is none."""
    found = list_checkpoints(trainer.output_dir / run.name)
    return str(found[-1][1]) if found else "none (no checkpoint written yet)"
