"""Per-adapter data queues and the choice of which adapters share each step.

Each adapter walks its own data (epochs, shuffle, group_by_length, micro-batches); its order
depends only on its own rows, its settings and the seed, never on which other adapters train
with it — which is what makes concurrent training equal isolated training. The dispatcher then
picks, each step, up to ``train_lora_simultaneously_num`` adapters among the first
``train_lora_candidate_num`` unfinished ones.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from mlora.core.errors import MloraError
from mlora.data.rows import TokenizedRow


@dataclass(frozen=True)
class MicroBatch:
    """Rows for one forward pass of one adapter.

    Attributes:
        rows: the rows.
        epoch: 0-based epoch it comes from.
        accumulation: how many micro-batches make the optimizer step this one belongs to
            (fewer for the last, short batch of an epoch); MoE router losses are divided by it.
        ends_step: the optimizer steps after this micro-batch.
        step_tokens: supervised tokens of the whole optimizer step (all its micro-batches):
            the token losses of each micro-batch are summed and divided by this, so the step
            minimises the mean over its tokens whatever the micro-batch size. Preference pairs:
            the chosen rows' tokens only.
        rows_per_item: rows that travel together (2: a preference pair, chosen then rejected).
        step_items: items (rows, or pairs) of the whole optimizer step.
    """

    rows: tuple[TokenizedRow, ...]
    epoch: int
    accumulation: int
    ends_step: bool
    step_tokens: int
    rows_per_item: int = 1
    step_items: int = 0

    @property
    def max_len(self) -> int:
        return max(len(row) for row in self.rows)

    def shard(self, rank: int, world_size: int) -> MicroBatchShard:
        """Rank ``rank``'s contiguous share of the rows (data parallel; see ``shard_bounds``);
        the rows of an item (a preference pair) stay on one rank."""
        per = self.rows_per_item
        start, end = (per * i for i in shard_bounds(len(self.rows) // per, rank, world_size))
        return MicroBatchShard(
            self.rows[start:end],
            tokens_before=sum(len(row) for row in self.rows[:start]),
            tokens_total=sum(len(row) for row in self.rows),
            supervised_before=sum(row.num_supervised for row in self.rows[:start]),
            supervised_total=sum(row.num_supervised for row in self.rows),
        )


@dataclass(frozen=True)
class MicroBatchShard:
    """One rank's rows of a micro-batch, and where their tokens sit among the micro-batch's.

    Attributes:
        rows: this rank's rows (possibly none), in micro-batch order.
        tokens_before: tokens of the micro-batch's rows before ``rows``.
        tokens_total: tokens of the whole micro-batch. Every rank draws the adapter's noise for
            all of them and keeps its window, so sharding does not change the masks.
        supervised_before, supervised_total: the same for the supervised positions (the
            ``lm_head`` pass draws for those).
    """

    rows: tuple[TokenizedRow, ...]
    tokens_before: int
    tokens_total: int
    supervised_before: int
    supervised_total: int


def shard_bounds(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``[start, end)`` of ``count`` ordered items.

    The first ``count % world_size`` ranks take one item more; a rank may get none (a
    micro-batch with fewer rows than ranks). Deterministic in (rank, world size); the order it
    cuts comes from the seed (``epoch_order``).
    """
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def name_seed(seed: int, name: str) -> int:
    """A seed per adapter name, so an adapter's randomness never depends on the others."""
    return seed * 1_000_003 + zlib.crc32(name.encode())


def epoch_order(
    lengths: Sequence[int],
    epoch: int,
    seed: int,
    name: str,
    shuffle: bool,
    group_by_length: bool,
    batch_size: int,
) -> list[int]:
    """Row indices of one epoch, deterministic in (seed, adapter name, epoch).

    ``group_by_length`` sorts rows longest first so each batch holds rows of similar length,
    then (with ``shuffle``) shuffles the order of whole batches.
    """
    rng = random.Random(name_seed(seed, name) + epoch)
    order = list(range(len(lengths)))
    if shuffle and not group_by_length:
        rng.shuffle(order)
    if group_by_length:
        order.sort(key=lambda i: -lengths[i])
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if shuffle:
            rng.shuffle(batches)
        order = [i for batch in batches for i in batch]
    return order


class AdapterQueue:
    """The micro-batches of one adapter, in training order, with a cursor that can be saved."""

    def __init__(
        self,
        name: str,
        rows: Sequence[TokenizedRow],
        batch_size: int,
        micro_batch_size: int,
        num_epochs: int,
        shuffle: bool = True,
        group_by_length: bool = False,
        seed: int = 42,
        rows_per_item: int = 1,
        max_steps: int | None = None,
    ) -> None:
        self.name = name
        self.rows = list(rows)
        self.rows_per_item = rows_per_item
        # an item's length: its rows' tokens (batch sizes, order and grouping count items)
        self._lengths = [
            sum(len(row) for row in self.rows[i : i + rows_per_item])
            for i in range(0, len(self.rows), rows_per_item)
        ]
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.micro_batch_size = micro_batch_size
        self.num_epochs = num_epochs
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.seed = seed
        self.epoch = 0
        self.cursor = 0  # index of the next micro-batch within the epoch
        self.micro_steps_done = 0
        self._epoch_batches: list[MicroBatch] = self._build_epoch(0)

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self._lengths) // self.batch_size)

    @property
    def total_steps(self) -> int:
        """Optimizer steps over all epochs (at most ``max_steps``)."""
        steps = self.steps_per_epoch * self.num_epochs
        return steps if self.max_steps is None else min(steps, self.max_steps)

    @property
    def total_micro_batches(self) -> int:
        """Micro-batches over all epochs, up to the end of step ``max_steps``."""
        full, rest = divmod(self.total_steps, self.steps_per_epoch)
        per_step = -(-self.batch_size // self.micro_batch_size)
        epoch = len(self._epoch_batches)
        return full * epoch + min(rest * per_step, epoch)

    def epoch_order(self, epoch: int) -> list[int]:
        """Row indices of ``epoch`` in training order (recomputable: resume checks it)."""
        return epoch_order(
            self._lengths, epoch, self.seed, self.name, self.shuffle, self.group_by_length,
            self.batch_size,
        )  # fmt: skip

    def _build_epoch(self, epoch: int) -> list[MicroBatch]:
        order = self.epoch_order(epoch)
        out = []
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            micro = [
                batch[i : i + self.micro_batch_size]
                for i in range(0, len(batch), self.micro_batch_size)
            ]
            per = self.rows_per_item
            step_tokens = sum(self.rows[per * i].num_supervised for i in batch) if per > 1 else (
                sum(self.rows[i].num_supervised for i in batch)
            )  # fmt: skip
            for k, indices in enumerate(micro):
                rows = tuple(self.rows[per * i + j] for i in indices for j in range(per))
                ends = k == len(micro) - 1
                out.append(MicroBatch(rows, epoch, len(micro), ends, step_tokens, per, len(batch)))
        return out

    @property
    def finished(self) -> bool:
        if self.max_steps is not None and self._steps_popped() >= self.max_steps:
            return True
        return self.epoch >= self.num_epochs

    def _steps_popped(self) -> int:
        """Optimizer steps whose micro-batches were all popped (``max_steps`` counts these)."""
        within = self._epoch_batches[: self.cursor] if self.epoch < self.num_epochs else []
        return self.epoch * self.steps_per_epoch + sum(mb.ends_step for mb in within)

    def peek(self) -> MicroBatch:
        return self._epoch_batches[self.cursor]

    def pop(self) -> MicroBatch:
        batch = self._epoch_batches[self.cursor]
        self.micro_steps_done += 1
        self.cursor += 1
        if self.cursor == len(self._epoch_batches):
            self.epoch += 1
            self.cursor = 0
            if not self.finished:
                self._epoch_batches = self._build_epoch(self.epoch)
        return batch

    def stop(self) -> None:
        """End this adapter's training early (it counts as finished from now on)."""
        self.epoch, self.cursor = self.num_epochs, 0

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "micro_steps_done": self.micro_steps_done,
        }

    def step_start_state(self) -> dict[str, int]:
        """``state_dict`` at the start of the optimizer step in progress (the position that
        goes with the weights and optimizer state while gradients are being accumulated)."""
        into = 0  # micro-batches of the current step already popped (steps never span epochs)
        while (
            not self.finished
            and into < self.cursor
            and not self._epoch_batches[self.cursor - into - 1].ends_step
        ):
            into += 1
        state = self.state_dict()
        return {
            **state,
            "cursor": self.cursor - into,
            "micro_steps_done": state["micro_steps_done"] - into,
        }

    def popped_in_step(self) -> list[MicroBatch]:
        """The micro-batches of the optimizer step in progress already popped (none between
        steps): what a step resumed in the middle of its accumulation has already seen."""
        start = self.step_start_state()["cursor"]
        return [] if self.finished else self._epoch_batches[start : self.cursor]

    def check_same_order(self, epoch: int, order: list[int] | None, source: object) -> None:
        """Refuse to resume from ``source`` when ``order`` (the row order of ``epoch`` saved
        there) is not this queue's: the training data changed in number (or length) of rows.

        Raises:
            MloraError: naming the adapter and ``source``.
        """
        if order is not None and self.epoch_order(epoch) != order:
            raise MloraError(
                f"cannot resume adapter {self.name!r} from {source}: its training data changed "
                f"since (now {len(self.rows)} usable rows, and the row order differs); resume "
                "with the same data, or start over with --overwrite"
            )

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.micro_steps_done = state["micro_steps_done"]
        if not self.finished:
            self._epoch_batches = self._build_epoch(self.epoch)


class Dispatcher:
    """Chooses the adapters of each step and pops one micro-batch from each.

    Args:
        queues: one per adapter, in config order.
        candidate_num: adapters held in training at once (the first unfinished ones).
        simultaneous_num: adapters per step, at most.
        strategy: "none" takes the candidates that are furthest behind, in config order;
            "optim" takes the one furthest behind plus those whose next micro-batch is closest
            to it in length, to cut padding.
    """

    def __init__(
        self,
        queues: Sequence[AdapterQueue],
        candidate_num: int,
        simultaneous_num: int,
        strategy: str = "optim",
    ) -> None:
        self.queues = list(queues)
        self.candidate_num = candidate_num
        self.simultaneous_num = simultaneous_num
        self.strategy = strategy

    @property
    def finished(self) -> bool:
        return all(q.finished for q in self.queues)

    def add(self, queue: AdapterQueue) -> None:
        """A new adapter's queue, last in config order (it may share the next step)."""
        self.queues.append(queue)

    def _candidates(self) -> list[AdapterQueue]:
        return [q for q in self.queues if not q.finished][: self.candidate_num]

    def choose(self) -> list[AdapterQueue]:
        """The queues that share the next step, in config order."""
        candidates = self._candidates()
        behind = sorted(candidates, key=lambda q: (q.micro_steps_done, self.queues.index(q)))
        if len(candidates) <= self.simultaneous_num:
            chosen = candidates
        elif self.strategy == "optim":
            anchor = behind[0]
            rest = sorted(behind[1:], key=lambda q: abs(q.peek().max_len - anchor.peek().max_len))
            chosen = [anchor, *rest[: self.simultaneous_num - 1]]
        else:
            chosen = behind[: self.simultaneous_num]
        return sorted(chosen, key=self.queues.index)

    def next_step(self) -> list[tuple[AdapterQueue, MicroBatch]]:
        """Pop one micro-batch from each chosen adapter (empty when all are finished)."""
        return [(q, q.pop()) for q in self.choose()]
