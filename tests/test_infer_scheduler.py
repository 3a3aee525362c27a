"""The scheduler alone (no torch): budgets, chunked prefill, admission, preemption, backpressure."""
from __future__ import annotations

import pytest

from longcat_flash.infer.scheduler import QueueFull, Scheduler, SchedulerConfig, SequenceState, Status


def seq(i: int, n: int) -> SequenceState:
    return SequenceState(i, list(range(n)), prompt_len=n)


def held(s: Scheduler, plan) -> dict[int, int]:
    """What the cache would hold after the engine applied the plan."""
    return {sid: s.pages_for(n) for sid, n in plan.capacity.items()}


def advance(plan) -> None:
    """Pretend the engine ran the plan and sampled one token where a chunk reached the end."""
    for q in plan.decode:
        q.computed += 1
        q.tokens.append(0)
    for q, n in plan.prefill:
        q.computed += n
        if q.remaining == 0:
            q.tokens.append(0)


def test_long_prompts_are_chunked_and_decoders_keep_running():
    s = Scheduler(SchedulerConfig(max_running=4, token_budget=16, prefill_chunk=8, page_size=4))
    a, b = seq(0, 3), seq(1, 30)
    s.add(a)
    s.add(b)
    plan = s.schedule(free_pages=100, held_pages={})
    assert [(q.id, n) for q, n in plan.prefill] == [(0, 3), (1, 8)]  # padded: 2 rows x 8 <= 16
    advance(plan)
    plan = s.schedule(100, held(s, plan))
    assert plan.decode == [a] and [(q.id, n) for q, n in plan.prefill] == [(1, 8)]
    assert all(q.status is Status.RUNNING for q in (a, b))


def test_admission_respects_the_running_limit_and_pages():
    s = Scheduler(SchedulerConfig(max_running=2, token_budget=64, prefill_chunk=16, page_size=4))
    for i in range(3):
        s.add(seq(i, 8))
    plan = s.schedule(free_pages=100, held_pages={})
    assert [q.id for q, _ in plan.prefill] == [0, 1] and len(s.waiting) == 1
    s2 = Scheduler(SchedulerConfig(max_running=8, token_budget=64, prefill_chunk=16, page_size=4))
    for i in range(3):
        s2.add(seq(i, 8))
    assert [q.id for q, _ in s2.schedule(free_pages=4, held_pages={}).prefill] == [0, 1]  # 2 pages each


def test_youngest_is_preempted_when_pages_run_out():
    s = Scheduler(SchedulerConfig(max_running=4, token_budget=64, prefill_chunk=16, page_size=4))
    old, young = seq(0, 4), seq(1, 4)
    s.add(old)
    s.add(young)
    plan = s.schedule(free_pages=2, held_pages={})
    advance(plan)  # both prompts done: each holds 1 full page and needs a second to decode
    plan = s.schedule(free_pages=1, held_pages=held(s, plan))
    assert plan.decode == [old] and plan.preempted == [young]
    assert young.status is Status.WAITING and young.computed == 0 and s.waiting[0] is young


def test_a_prefill_waiting_for_pages_is_not_overtaken_by_newcomers():
    """Newcomers took every page that freed up, so a long prompt (or one with many copies) waited while the
    server stayed busy: under load on a small pool requests stalled for minutes."""
    s = Scheduler(SchedulerConfig(max_running=4, token_budget=64, prefill_chunk=8, page_size=4))
    long, short = seq(0, 16), seq(1, 2)
    s.add(long)
    plan = s.schedule(free_pages=2, held_pages={})
    advance(plan)  # its first chunk: 2 pages; the second needs 2 more
    s.add(short)
    plan = s.schedule(free_pages=1, held_pages=held(s, plan))
    assert not plan.prefill and s.waiting[0] is short  # the free page waits for the long prompt
    plan = s.schedule(free_pages=2, held_pages={0: 2})
    assert [(q.id, n) for q, n in plan.prefill] == [(0, 8)]


def test_prompts_holding_the_pages_each_other_needs_free_the_youngest():
    s = Scheduler(SchedulerConfig(max_running=4, token_budget=64, prefill_chunk=8, page_size=4))
    a, b = seq(0, 16), seq(1, 16)
    s.add(a)
    s.add(b)
    plan = s.schedule(free_pages=4, held_pages={})
    advance(plan)  # both hold their first chunk's 2 pages; each needs 2 more, none are free
    plan = s.schedule(free_pages=0, held_pages=held(s, plan))
    assert not plan.prefill and plan.preempted == [b] and b.computed == 0
    plan = s.schedule(free_pages=2, held_pages={0: 2})
    assert [(q.id, n) for q, n in plan.prefill] == [(0, 8)]


def test_queue_full_is_backpressure_past_the_free_running_slots():
    """A burst reaches an idle engine before its next step admits any of it: the free running slots count, so an
    idle server with max_running 4 and max_waiting 1 took one request of four and answered 429 to the others."""
    s = Scheduler(SchedulerConfig(max_running=2, max_waiting=2))
    for i in range(4):
        s.add(seq(i, 1))
    with pytest.raises(QueueFull, match=r"4 sequences are already waiting and this request needs 1; the most it "
                                        r"queues now: the 2 free running slots \(of max_running 2\) plus "
                                        r"max_waiting 2"):
        s.add(seq(4, 1))
    s.schedule(free_pages=64, held_pages={})  # two of them run: the queue takes max_waiting, no more
    assert len(s.running) == 2 and s.queue_room() == 0


def test_a_requests_copies_count_in_the_queue_as_in_the_batch():
    """A group of n copies is n sequences waiting too: five groups of 4 were queued on max_running 4 +
    max_waiting 1 (one free slot let in a whole group each), 20 sequences where 5 fit."""
    s = Scheduler(SchedulerConfig(max_running=4, max_waiting=1))
    first, second = seq(0, 1), seq(1, 1)
    first.forks = second.forks = 3
    s.add(first)
    with pytest.raises(QueueFull, match="4 sequences are already waiting and this request needs 4"):
        s.add(second)
    s.add(seq(2, 1))  # the one slot left
    assert s.queue_room() == 0


def test_config_rejects_impossible_budgets():
    with pytest.raises(ValueError, match="token_budget"):
        SchedulerConfig(max_running=32, token_budget=64, decode_tokens=3)
