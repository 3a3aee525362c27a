"""The inference engine: token ids in, token ids out. `Engine.step()`: schedule -> forward -> sample -> update.

One step runs up to three trunk forwards over the paged latent cache (plus the MTP head's for drafts): the rows
verifying MTP drafts (1 + k tokens each), the other decoding rows (1 token each; requests with logit controls or a
grammar never get drafts), and the prefill chunks (padded into one batch). Each forward attends absorbed over the
latent when its rows are short and on the naive path, cheaper for long rows, otherwise (`PagedLatentCache.view`;
docs/architecture.md §6.3). Logits are computed only where a token is sampled,
and at every prompt position only for requests that asked for prompt logprobs (`SamplingParams.prompt_logprobs`,
what evaluators score prompts with); a request with `max_new_tokens=0` finishes after its prefill.
`add_copies` runs n copies of one prompt (OpenAI's `n`): the first prefills it, the others fork its cache pages
(`PagedLatentCache.fork`) and sample from its last row, each with its own params and generator.
Text, chat templates and stop strings live in the server and CLI; they reach the engine as a `stop` callback.
A request's logit controls (penalties, logit_bias: sampling.adjust) apply to its row only, inside the batch; with
MTP speculation, requests with any control (min_p included) decode one token per step without drafts, because the
drafts' and the verifier's distributions would both need them (docs/serving.md §3.2).
A request with a grammar (`SamplingParams.grammar`: structured output, constrained tool calls) owns a matcher,
copies each their own: its row is masked to the tokens the grammar allows (after the logit controls), the matcher
advances with each token, and the request ends with "stop" once the grammar is complete; with MTP it gets no
drafts either (docs/serving.md §3.3).

Shapes: B rows, S tokens per row, D model dim, V vocabulary.
"""
from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields

import torch
from torch.nn.utils.rnn import pad_sequence

from .cache import ABSORB_MAX_TOKENS, CacheConfig, PagedLatentCache, padded_batch
from .sampling import SamplingParams, TokenLogprob, TokenMask, adjust_rows, mask_rows, sample, token_logprobs
from .scheduler import Scheduler, SchedulerConfig, SequenceState
from .speculative import Draft, DraftStats, MTPDrafter, verify

StopHook = Callable[[list[int]], bool]  # generated ids so far -> stop now (text stop strings, from the server)
log = logging.getLogger(__name__)


MAX_SPECULATIVE = 16  # drafts per step: the chance that all k are accepted falls geometrically with k


class PromptRefused(ValueError):
    """Engine.add_jobs refused the prompt at `index` of its jobs (and so all of them)."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index

    def __reduce__(self) -> tuple:  # it crosses from the engine process to the server's
        return PromptRefused, (self.index, str(self))


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 32
    token_budget: int = 1024  # tokens per step (prefill rows counted padded)
    prefill_chunk: int = 512
    page_size: int = 16
    cache_tokens: int = 65536  # pool size in tokens, over all sequences
    max_waiting: int = 256
    speculative: int = 0  # MTP drafts per step; 0 = off
    absorb_max_tokens: int = ABSORB_MAX_TOKENS  # rows of at most this many tokens attend absorbed; longer naive

    def __post_init__(self) -> None:
        for f in fields(self):
            value, least = getattr(self, f.name), 0 if f.name in ("speculative", "absorb_max_tokens") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"EngineConfig.{f.name} must be an integer >= {least}, got {value!r}")
        if self.speculative > MAX_SPECULATIVE:
            raise ValueError(f"speculative must be at most {MAX_SPECULATIVE} MTP drafts per step, got "
                             f"{self.speculative} (each further draft is accepted less often; 1 to 3 is usual)")
        self.scheduler_config()  # its checks too, here rather than when an Engine is built

    def scheduler_config(self) -> SchedulerConfig:
        # A decoding row writes its k drafts' trunk slots and then chains k more MTP slots: 2k positions ahead.
        return SchedulerConfig(max_running=self.max_running, token_budget=self.token_budget,
                               prefill_chunk=self.prefill_chunk, page_size=self.page_size,
                               max_waiting=self.max_waiting, decode_tokens=1 + self.speculative,
                               lookahead=2 * self.speculative)


GRAMMAR_FAILED = "grammar_failed"  # the request's grammar hit a parser limit mid-output (a schema that never ends)
NON_FINITE = "non_finite_logits"  # the model's logits for a request hold NaN or +Inf: nothing to sample from


@dataclass
class StepOutput:
    request_id: int
    new_tokens: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS, stop token, stop hook), "length", or "error" (see `error`)
    stop_token: bool = False  # the last new token ended the request (an EOS or stop token): not part of the text
    error: str | None = None  # why the output stopped incomplete, and which kind (`error_code`):
    error_code: str | None = None  # GRAMMAR_FAILED or NON_FINITE
    logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asked (params.logprobs)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # the whole prompt's, the first None (no context)


@dataclass(eq=False)
class Request:
    seq: SequenceState
    params: SamplingParams
    generator: torch.Generator
    max_len: int  # prompt + max_new_tokens, capped by the context
    stop: StopHook | None = None
    draft: Draft | None = None
    prompt_scores: list[TokenLogprob | None] = field(default_factory=list)  # prompt tokens scored so far
    forks: list[Request] = field(default_factory=list)  # copies waiting for this prompt's cache (add_copies)
    matcher: TokenMask | None = None  # this sequence's grammar state, when params.grammar constrains it

    @property
    def scores_prompt(self) -> bool:
        return self.params.prompt_logprobs is not None

    @property
    def generated(self) -> list[int]:
        return self.seq.tokens[self.seq.prompt_len:]


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0  # ended by an error: non-finite logits, a failed grammar, a step that raised (cancel(failed=True))
    preempted: int = 0
    drafts: DraftStats = field(default_factory=DraftStats)


class Engine:
    def __init__(self, model: torch.nn.Module, config: EngineConfig | None = None,
                 eos_ids: Iterable[int] = ()) -> None:
        """eos_ids: ids that end generation besides the model config's (loader.load_engine adds the tokenizer's).
        An engine is driven from one thread at a time (the server runs it on its own thread or process)."""
        if config is not None and not isinstance(config, EngineConfig):  # a dict was an AttributeError deep inside
            raise TypeError(f"config must be an EngineConfig (EngineConfig(**settings)), got {type(config).__name__}")
        self.model, self.config = model.eval(), config or EngineConfig()
        cfg = model.config
        self.dtype, self.device = model.model.embed_tokens.weight.dtype, model.model.embed_tokens.weight.device
        k = self.config.speculative
        cache_cfg = CacheConfig.for_model(cfg, max_tokens=self.config.cache_tokens, page_size=self.config.page_size,
                                          with_mtp=k > 0, dtype=self.dtype)
        self.cache = PagedLatentCache(cache_cfg, device=self.device, absorb_max_tokens=self.config.absorb_max_tokens)
        self.scheduler = Scheduler(self.config.scheduler_config())
        self.drafter = MTPDrafter(model, self.cache, k) if k else None
        self.requests: dict[int, Request] = {}
        self.stats = EngineStats()
        self.max_queued = self.config.max_running + self.config.max_waiting  # sequences an idle engine takes
        lookahead = self.scheduler.config.lookahead  # a sequence of L tokens decodes at L + lookahead positions
        self.max_context = min(cfg.max_position_embeddings, (cache_cfg.num_pages - 1) * cache_cfg.page_size - lookahead)
        if self.max_context < 2:
            raise ValueError(f"cache_tokens={self.config.cache_tokens} cannot hold a sequence of 2 tokens"
                             + (f" with {k} drafts" if k else ""))
        if self.max_context < cfg.max_position_embeddings:  # else a sequence could outgrow the pool and never run
            pool = (cache_cfg.num_pages - 1) * cache_cfg.page_size
            drafts = f", of which a sequence keeps {lookahead} for its drafts" if lookahead else ""
            log.warning("sequences are limited to %d tokens, fewer than the model's context (%d): the KV cache holds "
                        "%d positions (cache_tokens=%d in whole pages of %d)%s", self.max_context,
                        cfg.max_position_embeddings, pool, self.config.cache_tokens, cache_cfg.page_size, drafts)
        self.vocab_size, self.eos_ids = cfg.vocab_size, tuple(dict.fromkeys((*cfg.eos_token_ids, *eos_ids)))
        if any(not 0 <= token < self.vocab_size for token in self.eos_ids):
            raise ValueError(f"eos ids must be in [0, {self.vocab_size}), got {list(self.eos_ids)}")
        self._ids = itertools.count()

    # ---- requests ----
    def add_request(self, prompt: list[int], params: SamplingParams | None = None,
                    stop: StopHook | None = None) -> int:
        """Queue a prompt (token ids); returns its request id. Raises ValueError or QueueFull."""
        return self.add_copies(prompt, [params or SamplingParams()], [stop])[0]

    def add_copies(self, prompt: list[int], params: list[SamplingParams],
                   stops: list[StopHook | None] | None = None) -> list[int]:
        """Queue len(params) copies of one prompt, copy j with params[j] and stops[j]; their request ids in order.

        Only the first copy enters the queue: the prompt is prefilled once, then the others fork its pages, so n
        samples cost one prefill and one prompt's worth of cache. Raises ValueError or QueueFull for all of them.
        """
        if stops is not None and len(stops) != len(params):
            raise ValueError(f"add_copies got {len(params)} SamplingParams and {len(stops)} stops: give one stop "
                             "(or None) per copy")
        self._check_copies(prompt, params)
        return self._admit(prompt, params, stops or [None] * len(params))

    def add_jobs(self, jobs: list[tuple[list[int], list[SamplingParams]]]) -> list[list[int]]:
        """Queue several prompts' copies (add_copies) all or none: one refused (PromptRefused naming it, or
        QueueFull for the whole) leaves the engine as it was, with nothing admitted, counted or to cancel."""
        for index, (prompt, params) in enumerate(jobs):
            try:
                self._check_copies(prompt, params)
            except ValueError as err:
                raise PromptRefused(index, str(err)) from None
        self.scheduler.check_room(sum(len(params) for _, params in jobs))
        return [self._admit(prompt, params, [None] * len(params)) for prompt, params in jobs]

    def _check_copies(self, prompt: list[int], params: list[SamplingParams]) -> None:
        """Raise ValueError if these copies of `prompt` could never be served (a QueueFull is for a retry)."""
        if not params or not all(isinstance(sp, SamplingParams) for sp in params):
            raise ValueError("add_copies needs one SamplingParams per copy, at least one")
        self._validate(prompt, scoring=all(sp.max_new_tokens == 0 for sp in params))
        if any(token >= self.vocab_size for sp in params for token, _ in sp.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {self.vocab_size})")
        if any(token >= self.vocab_size for sp in params for token in sp.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {self.vocab_size})")
        need = self.scheduler.prompt_pages(len(prompt), forks=len(params) - 1)
        if need > self.cache.config.num_pages - 1:
            raise ValueError(f"{len(params)} copies of a {len(prompt)}-token prompt need {need} cache pages at "
                             f"once; the KV cache holds {self.cache.config.num_pages - 1}: ask for fewer copies")
        if len(params) > self.max_queued:  # it could never be queued: not the QueueFull a retry may get past
            raise ValueError(f"{len(params)} copies are more than this engine queues at once (max_running + "
                             f"max_waiting = {self.max_queued})")

    def _admit(self, prompt: list[int], params: list[SamplingParams], stops: list[StopHook | None]) -> list[int]:
        """Queue checked copies (QueueFull if the queue has no room for them)."""
        reqs = [self._request(prompt, sp, stop) for sp, stop in zip(params, stops, strict=True)]
        first = reqs[0]
        first.forks, first.seq.forks = reqs[1:], len(reqs) - 1
        self.scheduler.add(first.seq)
        self.requests.update((r.seq.id, r) for r in reqs)
        self.stats.prompt_tokens += len(prompt)
        return [r.seq.id for r in reqs]

    def _request(self, prompt: list[int], params: SamplingParams, stop: StopHook | None) -> Request:
        seq = SequenceState(next(self._ids), list(prompt), prompt_len=len(prompt))
        max_len = min(len(prompt) + params.max_new_tokens, self.max_context)
        matcher = params.grammar.matcher() if params.grammar is not None else None
        return Request(seq, params, params.generator(self.device), max_len, stop, matcher=matcher)

    def _validate(self, prompt: list[int], scoring: bool = False) -> None:
        """`scoring`: nothing is generated (max_new_tokens 0, for the prompt's logprobs), so the prompt may fill
        the whole context."""
        if not isinstance(prompt, (list, tuple)) or not all(type(t) is int for t in prompt):
            raise TypeError(f"a prompt is a list of int token ids, got {prompt!r:.80}")
        if not prompt:
            raise ValueError("prompt must hold at least one token")
        if len(prompt) > self.max_context or (len(prompt) == self.max_context and not scoring):
            capped = "" if self.max_context == self.model.config.max_position_embeddings else " (the KV cache's limit)"
            room = "which it does not fit" if len(prompt) > self.max_context else "which leaves no room to generate"
            raise ValueError(f"prompt has {len(prompt)} tokens; the context is {self.max_context}{capped}, {room}")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")

    def cancel(self, request_id: int, failed: bool = False) -> list[int]:
        """Stop a request now and free its cache pages; the ids stopped, [] if it is unknown or already finished.
        Copies still waiting to fork off it (add_copies) stop with it: there is no prompt cache left to fork.
        `failed`: counted as failed, not cancelled (its step raised)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return []
        for first in self.requests.values():  # a copy still waiting to fork: its first no longer reserves its pages
            if req in first.forks:
                first.forks.remove(req)
                first.seq.forks = len(first.forks)
                break
        self.scheduler.finish(req.seq)
        self.cache.free(request_id)
        if failed:
            self.stats.failed += 1
        else:
            self.stats.cancelled += 1
        return [request_id, *(rid for copy in req.forks for rid in self.cancel(copy.seq.id, failed))]

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- one step ----
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        held = {rid: len(table) for rid, table in self.cache.tables.items()}
        shared = {rid: self.cache.shared_pages(rid) for rid in held}
        plan = self.scheduler.schedule(self.cache.free_pages, held, shared)
        for seq in plan.preempted:  # its draft stays: recomputed, it verifies it as it would have (to_prefill)
            self.cache.free(seq.id)
            self.stats.preempted += 1
        for rid, n_positions in plan.capacity.items():
            self.cache.ensure(rid, n_positions)
        outputs: list[StepOutput] = []
        if plan.decode:
            outputs += self._decode_rows(plan.decode)
        if plan.prefill:
            outputs += self._prefill(plan.prefill)
        self.stats.steps += bool(plan)
        return outputs

    def _forward(self, seqs: list[SequenceState], chunks: list[list[int]]) -> torch.Tensor:
        """Trunk forward over each seq's chunk at positions computed.., padded -> final hidden (B, S, D)."""
        ids, positions = padded_batch(chunks, [s.computed for s in seqs])  # (B, S) each, on the host
        view = self.cache.view([s.id for s in seqs], positions)  # also picks the attention path for this S
        ids, positions = (t.to(self.device, non_blocking=True) for t in (ids, positions.clamp(min=0)))
        return self.model(ids, positions, view, compute_logits=False).final_hidden

    def _decode_rows(self, seqs: list[SequenceState]) -> list[StepOutput]:
        """Speculate for the rows that have drafts; requests with logit controls never get drafts (`_draft`), so
        they decode one token per step, in their own forward."""
        if not self.drafter:
            return self._decode(seqs)
        drafted = [s for s in seqs if self.requests[s.id].draft is not None]
        plain = [s for s in seqs if self.requests[s.id].draft is None]
        return (self._speculative(drafted) if drafted else []) + (self._decode(plain) if plain else [])

    def _decode(self, seqs: list[SequenceState]) -> list[StepOutput]:
        hidden = self._forward(seqs, [[s.tokens[-1]] for s in seqs])  # (B, 1, D)
        for seq in seqs:
            seq.computed += 1
        return self._sample_and_append(seqs, self.model.lm_head(hidden[:, 0]))

    def _prefill(self, rows: list[tuple[SequenceState, int]]) -> list[StepOutput]:
        seqs = [s for s, _ in rows]
        starts = [s.computed for s in seqs]
        hidden = self._forward(seqs, [s.tokens[s.computed:s.computed + n] for s, n in rows])  # (B, S, D)
        for b, (seq, n) in enumerate(rows):
            if (req := self.requests[seq.id]).scores_prompt:
                self._score_prompt(req, starts[b], hidden[b, :n])
            seq.computed += n
        done = self._fork_copies([(s, b) for b, s in enumerate(seqs) if s.remaining == 0])  # (seq, hidden row)
        scored_only = [seq for seq, _ in done if self._prompt_only(seq)]
        done = [(seq, b) for seq, b in done if seq not in scored_only]
        outputs = [self._finish_prompt_only(self.requests[seq.id]) for seq in scored_only]
        if done:
            rows_b, last = [b for _, b in done], [rows[b][1] - 1 for _, b in done]
            logits = self.model.lm_head(hidden[rows_b, last])  # (len(done), V); list indices land on hidden's device
            outputs += self._sample_and_append([seq for seq, _ in done], logits)
        if self.drafter:
            self._draft_prefilled(seqs, starts, hidden, done)
        return outputs

    def _fork_copies(self, done: list[tuple[SequenceState, int]]) -> list[tuple[SequenceState, int]]:
        """The sequences whose prompt is now in the cache, each followed by the copies waiting on it (add_copies),
        forked now: they share its pages and sample their first token from its hidden row b, as it does."""
        out = []
        for seq, b in done:
            req = self.requests[seq.id]
            out.append((seq, b))
            for copy in req.forks:  # cancelled copies left the list (cancel)
                self.cache.fork(seq.id, copy.seq.id, seq.computed)
                self.cache.ensure(copy.seq.id, seq.computed + self.scheduler.config.lookahead)  # its drafts' room
                copy.seq.computed, copy.prompt_scores = seq.computed, list(req.prompt_scores)
                self.scheduler.adopt(copy.seq)
                out.append((copy.seq, b))
            req.forks, seq.forks = [], 0
        return out

    def _draft_prefilled(self, seqs: list[SequenceState], starts: list[int], hidden: torch.Tensor,
                         forked: list[tuple[SequenceState, int]]) -> None:
        """Draft for the rows just prefilled (hidden (B, S, D) from starts) and for the copies forked off them
        (`forked`: (seq, hidden row)), which extend the MTP head from their prompt's row. The head's entries below
        the page holding a prompt's last position lie in pages a group shares and are the same for all of its
        members: one live member extends over the whole chunk, the others over their own pages only."""
        members = {s.id: (s, b) for b, s in enumerate(seqs)} | {s.id: (s, b) for s, b in forked}
        rows: dict[int, tuple[int, torch.Tensor]] = {}
        covered: set[int] = set()  # hidden rows whose shared pages a member already extends over
        for sid, (seq, b) in members.items():
            if sid not in self.requests or self.requests[sid].params.controlled:
                continue  # finished with its first token, or gets no drafts
            begin = max(starts[b], self.cache.shared_positions(seq.computed)) if b in covered else starts[b]
            covered.add(b)
            rows[sid] = (begin, hidden[b, begin - starts[b]:])
        self._draft([members[sid][0] for sid in rows], rows)

    def _score_prompt(self, req: Request, start: int, hidden: torch.Tensor) -> None:
        """Logprobs of the prompt tokens this chunk predicts: hidden (n, D) at positions start..start+n-1 predicts
        tokens start+1..start+n. A chunk recomputed after a preemption scores nothing twice."""
        if not req.prompt_scores:
            req.prompt_scores.append(None)  # the first token has no context to be predicted from
        first, end = len(req.prompt_scores), min(start + hidden.shape[0] + 1, req.seq.prompt_len)
        if first >= end:
            return
        logits = self.model.lm_head(hidden[first - 1 - start:end - 1 - start])  # (end - first, V)
        req.prompt_scores += token_logprobs(logits, req.seq.tokens[first:end], req.params.prompt_logprobs)

    def _prompt_only(self, seq: SequenceState) -> bool:
        """A request that asked for no new tokens (max_new_tokens=0: scoring the prompt) is done after prefill."""
        return len(seq.tokens) >= self.requests[seq.id].max_len

    def _finish_prompt_only(self, req: Request) -> StepOutput:
        out = StepOutput(req.seq.id, [], finish_reason="length")
        self._attach_logprobs(req, out, None)
        return self._finish(req, out)

    def _speculative(self, seqs: list[SequenceState]) -> list[StepOutput]:
        """Verify each row's k drafts in one trunk forward, keep the accepted prefix, roll back, draft again."""
        reqs = [self.requests[s.id] for s in seqs]
        starts = [s.computed for s in seqs]
        hidden = self._forward(seqs, [[s.tokens[-1], *r.draft.tokens] for s, r in zip(seqs, reqs)])  # (B, k+1, D)
        logits = self.model.lm_head(hidden)  # (B, k+1, V)
        outputs, alive = [], {}
        for b, (seq, req, finite) in enumerate(zip(seqs, reqs, self._finite_rows(logits.amax(-1)))):
            if not finite:
                outputs.append(self._fail_non_finite(seq))
                continue
            emitted = verify(logits[b], req.draft, req.params, req.generator)
            drafted = len(req.draft.tokens)
            req.draft = None
            seq.computed += len(emitted)  # x_T and the accepted drafts are now valid cache entries
            self.cache.truncate(seq.id, seq.computed)
            out = self._append(req, emitted, logits[b])
            self._count_draft(drafted, len(emitted) - 1, len(out.new_tokens))
            outputs.append(out)
            if not out.finished:
                self.cache.ensure(seq.id, seq.computed + self.drafter.k)  # room for the next chain
                alive[seq.id] = (starts[b], hidden[b])
        self._draft([s for s in seqs if s.id in alive], alive)
        return outputs

    def _draft(self, seqs: list[SequenceState], rows: dict[int, tuple[int, torch.Tensor]]) -> None:
        """MTP extend for sequences whose trunk just covered positions start..computed-1, then a chain of drafts for
        those past their prompt with a sampled token pending and no draft (a prompt in prefill has none, even with
        one token left, and a sequence recomputed after a preemption still has its own: they only write the head's
        cache, and draw no random numbers). Requests with logit controls never come here (the MTP head's
        distributions do not model them): `_draft_prefilled` leaves them out, and `_speculative` has only rows that
        were drafted.

        rows: sequence id -> (start, that forward's final hidden row from start (S_b, D), S_b >= computed - start).
        """
        if not seqs:
            return
        starts = [rows[s.id][0] for s in seqs]
        next_ids = [s.tokens[start + 1:s.computed + 1] for s, start in zip(seqs, starts)]
        hidden = pad_sequence([rows[s.id][1] for s in seqs], batch_first=True)  # (B, S, D)
        z = self.drafter.extend([s.id for s in seqs], next_ids, hidden, starts)  # (B, D)
        ready = [b for b, s in enumerate(seqs) if s.decoding and self.requests[s.id].draft is None]
        if not ready:
            return
        reqs = [self.requests[seqs[b].id] for b in ready]
        drafts = self.drafter.chain([r.seq.id for r in reqs], z[ready], [r.seq.computed - 1 for r in reqs],
                                    [r.params for r in reqs], [r.generator for r in reqs])
        for req, draft in zip(reqs, drafts):
            req.draft = draft

    def _count_draft(self, drafted: int, accepted: int, used: int) -> None:
        """One round: `drafted` drafts verified, `accepted` of them kept, `used` tokens of those it emitted reaching
        the output. Cut short by the request's end (used <= accepted), only the drafts before the end count."""
        if used <= accepted:
            drafted = accepted = used
        d = self.stats.drafts
        d.rounds, d.drafted, d.accepted, d.emitted = (d.rounds + 1, d.drafted + drafted, d.accepted + accepted,
                                                       d.emitted + used)

    # ---- outputs ----
    def _sample_and_append(self, seqs: list[SequenceState], logits: torch.Tensor) -> list[StepOutput]:
        top, best = logits.max(-1)  # (B,) each: one reduction for the finite check and greedy's argmax
        finite, best = self._finite_rows(top), best.tolist()
        failed = [self._fail_non_finite(s) for s, ok in zip(seqs, finite) if not ok]
        if failed:
            kept = [b for b, ok in enumerate(finite) if ok]
            seqs, logits, best = [seqs[b] for b in kept], logits[kept], [best[b] for b in kept]
            if not seqs:
                return failed
        reqs = [self.requests[s.id] for s in seqs]
        params = [r.params for r in reqs]
        adjusted = adjust_rows(logits, params, [(s.tokens, s.prompt_len) for s in seqs])  # (B, V)
        if any(r.matcher is not None for r in reqs):
            adjusted = mask_rows(adjusted, [r.matcher for r in reqs])
        tokens = sample(adjusted, params, [r.generator for r in reqs], best if adjusted is logits else None)
        return failed + [self._append(req, [t], logits[b:b + 1]) for b, (req, t) in enumerate(zip(reqs, tokens))]

    @staticmethod
    def _finite_rows(maxima: torch.Tensor) -> list[bool]:
        """maxima (B, ...): the largest logit at each position -> per row, whether all its logits are free of NaN and
        +Inf (what argmax and sampling cannot use: a NaN row's argmax is token 0, and sampling fails); a NaN makes
        its position's max NaN, a +Inf makes it +Inf. One host transfer."""
        return [all(map(math.isfinite, row)) for row in maxima.reshape(maxima.shape[0], -1).tolist()]

    def _fail_non_finite(self, seq: SequenceState) -> StepOutput:
        """End a request whose logits are not finite: its activations overflowed the dtype, or a weight is NaN."""
        dtype = str(self.dtype).removeprefix("torch.")
        out = StepOutput(seq.id, [], finish_reason="error", error_code=NON_FINITE,
                         error=f"the model's logits are NaN or Inf after {len(seq.tokens) - seq.prompt_len} "
                               f"generated tokens (its activations overflowed {dtype}, or a weight is not finite)")
        return self._finish(self.requests[seq.id], out)

    def _append(self, req: Request, tokens: Iterable[int], logits: torch.Tensor) -> StepOutput:
        """Append sampled tokens one by one until a stop condition; finish the request if one holds.

        logits (len(tokens), V): the positions the tokens were sampled at, for the request's logprobs.
        """
        out = StepOutput(req.seq.id, [])
        for token in tokens:
            req.seq.tokens.append(token)
            out.new_tokens.append(token)
            out.finish_reason = self._finish_reason(req, token)
            if out.finish_reason:
                if out.finish_reason == "error":
                    out.error, out.error_code = req.matcher.error, GRAMMAR_FAILED
                out.stop_token = out.finish_reason == "stop" and self._is_stop_token(req, token)
                break
        self.stats.generated_tokens += len(out.new_tokens)
        self._attach_logprobs(req, out, logits)
        return self._finish(req, out) if out.finish_reason else out

    def _attach_logprobs(self, req: Request, out: StepOutput, logits: torch.Tensor | None) -> None:
        """What the request asked to see: its new tokens' logprobs (logits (>= len(new_tokens), V)), and with its
        first output the prompt's, which are then complete."""
        if req.params.logprobs is not None and out.new_tokens:
            out.logprobs = token_logprobs(logits[:len(out.new_tokens)], out.new_tokens, req.params.logprobs)
        if req.scores_prompt and len(req.seq.tokens) == req.seq.prompt_len + len(out.new_tokens):
            out.prompt_logprobs = req.prompt_scores

    def _finish(self, req: Request, out: StepOutput) -> StepOutput:
        """Retire a request whose output carries its finish reason: free its pages, count it (failed if it carries
        an error)."""
        out.finished = True
        self.requests.pop(req.seq.id)
        self.scheduler.finish(req.seq)
        self.cache.free(req.seq.id)
        if out.error is None:
            self.stats.finished += 1
        else:
            self.stats.failed += 1
        return out

    def _is_stop_token(self, req: Request, token: int) -> bool:
        """An id that ends the request by itself: an EOS (unless ignore_eos) or one of its stop_token_ids."""
        return (token in self.eos_ids and not req.params.ignore_eos) or token in req.params.stop_token_ids

    def _finish_reason(self, req: Request, token: int) -> str | None:
        if req.matcher is not None:  # an EOS completes the grammar where it accepts, and fails it anywhere else
            req.matcher.advance(token)
            if req.matcher.error is not None:
                return "error"
            if req.matcher.done:
                return "stop"
        if self._is_stop_token(req, token):
            return "stop"
        if req.stop is not None and req.stop(req.generated):
            return "stop"
        if len(req.seq.tokens) >= req.max_len:
            return "length"
        return None

    # ---- convenience ----
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[list[int]]:
        """Run prompts to completion, continuously batched; generated ids per prompt. Any number of prompts: they
        join the queue as it has room (Scheduler.queue_room). The engine must hold no other request (add_request's are
        driven by step()). A request that fails (non-finite logits: StepOutput.error) raises ValueError."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        elif not isinstance(params, (list, tuple)) or not all(isinstance(sp, SamplingParams) for sp in params):
            raise TypeError(f"params must be a SamplingParams or a list of one per prompt, got {params!r:.80}")
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams: give one, or one per prompt")
        if any(sp.logprobs is not None or sp.prompt_logprobs is not None for sp in params):
            raise ValueError("generate() returns token ids alone, so logprobs and prompt_logprobs would be dropped: "
                             "add_request() the prompts and read each StepOutput's logprobs from step()")
        if self.requests:
            raise ValueError(f"generate() runs its prompts alone, but the engine holds {len(self.requests)} requests "
                             "added with add_request: drive them with step(), or cancel them first")
        ids: list[int] = []
        out: dict[int, list[int]] = {}
        try:
            while len(ids) < len(prompts) or self.has_work():
                while len(ids) < len(prompts) and self.scheduler.queue_room() > 0:
                    i = len(ids)
                    try:
                        ids.append(self.add_request(prompts[i], params[i]))
                    except (TypeError, ValueError) as err:  # which of the batch it is
                        kind = TypeError if isinstance(err, TypeError) else ValueError
                        raise kind(f"prompts[{i}]: {err}") from None
                    out[ids[-1]] = []
                for o in self.step():
                    if o.error is not None:
                        raise ValueError(f"prompt {ids.index(o.request_id)}: {o.error}")
                    out[o.request_id] += o.new_tokens
        except BaseException:  # a refused prompt or a failed step: leave no request behind to fail the next call
            for rid in ids:
                self.cancel(rid)
            raise
        return [out[rid] for rid in ids]
