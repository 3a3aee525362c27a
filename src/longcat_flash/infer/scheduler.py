"""Continuous batching without torch: which sequences run in the next step, and how many tokens each.

Every step, in this order (report §6.2.1 describes the production version):
  1. decode: every running sequence whose prompt is done gets its pending token (plus `lookahead` positions for
     speculative drafts); if the page pool cannot cover them, the youngest running sequence is preempted (its
     pages freed, recomputed later from its tokens: nothing generated is lost);
  2. prefill: running sequences still in their prompt get the next chunk (chunked prefill, so one long prompt
     never stalls the decoders);
  3. admission: waiting sequences join, oldest first, while the token budget, the running limit and the page
     pool allow.
The budget counts prefill rows at their padded length, since the engine runs them as one padded forward.

A sequence's `tokens` are its prompt followed by what it generated; `computed` of them are in the cache. A
scheduled sequence processes tokens[computed : computed + n]; when that reaches the end, the engine samples.
"""
from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum


class QueueFull(RuntimeError):
    """More waiting requests than the running slots free and `max_waiting`: retry later (HTTP 429)."""


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class SequenceState:
    id: int
    tokens: list[int]
    prompt_len: int
    computed: int = 0
    status: Status = Status.WAITING
    arrival: int = 0
    forks: int = 0  # copies to fork off once the prompt is in the cache (n > 1); each needs its own last pages

    @property
    def remaining(self) -> int:
        """Tokens not yet in the cache; 1 means decoding (the last sampled token is pending)."""
        return len(self.tokens) - self.computed

    @property
    def to_prefill(self) -> int:
        """Tokens prefill still has to run: the prompt's; for a sequence recomputing after a preemption, all but
        its pending last token, which the next decode step runs as it would have without the preemption (so a
        seeded sequence draws the same numbers, and a speculating one verifies the drafts it had)."""
        return self.remaining - (len(self.tokens) > self.prompt_len)

    @property
    def decoding(self) -> bool:
        """Past its prompt, one pending token (the last sampled one). A prompt always ends in a prefill chunk, even
        one token long: prefill is where a prompt's first token is sampled, its copies fork off, and a request
        that only scores its prompt finishes."""
        return self.remaining == 1 and len(self.tokens) > self.prompt_len


@dataclass(frozen=True)
class SchedulerConfig:
    max_running: int = 32
    token_budget: int = 1024  # tokens per step, prefill rows counted padded
    prefill_chunk: int = 512
    page_size: int = 16
    max_waiting: int = 256
    decode_tokens: int = 1  # tokens a decoding sequence runs per step (1 + speculative drafts)
    lookahead: int = 0  # cache positions past its tokens a sequence needs (speculative drafts)

    def __post_init__(self) -> None:
        for name in ("max_running", "token_budget", "prefill_chunk", "page_size", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"SchedulerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.token_budget < self.max_running * self.decode_tokens:
            raise ValueError(f"token_budget={self.token_budget} cannot fit max_running={self.max_running} decoding "
                             f"rows of {self.decode_tokens} tokens each (1 + speculative): give at least "
                             f"{self.max_running * self.decode_tokens}")


@dataclass
class Plan:
    decode: list[SequenceState] = field(default_factory=list)
    prefill: list[tuple[SequenceState, int]] = field(default_factory=list)  # (sequence, tokens this step)
    preempted: list[SequenceState] = field(default_factory=list)
    capacity: dict[int, int] = field(default_factory=dict)  # sequence id -> positions its pages must cover
    # the step's page ledger, from the pool's counts: pages each sequence holds (with this step's reservations),
    # and of those the pages forked copies hold too (preempting the sequence does not free them)
    held: dict[int, int] = field(default_factory=dict)
    shared: dict[int, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[SequenceState] = deque()
        self.running: list[SequenceState] = []
        self._arrivals = itertools.count()

    def pages_for(self, n_positions: int) -> int:
        return -(-n_positions // self.config.page_size)

    def copy_pages(self, prompt_len: int) -> int:
        """The pages a copy forked off at the end of a prompt needs for itself (PagedLatentCache.fork): from the
        page holding the prompt's last position to the drafts' room past it."""
        return self.pages_for(prompt_len + self.config.lookahead) - (prompt_len - 1) // self.config.page_size

    def prompt_pages(self, prompt_len: int, forks: int) -> int:
        """The pages a prompt's last prefill chunk reserves at once (`_reserve`): its own, with the drafts' room,
        and each of its `forks` copies' own."""
        return self.pages_for(prompt_len + self.config.lookahead) + forks * self.copy_pages(prompt_len)

    @staticmethod
    def slots(seqs: Iterable[SequenceState]) -> int:
        """The sequences `seqs` stand for: each, and the copies still to fork off it (they join the batch at
        their prompt's end). `max_running` and `max_waiting` count these."""
        return sum(1 + seq.forks for seq in seqs)

    def _has_slots(self, seq: SequenceState) -> bool:
        """Whether admitting `seq` keeps the batch within `max_running`, its copies counted; a group larger than
        `max_running` is admitted alone (the server refuses n above it; the engine's own callers may ask for it)."""
        return not self.running or self.slots(self.running) + self.slots([seq]) <= self.config.max_running

    def queue_room(self) -> int:
        """Sequences `add` takes now (a request's n copies are n): the running slots free (a burst reaches the
        queue before the next step admits any of it) plus `max_waiting`, less those already waiting."""
        free = max(self.config.max_running - self.slots(self.running), 0)
        return free + self.config.max_waiting - self.slots(self.waiting)

    def check_room(self, slots: int) -> None:
        """Raise QueueFull unless `add` takes sequences standing for `slots` now."""
        if self.queue_room() < slots:
            free = max(self.config.max_running - self.slots(self.running), 0)
            raise QueueFull(f"{self.slots(self.waiting)} sequences are already waiting and this request needs "
                            f"{slots}; the most it queues now: the {free} free running slots (of "
                            f"max_running {self.config.max_running}) plus max_waiting {self.config.max_waiting}")

    def add(self, seq: SequenceState) -> None:
        self.check_room(self.slots([seq]))
        seq.status, seq.arrival = Status.WAITING, next(self._arrivals)
        self.waiting.append(seq)

    def adopt(self, seq: SequenceState) -> None:
        """Run a copy forked off a running sequence: its prompt is already in the cache, so it skips the queue.
        Its slot was kept for it since its group's first copy was admitted (`slots`)."""
        seq.status, seq.arrival = Status.RUNNING, next(self._arrivals)
        self.running.append(seq)

    def finish(self, seq: SequenceState) -> None:
        """Drop a finished or cancelled sequence (its pages are freed by the caller)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, free_pages: int, held_pages: dict[int, int], shared_pages: dict[int, int] | None = None
                 ) -> Plan:
        """Plan one step given the pool's free pages, the pages each sequence holds now and how many of those it
        shares with forked copies."""
        plan = Plan(held=dict(held_pages), shared=dict(shared_pages or {}))
        free_pages = self._schedule_decode(plan, free_pages)
        budget = max(self.config.token_budget - len(plan.decode) * self.config.decode_tokens, 0)
        blocked = False
        for seq in [s for s in self.running if not s.decoding]:
            if (left := self._try_prefill(plan, seq, budget, free_pages)) is None:
                blocked = True  # it waits for pages: newcomers must not take the ones that free up first
                break
            free_pages = left
        while not blocked and self.waiting and self._has_slots(self.waiting[0]):
            if self.waiting[0] in plan.preempted:  # it gave its pages to an older sequence this very step
                break
            if (left := self._try_prefill(plan, self.waiting[0], budget, free_pages)) is None:
                break
            free_pages = left
            seq = self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
        if blocked and not plan and len(self.running) > 1:  # prompts in prefill hold the pages each other needs
            self._preempt(plan, max(self.running, key=lambda s: s.arrival))
        return plan

    def _reserve(self, plan: Plan, seq: SequenceState, n_tokens: int, free_pages: int) -> int | None:
        """Plan pages for n_tokens more of seq; the new free-page count, or None if they do not fit. A chunk that
        ends a recomputation also plans the pending token's position, so the decode step that follows needs no
        new page (a sequence preempted again before it ran would never progress)."""
        ends_recompute = len(seq.tokens) > seq.prompt_len and seq.computed + n_tokens == len(seq.tokens) - 1
        target = seq.computed + n_tokens + self.config.lookahead + ends_recompute
        held = plan.held.get(seq.id, 0)
        need = max(self.pages_for(target) - held, 0)
        forks = 0
        if seq.forks and seq.computed + n_tokens >= len(seq.tokens):
            forks = seq.forks * self.copy_pages(seq.computed + n_tokens)
        if need + forks > free_pages:
            return None
        plan.held[seq.id] = held + need
        plan.capacity[seq.id] = target
        return free_pages - need - forks

    def _schedule_decode(self, plan: Plan, free_pages: int) -> int:
        decoding = [s for s in self.running if s.decoding]
        for seq in sorted(decoding, key=lambda s: s.arrival):  # oldest first: they keep their pages
            if seq.status is not Status.RUNNING:
                continue  # preempted a moment ago to make room for an older one
            while (left := self._reserve(plan, seq, 1, free_pages)) is None:
                younger = [s for s in self.running if s.arrival > seq.arrival and s not in plan.decode]
                victim = max(younger, key=lambda s: s.arrival) if younger else seq
                free_pages += self._preempt(plan, victim)
                if victim is seq:
                    break
            else:
                free_pages = left
                plan.decode.append(seq)
        return free_pages

    def _preempt(self, plan: Plan, victim: SequenceState) -> int:
        """Send a running sequence back to the front of the queue; returns the pages it frees."""
        self.running.remove(victim)
        victim.computed, victim.status = 0, Status.WAITING
        self.waiting.appendleft(victim)
        plan.preempted.append(victim)
        plan.capacity.pop(victim.id, None)
        return plan.held.pop(victim.id, 0) - plan.shared.get(victim.id, 0)

    def _try_prefill(self, plan: Plan, seq: SequenceState, budget: int, free_pages: int) -> int | None:
        """Add the next prompt chunk of seq if the padded budget and the pool allow; the new free-page count."""
        n = min(seq.to_prefill, self.config.prefill_chunk)
        if not plan.prefill:
            n = min(n, budget)  # a lone chunk shrinks to the budget, so prefill always progresses
        longest = max([n, *(m for _, m in plan.prefill)])
        if n < 1 or (len(plan.prefill) + 1) * longest > budget:
            return None
        left = self._reserve(plan, seq, n, free_pages)
        if left is not None:
            plan.prefill.append((seq, n))
        return left
