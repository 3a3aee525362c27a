"""Grammar libraries side by side on CPU: llguidance (what the server uses) vs xgrammar, with our tokenizers.

For each tokenizer (the tiny checkpoints' trained one, and a ~128k-entry BPE trained here on the Python stdlib and
site-packages sources, cached after the first run) and each schema (any JSON object, a LongCat tool call over two
tools, a nested schema): the tokenizer setup time, the grammar compile time, and the mean per-token mask time
over a random walk of up to --tokens tokens (each step: compute the mask, draw an allowed token, advance).
Compact JSON (", " and ": ", no free whitespace) in both, as the server compiles it (docs/serving.md §3.3).

    python bench/bench_grammar.py [--tokens 200] [--large-tokenizer /tmp/longcat_bench_bpe128k]

A library that is not installed is reported as such (xgrammar is not a dependency: `pip install xgrammar`; it
pulls triton, ~290 MB, so `pip install --no-deps --target DIR xgrammar apache-tvm-ffi` and PYTHONPATH=DIR is the
light way to bench it).
"""
from __future__ import annotations

import argparse
import json
import os
import sysconfig
import time
from pathlib import Path

import torch

from longcat_flash.flag_types import positive_int
from longcat_flash.tokenizer import Tokenizer, stdlib_tokenizer, train_tokenizer

SEPARATORS = (", ", ": ")
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 32},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city"], "additionalProperties": False}
SEARCH = {"type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer", "minimum": 1,
                                                                                  "maximum": 50}},
          "required": ["query", "limit"], "additionalProperties": False}
SCHEMAS = {
    "json_object": {"type": "object"},
    "tool_call": {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "arguments": args},
                             "required": ["name", "arguments"], "additionalProperties": False}
                            for name, args in (("get_weather", WEATHER), ("search", SEARCH))]},
    "nested": {"type": "object", "properties": {
        "id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "owner": {"type": "object", "properties": {"name": {"type": "string"}, "score": {"type": "number"}},
                  "required": ["name", "score"], "additionalProperties": False}},
        "required": ["id", "owner"], "additionalProperties": False},
}


def large_tokenizer(path: Path, vocab_size: int = 131072) -> Tokenizer:
    """A byte-level BPE near Llama-3's / LongCat's vocabulary size, trained once on local Python sources."""
    if (path / "tokenizer.json").is_file():
        return Tokenizer.load(path)
    roots = {Path(sysconfig.get_paths()[key]) for key in ("stdlib", "purelib")}
    files = [f for root in roots for f in sorted(root.rglob("*.py"))]
    texts = (f.read_text(encoding="utf-8", errors="ignore") for f in files)
    tokenizer = train_tokenizer(texts, vocab_size)
    tokenizer.save(path)
    return tokenizer


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def walk(fill, accept, done, bitmask: torch.Tensor, vocab: int, tokens: int, seed: int = 0
         ) -> tuple[float, float, int]:
    """Random walk through the grammar: seconds for the first mask, mean seconds per later mask (`fill` alone,
    writing the (1, W) int32 bitmask; unpacking it is not timed), and the number of steps."""
    gen, times = torch.Generator().manual_seed(seed), []
    for _ in range(tokens):
        times.append(timed(fill, bitmask)[1])
        ids = unpack(bitmask[0], vocab).nonzero()[:, 0]
        if len(ids) == 0:
            break
        token = int(ids[torch.randint(len(ids), (), generator=gen)])
        if not accept(token) or done():
            break
    return times[0], sum(times[1:]) / max(len(times) - 1, 1), len(times)


def unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """(W,) int32 bitmask -> (vocab,) bool."""
    return ((bitmask[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:vocab].bool()


def bench_llguidance(tokenizer: Tokenizer, vocab: int, n_tokens: int) -> dict:
    import llguidance
    from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

    from longcat_flash.infer.grammar import TextTokens

    # the server's setup (infer/grammar.py): llguidance's vocabulary, forced text spelled with ordinary tokens
    lltok, setup = timed(lambda: llguidance.LLTokenizer(llguidance.TokenizerWrapper(TextTokens(tokenizer, vocab))))
    options = {"whitespace_flexible": False, "item_separator": SEPARATORS[0], "key_separator": SEPARATORS[1]}
    out = {"setup_s": setup}
    for name, schema in SCHEMAS.items():
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
        matcher, compile_s = timed(llguidance.LLMatcher, lltok, grammar)
        assert not matcher.is_error(), matcher.get_error()
        out[name] = (compile_s, *walk(lambda bitmask, m=matcher: fill_next_token_bitmask(m, bitmask),
                                      matcher.consume_token, matcher.is_stopped, allocate_token_bitmask(1, vocab),
                                      vocab, n_tokens))
    return out


def bench_xgrammar(tokenizer: Tokenizer, vocab: int, n_tokens: int) -> dict:
    import transformers
    import xgrammar

    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, eos_token=tokenizer.eos_token)
    info, setup = timed(xgrammar.TokenizerInfo.from_huggingface, hf, vocab_size=vocab)
    compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    out = {"setup_s": setup}
    for name, schema in SCHEMAS.items():
        compiled, compile_s = timed(compiler.compile_json_schema, json.dumps(schema), any_whitespace=False,
                                    separators=SEPARATORS)
        matcher = xgrammar.GrammarMatcher(compiled)
        out[name] = (compile_s, *walk(matcher.fill_next_token_bitmask, matcher.accept_token, matcher.is_terminated,
                                      xgrammar.allocate_token_bitmask(1, vocab), vocab, n_tokens))
    return out


def report(label: str, vocab: int, results: dict[str, dict | str]) -> None:
    print(f"\n{label}: {vocab} ids; per schema: compile, first mask, mean later mask x steps")
    print(f"{'':14}" + "".join(f"{lib:>36}" for lib in results))
    print(f"{'tokenizer s':14}" + "".join(f"{r['setup_s']:>36.3f}" if isinstance(r, dict) else f"{r:>36}"
                                          for r in results.values()))
    for name in SCHEMAS:
        cells = []
        for r in results.values():
            if isinstance(r, dict):
                compile_s, first, per_token, steps = r[name]
                cells.append(f"{compile_s * 1e3:6.1f} ms  {first * 1e6:6.0f} us  {per_token * 1e6:5.0f} us x{steps:<3}")
            else:
                cells.append("-")
        print(f"{name:14}" + "".join(f"{c:>36}" for c in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=positive_int, default=200, help="random-walk steps per schema")
    ap.add_argument("--large-tokenizer", type=Path, default=Path("/tmp/longcat_bench_bpe128k"),
                    help="directory caching the ~128k BPE (trained on first use, a few minutes)")
    args = ap.parse_args()
    if args.large_tokenizer.exists() and not args.large_tokenizer.is_dir():  # found minutes later, when saving
        ap.error(f"--large-tokenizer {args.large_tokenizer} is a file; name a directory (the BPE is cached there)")
    try:  # likewise a folder that cannot be made or written
        args.large_tokenizer.mkdir(parents=True, exist_ok=True)
        if not os.access(args.large_tokenizer, os.W_OK | os.X_OK):
            raise PermissionError("not writable")
    except OSError as err:
        ap.error(f"--large-tokenizer {args.large_tokenizer}: cannot cache the BPE there ({err.strerror or err})")
    torch.set_num_threads(1)
    small = stdlib_tokenizer(256)
    large = large_tokenizer(args.large_tokenizer)
    summary = {}
    for label, tokenizer in (("tiny checkpoints' tokenizer", small), ("~128k BPE", large)):
        vocab = tokenizer.vocab_size
        results: dict[str, dict | str] = {}
        for lib, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
            try:
                results[lib] = fn(tokenizer, vocab, args.tokens)
            except ImportError as err:
                results[lib] = f"not installed ({err.name})"
        report(label, vocab, results)
        summary[vocab] = results
    print("\nsteps: masks computed in the walk (it ends early where the grammar completes)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
