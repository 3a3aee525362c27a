"""`longcat init`, `generate`, `chat` and `serve`: making, running and serving a model."""
from __future__ import annotations

import argparse
import io
import json
import signal
import sys
from pathlib import Path

from ..flag_types import (fraction, integer, non_negative_int, penalty, positive_float, positive_int, sampling_seed,
                          seed, temperature, top_p, user_path)
from ..presets import PRESETS, get_preset
from .common import add_device, new_or_directory


def _add_init(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="a checkpoint with random weights and a fresh tokenizer, for tests and benchmarks")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", type=user_path,
                   required=True, help="directory to write (config.json, safetensors, tokenizer)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--seed", type=seed, default=0,
                   help="the weights a seed gives depend on the device type too (CPU and CUDA generators differ)")
    p.add_argument("--set", action="append", default=[], metavar="model.FIELD=VALUE", dest="overrides",
                   help="override one of the preset's model fields, e.g. --set model.num_layers=2 (repeatable)")
    add_device(p)
    p.set_defaults(run=_run_init)


def _run_init(args: argparse.Namespace) -> None:
    import torch

    from ..checkpoint.fresh import init_checkpoint
    from ..device import resolve_device
    from ..tokenizer import STDLIB_MIN_VOCAB
    from ..train.overrides import apply_model_overrides

    new_or_directory(args.out)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists and is not an empty directory; choose another --out")
    cfg = apply_model_overrides(get_preset(args.preset), args.overrides)
    if cfg.vocab_size < STDLIB_MIN_VOCAB:  # (every preset has more)
        raise ValueError(f"--set model.vocab_size={cfg.vocab_size}: the fresh tokenizer has at least "
                         f"{STDLIB_MIN_VOCAB} ids (256 bytes, the special tokens, merges); give {STDLIB_MIN_VOCAB} or "
                         "more (it was raised to that without a word)")
    print(init_checkpoint(cfg, out, dtype=getattr(torch, args.dtype), seed=args.seed,
                          device=resolve_device(args.device)))


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=user_path,
                   required=True, help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="weights and activations (auto: the checkpoint's, but fp32 for a bf16 checkpoint on a CPU "
                        "without fast bf16 matmuls, e.g. AVX2 only, and for a float16 one on any CPU)")
    p.add_argument("--quantize", default=None, choices=["int8", "fp8", "int4", "int4-mixed"],
                   help="weight quantization (docs/quantization.md)")
    p.add_argument("--speculative", type=non_negative_int, default=0, metavar="N",
                   help="MTP draft tokens per step (0: off)")
    add_device(p)


def _add_sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=non_negative_int, default=max_new_tokens)
    p.add_argument("--temperature", type=temperature, default=0.0, help="0 = greedy; above it, sampling (and the "
                                                                       "four flags below)")
    p.add_argument("--top-p", type=top_p, default=None, help="nucleus sampling (default 1: off)")
    p.add_argument("--top-k", type=non_negative_int, default=None, help="sample among the k likeliest (default 0: "
                                                                        "off)")
    p.add_argument("--seed", type=sampling_seed, default=None, help="a seed for sampling (reproducible output)")
    p.add_argument("--min-p", type=fraction, default=None, help="when sampling, drop tokens less likely than this "
                                                                "share of the likeliest one's (default 0: off)")
    p.add_argument("--repetition-penalty", type=positive_float, default=1.0, help="the logits of tokens already in "
                   "the prompt or reply: positive ones divided by it, negative ones multiplied; greedy too (default 1: "
                   "off)")
    p.add_argument("--presence-penalty", type=penalty, default=0.0, help="subtract it from the logits of tokens the "
                   "reply holds; greedy too (default 0)")
    p.add_argument("--frequency-penalty", type=penalty, default=0.0, help="subtract it times each token's count "
                   "in the reply; greedy too (default 0)")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-new-tokens tokens")


def _sampling(args: argparse.Namespace):
    from ..infer.sampling import SamplingParams

    given = [flag for flag, value, off in (("--top-p", args.top_p, 1.0), ("--top-k", args.top_k, 0),
                                           ("--seed", args.seed, None), ("--min-p", args.min_p, 0.0))
             if value is not None and value != off]  # a script may always pass the off values
    if args.temperature == 0 and given:  # greedy decoding reads none of them
        raise ValueError(f"{' and '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} when sampling: give "
                         "--temperature above 0 (0, the default, decodes greedily)")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=1.0 if args.top_p is None else args.top_p, top_k=args.top_k or 0, seed=args.seed,
                            min_p=args.min_p or 0.0, repetition_penalty=args.repetition_penalty,
                            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                            ignore_eos=args.ignore_eos)
    if args.speculative and params.controlled:  # said, or --speculative would look like it ran
        controls = ["--" + name.replace("_", "-") for name in params.controls]  # only flags' can be on here
        print(f"longcat {args.command}: note: {', '.join(controls)} turn{'s' if len(controls) == 1 else ''} MTP "
              f"speculation off (its drafts do not model {'it' if len(controls) == 1 else 'them'}): --speculative "
              f"{args.speculative} decodes one token per step", file=sys.stderr)
    return params


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete one prompt; prints the generated text alone (or --json)")
    _add_model_flags(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", type=user_path,
                        metavar="FILE", help="the prompt is FILE's text as it is, final newline "
                                             "included (-: standard input)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    _add_sampling_flags(p, max_new_tokens=64)
    p.add_argument("--json", action="store_true", help="one JSON object: text, token counts, timings")
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> None:
    from ..serve.local import generate_text, interrupted_by, load_session

    if "" in args.stop:
        raise ValueError("--stop: an empty string would match everywhere; give a non-empty stop string")
    for stop in args.stop:  # as the prompt is: an undecodable byte could never match the text
        _utf8_flag("--stop", stop)
    prompt = _utf8_flag("--prompt", args.prompt) if args.prompt is not None else _read_prompt(args.prompt_file)
    params = _sampling(args)  # checked before the model loads
    engine, tokenizer = load_session(args.model, dtype=args.dtype, quantize=args.quantize,
                                     speculative=args.speculative, device=args.device)
    if why := tokenizer.cannot_fit(len(prompt), engine.max_context, scoring=args.max_new_tokens == 0):
        raise ValueError(f"the prompt's {why}")  # before it is encoded
    stream = None if args.json else (lambda piece: print(piece, end="", flush=True))
    # a raw prompt: the text of a special token is that token (`<s>` is bos), and the tokenizer's post-processor
    # adds what it adds (a bos for Llama-style tokenizers), as /v1/completions, vLLM and transformers read one
    ids = tokenizer.encode(prompt, allow_special=True, add_special_tokens=True)
    # Ctrl-C, or SIGTERM (`timeout`), ends the request: what it generated is still printed
    with interrupted_by(signal.SIGINT, signal.SIGTERM) as interrupt:
        result = generate_text(engine, tokenizer, ids, params, args.stop, stream, interrupt)
    print(json.dumps({"prompt": prompt, **result.to_dict()}) if args.json else "")
    if result.finish_reason == "interrupted":
        sys.exit(128 + interrupt.signum)  # the shell's status for the signal
    if result.finish_reason == "length" and result.completion_tokens < args.max_new_tokens:
        print(f"longcat generate: stopped after {result.completion_tokens} of --max-new-tokens {args.max_new_tokens}: "
              f"the prompt's {result.prompt_tokens} tokens and these fill the context of {engine.max_context}",
              file=sys.stderr)


def _utf8_flag(flag: str, text: str) -> str:
    """A flag's text, refused by the flag's name when it holds an undecodable byte (Python passes one on)."""
    from ..tokenizer import utf8_text

    try:
        return utf8_text(text)
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from None


def _read_prompt(path: str) -> str:
    """--prompt-file's text, byte for byte: a shell's $(cat FILE) would drop its final newlines."""
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"--prompt-file {path}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--prompt-file {path}: not UTF-8 text (byte {err.start} is {data[err.start]:#04x})") from None


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive chat through the tokenizer's chat template (/reset, /exit)")
    _add_model_flags(p)
    p.add_argument("--system", default=None, help="system message")
    _add_sampling_flags(p, max_new_tokens=256)
    p.set_defaults(run=_run_chat)


def _run_chat(args: argparse.Namespace) -> None:
    from ..serve.local import chat_loop, load_session

    if args.max_new_tokens < 1:  # every reply would be empty (generate takes 0: it scores the prompt)
        raise ValueError(f"--max-new-tokens must be at least 1 for chat, got {args.max_new_tokens}")
    if args.system is not None:
        _utf8_flag("--system", args.system)
    params = _sampling(args)  # checked before the model loads
    engine, tokenizer = load_session(args.model, dtype=args.dtype, quantize=args.quantize,
                                     speculative=args.speculative, device=args.device)
    if isinstance(sys.stdin, io.TextIOWrapper):  # a locale's strict stdin raised on a stray byte and ended the chat;
        sys.stdin.reconfigure(errors="surrogateescape")  # read as C.UTF-8 reads it, the line is refused and asked again
    chat_loop(engine, tokenizer, params, input, lambda s: print(s, end="", flush=True), args.system)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, ...)")
    _add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000; 0: any free one)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--model-name", default=None, help="the id clients pass as `model` (default: directory name)")
    p.add_argument("--max-running", type=positive_int, default=32,
                   help="sequences decoded together, a request's n copies each counted (default 32)")
    p.add_argument("--max-waiting", type=positive_int, default=256,
                   help="sequences (a request's n copies each) queued beyond the free --max-running slots before "
                        "429 (default 256)")
    p.add_argument("--cache-tokens", type=positive_int, default=65536,
                   help="KV cache pool size in tokens (default 65536)")
    p.add_argument("--max-request-mb", type=float, default=8,
                   help="largest request body taken, in MiB (413 above it; default 8)")
    p.add_argument("--client-timeout", type=float, default=15.0,
                   help="seconds a client has to send a whole request head, and to take in a response it is being "
                        "sent, before its connection is closed (default 15)")
    p.add_argument("--max-connections", type=int, default=None,
                   help="open connections at most (default: half the file-descriptor limit, at most 4096)")
    p.set_defaults(run=_run_serve)


def _port(text: str) -> int:
    port = integer(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0..65535, got {port}")
    return port


def _run_serve(args: argparse.Namespace) -> None:
    from ..infer.engine import EngineConfig
    try:
        from ..serve.server import serve
    except ModuleNotFoundError as err:  # the server's packages are an extra, not in a plain install
        sys.exit(f"longcat serve: {err.name} is not installed; install the server's packages with "
                 "pip install -e \".[serve]\" (or pip install \"longcat-flash[serve]\")")

    engine = EngineConfig(max_running=args.max_running, max_waiting=args.max_waiting,
                          cache_tokens=args.cache_tokens, speculative=args.speculative,
                          token_budget=max(1024, args.max_running * (1 + args.speculative)))
    for flag, value in (("--max-request-mb", args.max_request_mb), ("--client-timeout", args.client_timeout),
                        ("--max-connections", args.max_connections)):
        if value is not None and not 0 < value < float("inf"):
            sys.exit(f"longcat serve: {flag} must be a positive number, got {value}")
    if args.max_request_mb * 2**20 < 1:
        sys.exit(f"longcat serve: --max-request-mb {args.max_request_mb} is less than one byte")
    if not args.host.strip():  # the empty host is every interface to the socket, said as "http://:8000"
        sys.exit("longcat serve: --host is empty; give 127.0.0.1 (the default), or 0.0.0.0 for every interface")
    if args.model_name is not None and not args.model_name.strip():  # was replaced by the directory's name unsaid
        sys.exit("longcat serve: --model-name is empty; leave it out to serve the model as its directory's name")
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, dtype=args.dtype,
          quantize=args.quantize, engine_config=engine, model_name=args.model_name, device=args.device,
          max_body_bytes=int(args.max_request_mb * 2**20), client_timeout_s=args.client_timeout,
          max_connections=args.max_connections)


COMMANDS = [_add_init, _add_generate, _add_chat, _add_serve]
