"""Per-adapter queues and step composition."""

from __future__ import annotations

from mlora.batching.dispatcher import AdapterQueue, Dispatcher
from mlora.data.rows import TokenizedRow


def rows(lengths: list[int]) -> list[TokenizedRow]:
    return [TokenizedRow([i] * n, [i] * n) for i, n in enumerate(lengths)]


def drain(queue: AdapterQueue) -> list:
    out = []
    while not queue.finished:
        out.append(queue.pop())
    return out


def test_file_order_micro_batches_and_accumulation() -> None:
    queue = AdapterQueue(
        "a", rows([3] * 10), batch_size=4, micro_batch_size=2, num_epochs=2, shuffle=False
    )
    batches = drain(queue)
    firsts = [mb.rows[0].input_ids[0] for mb in batches[:5]]
    assert firsts == [0, 2, 4, 6, 8]
    assert [mb.accumulation for mb in batches[:5]] == [2, 2, 2, 2, 1]  # last batch: 2 rows, 1 micro
    assert [mb.ends_step for mb in batches[:5]] == [False, True, False, True, True]
    assert queue.total_steps == 6 and sum(mb.ends_step for mb in batches) == 6
    assert [mb.epoch for mb in batches] == [0] * 5 + [1] * 5


def test_shuffle_is_seeded_per_adapter_and_epoch() -> None:
    def order(name: str, seed: int) -> list[int]:
        q = AdapterQueue(name, rows([2] * 16), 4, 4, 2, shuffle=True, seed=seed)
        return [r.input_ids[0] for mb in drain(q) for r in mb.rows]

    assert order("a", 1) == order("a", 1)
    assert order("a", 1) != order("a", 2)
    first = order("a", 1)
    assert sorted(first[:16]) == list(range(16)) and first[:16] != first[16:]


def test_group_by_length_makes_batches_of_similar_length() -> None:
    lengths = [1, 9, 2, 8, 3, 7, 4, 6]
    q = AdapterQueue("a", rows(lengths), 2, 2, 1, shuffle=True, group_by_length=True, seed=3)
    spans = [max(len(r) for r in mb.rows) - min(len(r) for r in mb.rows) for mb in drain(q)]
    assert max(spans) == 1


def test_state_dict_resumes_the_same_sequence() -> None:
    q = AdapterQueue("a", rows([2] * 10), 4, 2, 3, seed=5)
    for _ in range(7):
        q.pop()
    state = q.state_dict()
    rest = drain(q)
    again = AdapterQueue("a", rows([2] * 10), 4, 2, 3, seed=5)
    again.load_state_dict(state)
    assert drain(again) == rest


def test_dispatcher_caps_adapters_per_step_and_finishes_all() -> None:
    queues = [AdapterQueue(n, rows([2 + i] * (4 + 3 * i)), 2, 2, 1) for i, n in enumerate("abcd")]
    dispatcher = Dispatcher(queues, candidate_num=3, simultaneous_num=2, strategy="optim")
    seen = {n: 0 for n in "abcd"}
    while not dispatcher.finished:
        step = dispatcher.next_step()
        assert 1 <= len(step) <= 2
        names = [q.name for q, _ in step]
        assert names == sorted(names)  # config order, so segments are stable
        assert "d" not in names or queues[0].finished or queues[1].finished or queues[2].finished
        for q, _ in step:
            seen[q.name] += 1
    assert seen == {q.name: q.total_micro_batches for q in queues}


def test_none_strategy_takes_adapters_furthest_behind() -> None:
    queues = [AdapterQueue(n, rows([2] * 8), 2, 2, 1) for n in "abc"]
    dispatcher = Dispatcher(queues, 3, 1, strategy="none")
    assert [[q.name for q, _ in dispatcher.next_step()] for _ in range(4)] == [
        ["a"],
        ["b"],
        ["c"],
        ["a"],
    ]
