"""Resumable checkpoints: per-adapter folders on each adapter's own schedule, tied together
by small run-level cuts.

Each adapter checkpoints on its own schedule: when it reaches a multiple of its ``save_step``
(its own key, else the run-wide one) it writes ``DIR/NAME/checkpoint-STEP/`` (STEP = its
optimizer steps): the adapter in PEFT format, ``optimizer.pt``, ``scheduler.pt`` and
``trainer_state.json`` (its data position at that step). Nothing is rewritten for the adapters
that are not due.

A **cut** ``DIR/.mlora-run/RUN_ID/step-G/`` (G = global step; RUN_ID names this run's config,
seed and base model: see ``run_records.py``) is the run manifest: ``manifest.json`` says, for
every adapter, its position at G (step counters, dispatcher position, loss bookkeeping,
running/finished/failed) and which of its checkpoint folders it resumes from; with
``state.safetensors`` (every rank's RNG states, each adapter's noise stream, loss sums, and
the partial gradients of adapters saved mid gradient-accumulation). A cut is taken whenever an
adapter writes a checkpoint, finishes or fails, at the start (``step-0``), on Ctrl-C / SIGTERM
(then every running adapter is saved at G) and at the end. It is written after the folders it
names, so a cut that exists is complete.

**Resume** takes the newest intact cut (sizes, safetensors headers, JSON shapes; a damaged one
is skipped with a warning naming the file). An adapter whose folder is at G is restored as is;
one whose newest folder is older is restored from it and *replayed* up to its position at G:
its micro-batches, noise (seeded per micro-batch) and optimizer steps depend on its own data
and state only, never on the adapters beside it, so the replay recomputes exactly the state
it had at G. Then the RNG states are restored and the run goes on as the uninterrupted one
did (same steps, same log lines). The replay costs at most ``save_step`` optimizer steps of
each lagging adapter, in place of rewriting every adapter whenever one is due.

Writes run on a background thread (``RunCheckpoints.save`` takes CPU copies; see
``mlora.core.background``). With several processes only rank 0 writes; every rank reads the same
cut.

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
from typing import Any

import torch
from safetensors.torch import load_file, save

from mlora.adapters.peft_files import TORCH_LOAD_ERRORS
from mlora.batching.dispatcher import AdapterQueue
from mlora.core.atomic import atomic_directory, atomic_write_bytes, atomic_write_text
from mlora.core.background import BackgroundWriter
from mlora.core.errors import MloraError, first_line
from mlora.core.integrity import (
    json_problem,
    safetensors_problem,
    shape_problem,
    torch_file_problem,
)
from mlora.hardware.backends import RngState
from mlora.persistence.adapter_files import adapter_files_problem, read_adapter, write_adapter_files
from mlora.training.run_records import (
    RUN_DIR,
    RunIdentity,
    base_model_identity,
    resume_relevant,
    run_folders,
)

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
# What a cut records of each adapter's progress, as Trainer.state_dict gives it.
ENTRY_KEYS = ("status", "steps_done", "queue", "loss_count", "tokens", "history")


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


def checkpoint_folder(output_dir: Path, name: str, step: int) -> Path:
    """``DIR/NAME/checkpoint-STEP``: adapter ``name`` after ``step`` optimizer steps."""
    return output_dir / name / f"checkpoint-{step}"


def write_checkpoint(
    output_dir: Path, name: str, snapshot: dict[str, Any], seed: int, global_step: int
) -> Path:
    """Write ``DIR/NAME/checkpoint-STEP/`` from an adapter snapshot (``Trainer.state_dict``'s
    ``snapshot``: weights, adapter_config, optimizer, scheduler, steps_done, queue)."""
    target = checkpoint_folder(output_dir, name, snapshot["steps_done"])
    with atomic_directory(target) as tmp:
        write_adapter_files(tmp, snapshot["weights"], snapshot["adapter_config"])
        atomic_write_bytes(tmp / "optimizer.pt", _torch_bytes(snapshot["optimizer"]))
        atomic_write_bytes(tmp / "scheduler.pt", _torch_bytes(snapshot["scheduler"]))
        state = {
            "adapter": name,
            "steps_done": snapshot["steps_done"],
            "global_step": global_step,
            "queue": snapshot["queue"],
            "epoch_order": snapshot["epoch_order"],
            "seed": seed,
        }
        atomic_write_text(tmp / STATE_NAME, json.dumps(state, indent=2) + "\n")
    logger.info("adapter %s: checkpoint %s", name, target)
    return target


def check_same_data(folder: Path, queue: AdapterQueue) -> None:
    """Refuse to resume on data whose rows changed in number (or, grouped by length, in length).

    Raises:
        MloraError: naming the adapter and the checkpoint.
    """
    state = _read_json(folder / STATE_NAME, STATE_FIELDS)
    queue.check_same_order(state["queue"]["epoch"], state.get("epoch_order"), folder)


class RunCheckpoints:
    """One run's checkpoints on disk: each adapter's folders and the run-level cuts.

    ``save`` takes ``Trainer.state_dict(...)`` (plain values and CPU tensor copies, so the
    training loop may go on at once) and writes it on a background thread: first the
    checkpoint folders of the adapters that carry a ``snapshot``, then the cut (manifest and
    run state), then the pruning of old folders.

    Args:
        output_dir: ``--dir``.
        identity: the run (names its records folder ``DIR/.mlora-run/RUN_ID``).
        keep: checkpoint folders kept per adapter (``save_total_limit``).
        load_adapter: whether the run started from ``--load_adapter`` folders (a resume does too).
        background: write on a thread (False: in ``save`` itself).
    """

    def __init__(
        self,
        output_dir: Path,
        identity: RunIdentity,
        keep: int,
        load_adapter: bool = False,
        background: bool = True,
    ) -> None:
        self.output_dir = output_dir
        self.identity = identity
        self.keep = keep
        self.load_adapter = load_adapter
        self.writer = BackgroundWriter(enabled=background)

    @property
    def records(self) -> Path:
        return self.identity.records(self.output_dir)

    def cut_path(self, global_step: int) -> Path:
        """Where the cut of ``global_step`` goes."""
        return self.records / f"step-{global_step}"

    def save(self, state: dict[str, Any], rng: list[RngState]) -> Path:
        """Queue the writing of ``state`` (see ``Trainer.state_dict``); returns the cut's path.

        Args:
            rng: every rank's global RNG state, in rank order (one entry with one process).

        Raises:
            WriteError: an earlier background write failed (one line naming the file).
        """
        global_step = state["global_step"]
        tensors: dict[str, torch.Tensor] = {}
        adapters: dict[str, dict[str, Any]] = {}
        snapshots: list[tuple[str, dict[str, Any]]] = []
        for name, entry in state["adapters"].items():
            status, step = entry["status"], entry["checkpoint_step"]
            snapshot = entry.get("snapshot")
            if snapshot is not None and snapshot["steps_done"] > 0:  # step 0: the init, rebuilt
                if snapshot["steps_done"] != step:  # (else its folder holds this step already)
                    snapshots.append((name, snapshot))
                step = snapshot["steps_done"]
            adapters[name] = {
                **{key: entry[key] for key in ENTRY_KEYS},
                "message": entry["message"],
                "checkpoint": None if step is None or status != "running" else f"checkpoint-{step}",
            }
            if "validation" in entry:  # validation curve, best step, patience (validation.py)
                adapters[name]["validation"] = entry["validation"]
            pending = entry.get("pending")
            if pending is not None:
                for i, grad in pending["grads"].items():
                    tensors[f"grad/{name}/{i}"] = grad
                if pending["step_loss"] is not None:
                    tensors[f"step_loss/{name}"] = pending["step_loss"].reshape(1)
            if entry["loss_sum"] is not None:
                tensors[f"loss_sum/{name}"] = entry["loss_sum"].reshape(1)
        for key, value in state["adapter_rng"].items():
            tensors[f"adapter_rng/{key}"] = value  # each adapter's dropout / jitter stream
        for rank, rank_state in enumerate(rng):
            prefix = "rng" if rank == 0 else f"rng/rank{rank}"
            tensors[f"{prefix}/cpu"] = rank_state.cpu
            if rank_state.device is not None:
                tensors[f"{prefix}/device"] = rank_state.device.cpu()
        manifest = {
            "format": FORMAT,
            "world_size": len(rng),
            "global_step": global_step,
            "seed": self.identity.seed,
            "base_model": base_model_identity(self.identity.base_model),
            "config_file": self.identity.config.source,
            "load_adapter": self.load_adapter,
            "config": self.identity.config_json,
            "adapters": adapters,
        }
        if "sweep" in state:  # a sweep's trials and their order (mlora.sweep)
            manifest["sweep"] = state["sweep"]
        target = self.cut_path(global_step)
        # the config's adapters, and those that entered since (a sweep's trials)
        names = list(dict.fromkeys([*self.identity.names, *adapters]))

        def write() -> None:
            for name, snapshot in snapshots:
                write_checkpoint(self.output_dir, name, snapshot, self.identity.seed, global_step)
            with atomic_directory(target) as tmp:
                atomic_write_bytes(tmp / TENSORS_NAME, save(tensors))
                atomic_write_text(tmp / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
            prune(self.output_dir, self.records, names, self.keep)
            logger.debug("run state %s", target)

        self.writer.submit(write)
        return target


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
    old_config, new_config = resume_relevant(saved["config"]), resume_relevant(now)
    old_top = {k: v for k, v in old_config.items() if k != "lora"}
    new_top = {k: v for k, v in new_config.items() if k != "lora"}
    pairs = [(None, old_top, new_top)]
    old_adapters = {a["name"]: a for a in old_config["lora"]}
    pairs += [(a["name"], old_adapters[a["name"]], a) for a in new_config["lora"]]
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
    except TORCH_LOAD_ERRORS as exc:  # a damaged or unreadable file is one line naming it
        raise MloraError(f"cannot read {path}: {first_line(exc)}") from None


def _read_checkpoint(folder: Path) -> dict[str, Any]:
    """A checkpoint folder as the ``snapshot`` ``Trainer.load_state_dict`` takes."""
    state = _read_json(folder / STATE_NAME, STATE_FIELDS)
    _, weights = read_adapter(folder)
    return {
        "steps_done": int(state.get("steps_done", 0)),
        "queue": state["queue"],
        "epoch_order": state.get("epoch_order"),
        "weights": weights,
        "optimizer": _load_torch(folder / "optimizer.pt"),
        "scheduler": _load_torch(folder / "scheduler.pt"),
        "source": str(folder),
    }


def _pending(tensors: dict[str, torch.Tensor], name: str) -> dict[str, Any] | None:
    """The gradients and loss of ``name``'s optimizer step in progress saved in a cut, if any."""
    prefix = f"grad/{name}/"
    grads = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    step_loss = tensors.get(f"step_loss/{name}")
    if not grads and step_loss is None:
        return None
    return {"grads": grads, "step_loss": step_loss}


def read_run_state(
    point: ResumePoint, output_dir: Path, identity: RunIdentity, rank: int = 0, world_size: int = 1
) -> dict[str, Any]:
    """The cut ``point`` as the state dict ``Trainer.load_state_dict`` takes (for ``rank``).

    Each running adapter comes with the snapshot of the checkpoint folder the cut names (none
    before its first one) and, when the cut holds them, the gradients of its step in progress;
    without them the trainer replays the adapter from that folder to the cut's position.

    Raises:
        MloraError: another seed, base or setting than the cut's, or a file that cannot be read.
    """
    check_same_run(point, identity)
    tensors = load_file(point.path / TENSORS_NAME)
    adapters = {}
    for name, entry in point.manifest["adapters"].items():
        out: dict[str, Any] = {key: entry[key] for key in ENTRY_KEYS}
        out["message"], out["checkpoint_step"] = entry["message"], None
        if "validation" in entry:
            out["validation"] = entry["validation"]
        loss_sum = tensors.get(f"loss_sum/{name}")
        out["loss_sum"] = None if loss_sum is None else loss_sum.reshape(())
        if entry["status"] == "finished":
            _, weights = read_adapter(output_dir / name)
            out["snapshot"] = {"weights": weights, "source": str(output_dir / name)}
        elif entry["status"] == "running":
            if entry["checkpoint"] is not None:
                out["snapshot"] = _read_checkpoint(output_dir / name / entry["checkpoint"])
                out["checkpoint_step"] = out["snapshot"]["steps_done"]
            pending = _pending(tensors, name)
            if pending is not None:
                out["pending"] = pending
        adapters[name] = out
    prefix = "adapter_rng/"
    done = [n for n, e in point.manifest["adapters"].items() if e["status"] == "finished"]
    logger.info(
        "resuming from %s (global step %d)%s",
        point.path,
        point.global_step,
        f"; already finished: {', '.join(done)}" if done else "",
    )
    state = {
        "global_step": point.global_step,
        "adapter_rng": {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)},
        "rng": _rank_rng(tensors, point, rank, world_size),
        "adapters": adapters,
    }
    if "sweep" in point.manifest:
        state["sweep"] = point.manifest["sweep"]
    return state


def drop_newer_files(output_dir: Path, point: ResumePoint, identity: RunIdentity) -> None:
    """Before resuming from ``point``: drop the folders the interrupted process wrote after it
    (they will be written again) and leftovers of writes cut short."""
    for name, entry in point.manifest["adapters"].items():
        if entry["status"] == "running":
            _drop_after(list_checkpoints(output_dir / name), entry["steps_done"])
    records = identity.records(output_dir)
    _drop_after(list_cuts(records), point.global_step)
    _drop_temporaries([records, *(output_dir / name for name in identity.names)])


def _rank_rng(
    tensors: dict[str, torch.Tensor], point: ResumePoint, rank: int, world_size: int
) -> RngState:
    """This rank's global RNG state from the cut: its own when the world size is the same,
    else rank 0's (adapter noise does not come from it; see ``mlora.batching.randomness``)."""
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
