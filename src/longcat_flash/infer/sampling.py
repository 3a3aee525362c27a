"""Token sampling: greedy, temperature, top-k, top-p, min-p, each request with its own explicit torch.Generator.

Everything runs on the logits' device; a generator must live there too (`SamplingParams.generator(device)`).
A per-request generator makes a seeded request's draws its own whatever else shares its batch (the logits
themselves may differ in their last bits with the batch in bf16 or quantized: docs/serving.md §3.4). `probabilities`
returns the distribution a token is actually drawn from (after temperature, top-k, top-p), because speculative
rejection sampling must compare exactly those distributions (speculative.py). `token_logprobs` reports the
model's raw distribution instead (log-softmax of the logits, temperature 1), whatever the request samples with.

`adjust` applies a request's logit controls before any of that (greedy takes the argmax of the adjusted logits):
repetition_penalty (HF / vLLM: over prompt + generated tokens, a positive logit divided by it, a negative one
multiplied), then presence_penalty and frequency_penalty (OpenAI: over the generated tokens, minus presence once
per token seen, minus frequency per occurrence), then logit_bias (added). min_p filters after temperature, as
vLLM does: tokens whose probability is below min_p times the likeliest token's are dropped.
`mask_rows` then applies grammar constraints (`SamplingParams.grammar`, infer/grammar.py): a constrained row's
disallowed tokens get -inf, so greedy and every filter above see only what the grammar admits.

Shapes: B rows, V vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from .grammar import Grammar

MAX_STOP_TOKENS = 64
MAX_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's legacy limit is 5; vLLM's 20)
MAX_LOGIT_BIAS = 300  # entries, OpenAI's limit
GREEDY_BELOW = 1e-5  # a temperature under this samples greedily, as vLLM does (logits / 1e-39 overflowed fp32)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability and the `k` most likely tokens at its position, (id, logprob) best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings. temperature 0 (or under GREEDY_BELOW) means greedy (top_k / top_p are
    then irrelevant)."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)  # besides EOS
    ignore_eos: bool = False
    logprobs: int | None = None  # report each generated token's logprob and this many alternatives; None = off
    prompt_logprobs: int | None = None  # the same for the prompt tokens (the engine then keeps prefill logits)
    presence_penalty: float = 0.0  # [-2, 2], over generated tokens
    frequency_penalty: float = 0.0  # [-2, 2], over generated tokens
    repetition_penalty: float = 1.0  # > 0, over prompt + generated tokens; 1 = off
    min_p: float = 0.0  # [0, 1]; 0 = off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (id, bias in [-100, 100]) pairs or {id: bias}; engine checks ids
    grammar: Grammar | None = None  # constrained decoding (infer/grammar.py); each request gets its own matcher

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
            value = getattr(self, name)  # None (an OpenAI client's "default") failed a comparison deep inside
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not _integer(self.max_new_tokens) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (_integer(value) and 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not _integer(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (_integer(self.seed) and -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed must be None or an integer in [-2^63, 2^64), got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if not isinstance(self.stop_token_ids, (tuple, list)) or not all(
                _integer(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids (integers >= 0), got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))  # a list would make params unhashable
        if len(self.stop_token_ids) > MAX_STOP_TOKENS:
            raise ValueError(f"at most {MAX_STOP_TOKENS} stop_token_ids, got {len(self.stop_token_ids)}")
        if self.grammar is not None and not callable(getattr(self.grammar, "matcher", None)):
            raise ValueError(f"grammar must be None or an infer.grammar.Grammar (GrammarCompiler compiles one from "
                             f"a JSON schema), got {self.grammar!r:.80}")
        self._check_controls()

    def for_draw(self, j: int) -> SamplingParams:
        """These params for the j-th of several samples that one seed makes repeatable (a request's n copies, a
        chat's turns): seed + j, wrapping around int64, so the samples differ; unseeded params as they are."""
        if self.seed is None or j == 0:
            return self
        return replace(self, seed=(self.seed + j + 2**63) % 2**64 - 2**63)

    def _check_controls(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not 0.0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be > 0 and finite, got {self.repetition_penalty!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        bias = tuple(self.logit_bias.items()) if isinstance(self.logit_bias, dict) else self.logit_bias  # OpenAI's
        if not isinstance(bias, (tuple, list)) or not all(
                isinstance(pair, (tuple, list)) and len(pair) == 2 and _integer(pair[0]) and pair[0] >= 0
                and isinstance(pair[1], (int, float)) and -100.0 <= pair[1] <= 100.0 for pair in bias):
            raise ValueError("logit_bias holds (token id >= 0, bias in [-100, 100]) pairs, or is a {token id: bias} "
                             f"dict, got {self.logit_bias!r:.80}")
        object.__setattr__(self, "logit_bias", tuple(map(tuple, bias)))  # lists would make params unhashable
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} logit_bias entries, got {len(self.logit_bias)}")

    @property
    def adjusts(self) -> bool:
        """Whether the logits need `adjust` (the fast path skips it; speculation is off for such requests)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)

    @property
    def controlled(self) -> bool:
        """Whether any control beyond temperature / top-k / top-p is on, a grammar included: MTP drafts do not
        model them, so such requests decode without drafts."""
        return bool(self.controls)

    @property
    def controls(self) -> list[str]:
        """The fields of the controls that are on, by name (`controlled`)."""
        on = {"min_p": self.min_p > 0.0, "repetition_penalty": self.repetition_penalty != 1.0,
              "presence_penalty": bool(self.presence_penalty), "frequency_penalty": bool(self.frequency_penalty),
              "logit_bias": bool(self.logit_bias), "grammar": self.grammar is not None}
        return [name for name, is_on in on.items() if is_on]

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def generator(self, device: str | torch.device = "cpu") -> torch.Generator:
        """The request's own random stream, on the device its logits live on (an op refuses a generator of
        another device): seeded if asked, else from the global CPU generator's next value, so that
        `torch.manual_seed` makes unseeded requests reproducible on any device. A greedy request draws nothing
        from it, and leaves the caller's global generator as it was."""
        seed = self.seed if self.seed is not None else 0 if self.greedy else int(torch.randint(0, 2**62, ()).item())
        return torch.Generator(device=device).manual_seed(seed)


def _integer(value: object) -> bool:
    """An int, and not a bool (Python's bool is an int: `logprobs=True` reached torch.topk as k)."""
    return isinstance(value, int) and not isinstance(value, bool)


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (..., V) -> the sampling distribution (..., V) in fp32; one-hot on the argmax when greedy."""
    logits = logits.float()
    if params.greedy:
        return torch.zeros_like(logits).scatter_(-1, argmax(logits, keepdim=True), 1.0)
    logits = (logits - logits.amax(-1, keepdim=True)) / params.temperature  # <= 0: no overflow to inf, no NaN
    if 0 < params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p  # mass before this token already > p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    probs = logits.softmax(-1)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def adjust(logits: torch.Tensor, params: SamplingParams, tokens: list[int], prompt_len: int) -> torch.Tensor:
    """logits (V,) -> fp32 logits (V,) after the request's penalties and bias, given its sequence so far
    (`tokens`, the first `prompt_len` of them the prompt), none +inf (inf - inf is the NaN a draw refuses).
    Every tensor is made on the logits' device."""
    logits, device = logits.float(), logits.device
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(tokens, device=device).unique()  # (U,)
        picked = logits[seen]
        logits = logits.index_copy(0, seen, torch.where(picked > 0, picked / params.repetition_penalty,
                                                        picked * params.repetition_penalty))
    if (params.presence_penalty or params.frequency_penalty) and len(tokens) > prompt_len:
        counts = torch.bincount(torch.tensor(tokens[prompt_len:], device=device), minlength=logits.shape[-1])
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias)
        logits = logits.index_add(0, torch.tensor(ids, device=device),
                                  torch.tensor(biases, device=device, dtype=logits.dtype))
    return logits.clamp(max=torch.finfo(logits.dtype).max)  # a tiny repetition_penalty overflowed them to +inf


def adjust_rows(logits: torch.Tensor, params: list[SamplingParams], histories: list[tuple[list[int], int]]
                ) -> torch.Tensor:
    """logits (B, V) -> the same with each adjusting row's `adjust` applied; untouched (same tensor) when no row
    adjusts, so that requests without controls keep the exact fast path. histories: (tokens, prompt_len) per row."""
    if not any(p.adjusts for p in params):
        return logits
    return torch.stack([adjust(row, p, *history) if p.adjusts else row.float()
                        for row, p, history in zip(logits, params, histories)])


class TokenMask(Protocol):
    """A sequence's grammar state (grammar.Matcher): the tokens it allows next, advanced by each sampled one."""

    def fill(self, bitmask: torch.Tensor) -> None: ...  # allowed tokens into a (W,) int32 bitmask on the host

    def advance(self, token: int) -> None: ...

    @property
    def done(self) -> bool: ...  # complete (nothing more may follow), or failed

    @property
    def error(self) -> str | None: ...  # why it failed (a parser limit hit mid-output), or None


def mask_rows(logits: torch.Tensor, masks: list[TokenMask | None]) -> torch.Tensor:
    """logits (B, V) -> a copy in which each constrained row (masks[b] not None) keeps only the tokens its grammar
    allows, the others -inf. The caller skips it when no row is constrained; `logits` itself is never changed,
    so logprobs still report the model's raw distribution."""
    rows = [b for b, mask in enumerate(masks) if mask is not None]
    vocab = logits.shape[-1]
    bitmask = torch.empty(len(rows), -(-vocab // 32), dtype=torch.int32)  # (R, W) on the host, where masks live
    for i, b in enumerate(rows):
        masks[b].fill(bitmask[i])
    bitmask = bitmask.to(logits.device, non_blocking=True)
    bits = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask[:, :, None] >> bits) & 1).flatten(1)[:, :vocab].bool()  # (R, V)
    out = logits.to(torch.float32, copy=True)
    index = torch.tensor(rows, device=logits.device)
    out[index] = out[index].masked_fill(~allowed, float("-inf"))
    return out


def argmax(logits: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """Index of the largest value along the last dim, the first on ties, as Tensor.argmax; through max(), which is
    2-4x faster on CPU (32000 bf16 logits: 33 vs 127 us, once per row and step)."""
    return logits.max(-1, keepdim=keepdim).indices


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from a distribution (V,)."""
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
           best: list[int] | None = None) -> list[int]:
    """One token per row of logits (B, V): argmax for greedy rows, else a draw from `probabilities`. `best`: each
    row's argmax, when the caller has taken it already (the engine, with its finite check)."""
    best = argmax(logits).tolist() if best is None else best
    return [top if p.greedy else draw(probabilities(row, p), g)
            for row, top, p, g in zip(logits, best, params, generators)]


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """logits (N, V) at the positions that predicted `tokens` (N) -> their logprobs and top-k alternatives.

    Log-softmax in fp32 of the raw logits (temperature 1, no top-k / top-p): what an evaluator scores with, and
    independent of how the request samples. One host transfer per call, not per token.
    """
    logprobs = logits.float().log_softmax(-1)  # (N, V)
    chosen = logprobs.gather(-1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
    top_values, top_ids = (t.tolist() for t in logprobs.topk(k, dim=-1))  # (N, k) each
    return [TokenLogprob(token, value, tuple(zip(ids, values)))
            for token, value, ids, values in zip(tokens, chosen, top_ids, top_values)]
