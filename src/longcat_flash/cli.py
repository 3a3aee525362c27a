"""`longcat` entry point: parse the arguments, refuse combinations of flags that do not fit together, build objects
and call one function per command; the work itself lives in the packages."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from .device import DEVICE_CHOICES, DeviceError
from .distributed.env import DIST_TIMEOUT_S, RankZeroFailed, launched, peer_lost
from .flag_types import fraction, non_negative_int, penalty, positive_float, positive_int, seed, temperature, top_p
from .presets import PRESETS, get_preset
from .runtime import tune_cpu_allocator


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=f"{DEVICE_CHOICES} (auto: CUDA when available, the local "
                                                     "rank's GPU under torchrun; else the CPU)")


# ---- info -----------------------------------------------------------------------------------------------

def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameter counts, active parameters, KV-cache bytes and FLOPs per token")
    p.add_argument("target", help=f"a preset ({', '.join(sorted(PRESETS))}), a checkpoint directory (the figures "
                                   "of its config.json; the weights are not read) or a run directory")
    p.add_argument("--ffn-experts", type=float, default=None, help="K_e for the average figure (default: a run's "
                   "budget.target, else 2/3 K)")
    p.add_argument("--context", type=non_negative_int, default=0, help="context length for attention FLOPs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> None:
    from .analysis.info_target import config_of, run_budget_target
    from .analysis.params import info_command

    k_e = args.ffn_experts if args.ffn_experts is not None else run_budget_target(args.target)
    print(info_command(config_of(args.target), ffn_experts_target=k_e, context=args.context, as_json=args.json))


# ---- cost -----------------------------------------------------------------------------------------------

def _add_cost(sub: argparse._SubParsersAction) -> None:
    from .analysis.cost_model import MODELS

    p = sub.add_parser("cost", help="the report's theoretical decode cost model (Table 7): TPOT and $/M tokens")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--ep", type=positive_int, default=128,
                   help="expert-parallel degree; above a model's FFN expert count each device holds one expert "
                        "(the others redundant copies, as DeepSeek-V3 serves on EP320 with 256)")
    p.add_argument("--batch", type=positive_int, default=96, help="sequences per device")
    p.add_argument("--acceptance", type=fraction, default=0.8,
                   help="draft acceptance rate of the speculative decoding every column gets, Qwen3's too (its \"MTP "
                        "w/o\" is the report's label: Table 7 gives it an equivalent scheme)")
    p.add_argument("--bandwidth", type=positive_float, default=40.0, help="all-to-all bandwidth, GB/s")
    p.add_argument("--context", type=non_negative_int, default=5000,
                   help="average context length (at most each model's longest: 131072 for LongCat-Flash)")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    p.set_defaults(run=_run_cost)


def _run_cost(args: argparse.Namespace) -> None:
    from .analysis.cost_model import cost_command

    print(cost_command(args.models, ep=args.ep, batch_per_device=args.batch, mtp_acceptance=args.acceptance,
                       a2a_bandwidth_gbps=args.bandwidth, context=args.context, as_json=args.json))


# ---- explain --------------------------------------------------------------------------------------------

def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="per-token view of the FFN experts each token used, per layer "
                                       "(HTML, PNG, JSON; report App. A.1)")
    p.add_argument("--model", required=True, help="checkpoint directory with config.json, safetensors and "
                                                  "tokenizer.json")
    p.add_argument("--text", required=True, help="the text to run through the model (one forward)")
    p.add_argument("--out", default="explain", help="directory for explain.html, explain.png, explain.json "
                                                     "(default: explain; files of those names there are replaced)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the summary table")
    _add_device(p)
    p.set_defaults(run=_run_explain)


def _new_or_directory(out: str | Path | None) -> None:
    """An --out that names a file would fail deep inside with an OS error, and an empty one would write into the
    working directory; say so up front."""
    if out is not None and not str(out).strip():
        raise ValueError("--out is empty; name a directory")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")


def _run_explain(args: argparse.Namespace) -> None:
    from .analysis.explain import explain_command

    _new_or_directory(args.out)
    print(explain_command(args.model, args.text, args.out, as_json=args.json, device=args.device))


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_info, _add_cost, _add_explain]


# ---- train / grow ---------------------------------------------------------------------------------------

# CLI flag -> TrainConfig field; every other field is set with --set section.field=value.
_TRAIN_FLAGS = {"data": "data.source", "max_steps": "max_steps", "seed": "seed", "save_every": "checkpoint.save_every"}
_SFT_FLAGS = {"model": "init_from", "data": "sft.data", "val_data": "sft.val_data", "max_steps": "max_steps",
              "seed": "seed", "save_every": "checkpoint.save_every"}


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags `train` and `sft` share: one training loop, one set of controls."""
    p.add_argument("--out", default=None, help="run directory (default runs/<preset> for train, runs/sft for sft; "
                                                   "with --resume DIR, DIR)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=seed, default=None)
    p.add_argument("--save-every", type=int, default=None, help="steps between training checkpoints")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR",
                   help="continue the newest checkpoint of RUN_DIR (default: --out), bit-for-bit")
    p.add_argument("--auto-resume", action="store_true",
                   help="continue --out's newest checkpoint where it has one, else start a new run there: one "
                        "command for the first start and every restart (torchrun --max-restarts, a requeued job)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config field, e.g. --set budget.rate=0.01 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print every config field and value, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (metrics.jsonl is still written)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel ranks (under torchrun; divides the "
                                                         "experts; default: world / dp, or 1)")
    p.add_argument("--dp", type=int, default=None, help="data-parallel groups of --ep ranks (default: world / ep)")
    p.add_argument("--no-overlap", action="store_true", help="block on each all-to-all instead of hiding it "
                                                             "behind the dense path (with --ep > 1; for measurements)")
    p.add_argument("--dist-timeout", type=positive_float, default=None, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others, to start and in each collective "
                        f"(default {DIST_TIMEOUT_S:g})")
    _add_device(p)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", allow_abbrev=False,
                       help="train a LongCat-Flash model (default: the small preset on the Python stdlib)",
                       description="Train a tokenizer, tokenize the corpus and train; OUT ends as an HF checkpoint "
                                   "with metrics.jsonl, training checkpoints and sample.txt. Any config field: "
                                   "--set section.field=value (list them with --print-config).")
    p.add_argument("--preset", default=None, help="model + recipe: tiny, small (default), bench")
    p.add_argument("--data", default=None, help="corpus: 'stdlib' (default), a directory, text file, .jsonl, .parquet")
    _add_run_flags(p)
    p.set_defaults(run=_run_train, preset_name=None, flag_fields=_TRAIN_FLAGS)


def _add_sft(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sft", allow_abbrev=False,
                       help="supervised fine-tuning on chat / tool-use conversations (docs/sft.md)",
                       description="Fine-tune the HF model in --model on OpenAI-format conversations (loss on the "
                                   "assistant tokens, conversations packed with document masking); OUT ends as an "
                                   "HF checkpoint with its tokenizer, metrics.jsonl, training checkpoints and "
                                   "sample.txt. Any config field: --set section.field=value (--print-config).")
    p.add_argument("--model", default=None, help="HF model directory to start from (config.json, safetensors, "
                                                 "tokenizer.json)")
    p.add_argument("--data", default=None,
                   help="conversations: .jsonl, .json, .parquet, .arrow (a directory or a quoted glob of them), "
                        "one {messages, tools} per row (or TRL prompt-completion, ShareGPT, Alpaca rows: docs/sft.md)")
    p.add_argument("--val-data", default=None, help="held-out conversations (default: data.val_fraction of --data)")
    _add_run_flags(p)
    p.set_defaults(run=_run_train, preset_name="sft", flag_fields=_SFT_FLAGS)


def _run_train(args: argparse.Namespace) -> None:
    from . import distributed
    from .train.checkpoints import exactness_notice, resume_config, resumed_ep, schedule_notice, validation_notice
    from .train.config import RECIPES, build_config, describe
    from .train.overrides import override_keys
    from .train.trainer import TrainingStopped, train

    if args.auto_resume:
        _auto_resume(args)
    out = args.resume if isinstance(args.resume, str) else args.out
    if isinstance(args.resume, str) and args.out not in (None, args.resume):
        raise ValueError(f"--resume {args.resume} continues in its own directory; drop --out {args.out}")
    if args.resume is not None and out is None:
        raise ValueError("--resume needs a run directory: --resume RUN_DIR or --out RUN_DIR")
    if args.command == "sft" and not (args.resume or args.print_config) and (args.model is None or args.data is None):
        raise ValueError("longcat sft needs --model DIR and --data FILE (or --resume RUN_DIR)")
    flags = {key: f"{key}={getattr(args, name)}" for name, key in args.flag_fields.items()
             if getattr(args, name) is not None}
    flag_of = {key: name for name, key in args.flag_fields.items()}
    for override in args.overrides:
        if clash := sorted(override_keys(override) & flags.keys()):
            flag = f"--{flag_of[clash[0]].replace('_', '-')}"
            raise ValueError(f"{flag} and --set {override} both set {clash[0]}; give one of them")
    if args.command == "train" and args.preset == "sft":
        raise ValueError("the sft recipe fine-tunes a model on conversations: longcat sft --model DIR --data FILE")
    if args.command == "train" and args.preset is not None and args.preset not in RECIPES:
        raise ValueError(f"--preset {args.preset}: no such recipe; choose one of "
                         f"{', '.join(p for p in RECIPES if p != 'sft')}")
    preset = args.preset if args.command == "train" else None if args.resume else args.preset_name
    saved = resume_config(out) if args.resume else None
    if saved is not None and (saved.sft.data is not None) != (args.command == "sft"):
        other = "sft" if saved.sft.data is not None else "train"
        raise ValueError(f"{out} is a `longcat {other}` run: continue it with longcat {other} --resume {out}")
    cfg = build_config(preset, [*flags.values(), *args.overrides], saved)
    if args.print_config:  # sft without --model: the model section is whatever config.json --model will hold
        unread = args.command == "sft" and cfg.init_from is None
        if int(os.environ.get("RANK", "0")) == 0:  # once under torchrun (before any process group)
            print(f"# model.*: from the config.json of --model DIR\n{describe(cfg, omit=('model',))}" if unread
                  else describe(cfg))
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ep_given, layout_notice = args.ep, None
    if saved is not None and args.ep is None and args.dp is None:
        ep_given, layout_notice = resumed_ep(out, world)
    dp, ep = distributed.parallel_degrees(args.dp, ep_given, world)
    if args.no_overlap and ep == 1:
        raise ValueError("--no-overlap: only expert parallelism (--ep > 1 under torchrun) has all-to-alls to "
                         "overlap; drop the flag")
    if args.dist_timeout is not None and not launched():
        raise ValueError("--dist-timeout: only a torchrun launch has other ranks to wait for; drop the flag")
    _new_or_directory(out)
    device = distributed.init(args.device, args.dist_timeout or DIST_TIMEOUT_S)  # a process group under torchrun
    mesh = distributed.build_mesh(dp, ep, device)
    notices = (layout_notice, schedule_notice(out, cfg), validation_notice(out, cfg),
               exactness_notice(out, cfg, device)) if saved is not None else ()
    for notice in notices:
        if notice:
            distributed.print0(notice)
    try:
        resume = "auto" if args.auto_resume else args.resume is not None
        summary = train(cfg, out or f"runs/{cfg.preset}", resume=resume,
                        progress=not args.no_progress, mesh=mesh, overlap=not args.no_overlap, device=device)
    except TrainingStopped as err:  # every rank stops on the same averaged losses: rank 0 says why
        sys.exit(f"longcat {args.command}: {err}" if distributed.is_main() else 1)
    distributed.print0(f"done: {summary['steps']} steps, {summary['tokens']} tokens -> {summary['out']}\n"
                       f"--- sample ---\n{summary['sample']}")
    distributed.teardown()


def _auto_resume(args: argparse.Namespace) -> None:
    """--auto-resume: --resume where --out holds a checkpoint (its saved config under the flags), a new run there
    otherwise."""
    from .train.checkpoints import has_checkpoint

    if args.resume is not None:
        raise ValueError("--auto-resume and --resume both choose whether to continue; give one of them")
    if args.out is None:
        raise ValueError("--auto-resume needs --out RUN_DIR: the directory the run starts in or continues")
    _new_or_directory(args.out)
    args.resume = True if has_checkpoint(args.out) else None  # train() decides again, and says so in its header


def _add_grow(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("grow", allow_abbrev=False,
                       help="model growth: stack a trained model r times in depth (report §3.1.2)",
                       description="SRC: a run directory (keeps optimizer, schedule, counters; continue with "
                                   "`longcat train --resume DST`) or an HF model directory (weights only).")
    p.add_argument("src", help="run directory, checkpoint directory, or HF model directory")
    p.add_argument("--out", required=True, help="new directory for the grown run or model")
    p.add_argument("--factor", type=int, default=2, help="r: how many times the layer stack is repeated")
    _add_device(p)
    p.set_defaults(run=_run_grow)


def _run_grow(args: argparse.Namespace) -> None:
    from .device import resolve_device
    from .train.checkpoints import saved_train_config
    from .train.config import CHECKPOINTS
    from .train.growth import grow_run

    _new_or_directory(args.out)
    grown = grow_run(args.src, args.out, args.factor, device=resolve_device(args.device))
    if grown.parent.name == CHECKPOINTS:
        command = "sft" if saved_train_config(grown).sft.data is not None else "train"
        print(f"grown x{args.factor}: {grown} (a run: continue it with longcat {command} --resume {args.out})")
    else:
        print(f"grown x{args.factor}: {grown} (a model, weights only: {args.src} holds no training checkpoint; start "
              f"from it with longcat train --set init_from={args.out}, or longcat sft --model {args.out})")


COMMANDS += [_add_train, _add_sft, _add_grow]
MULTI_PROCESS = ("train", "sft")  # the commands torchrun may launch


# ---- init / generate / chat / serve ----------------------------------------------------------------------

def _add_init(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="a checkpoint with random weights and a fresh tokenizer, for tests and benchmarks")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True, help="directory to write (config.json, safetensors, tokenizer)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--seed", type=seed, default=0,
                   help="the weights a seed gives depend on the device type too (CPU and CUDA generators differ)")
    _add_device(p)
    p.set_defaults(run=_run_init)


def _run_init(args: argparse.Namespace) -> None:
    import torch

    from .checkpoint.fresh import init_checkpoint
    from .device import resolve_device

    _new_or_directory(args.out)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists and is not an empty directory; choose another --out")
    print(init_checkpoint(get_preset(args.preset), out, dtype=getattr(torch, args.dtype), seed=args.seed,
                          device=resolve_device(args.device)))


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="weights and activations (auto: the checkpoint's, but fp32 for a bf16 checkpoint on a CPU "
                        "without fast bf16 matmuls, e.g. AVX2 only, and for a float16 one on any CPU)")
    p.add_argument("--quantize", default=None, choices=["int8", "fp8", "int4", "int4-mixed"],
                   help="weight quantization (docs/quantization.md)")
    p.add_argument("--speculative", type=non_negative_int, default=0, metavar="N",
                   help="MTP draft tokens per step (0: off)")
    _add_device(p)


def _add_sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=non_negative_int, default=max_new_tokens)
    p.add_argument("--temperature", type=temperature, default=0.0, help="0 = greedy; above it, sampling (and the "
                                                                       "four flags below)")
    p.add_argument("--top-p", type=top_p, default=None, help="nucleus sampling (default 1: off)")
    p.add_argument("--top-k", type=non_negative_int, default=None, help="sample among the k likeliest (default 0: "
                                                                        "off)")
    p.add_argument("--seed", type=seed, default=None, help="a seed for sampling (reproducible output)")
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
    from .infer.sampling import SamplingParams

    given = [flag for flag, value in (("--top-p", args.top_p), ("--top-k", args.top_k), ("--seed", args.seed),
                                      ("--min-p", args.min_p)) if value is not None]
    if args.temperature == 0 and given:  # greedy decoding reads none of them
        raise ValueError(f"{' and '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} when sampling: give "
                         "--temperature above 0 (0, the default, decodes greedily)")
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=1.0 if args.top_p is None else args.top_p, top_k=args.top_k or 0, seed=args.seed,
                          min_p=args.min_p or 0.0, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          ignore_eos=args.ignore_eos)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete one prompt; prints the generated text alone (or --json)")
    _add_model_flags(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", metavar="FILE", help="the prompt is FILE's text as it is, final newline "
                                                              "included (-: standard input)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    _add_sampling_flags(p, max_new_tokens=64)
    p.add_argument("--json", action="store_true", help="one JSON object: text, token counts, timings")
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> None:
    from .serve.local import generate_text, interrupt_on_sigint, load_session

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
    with interrupt_on_sigint() as interrupt:  # Ctrl-C ends the request: what it generated is still printed
        result = generate_text(engine, tokenizer, ids, params, args.stop, stream, interrupt)
    print(json.dumps({"prompt": prompt, **result.to_dict()}) if args.json else "")
    if result.finish_reason == "interrupted":
        sys.exit(130)  # the shell's status for SIGINT, as before
    if result.finish_reason == "length" and result.completion_tokens < args.max_new_tokens:
        print(f"longcat generate: stopped after {result.completion_tokens} of --max-new-tokens {args.max_new_tokens}: "
              f"the prompt's {result.prompt_tokens} tokens and these fill the context of {engine.max_context}",
              file=sys.stderr)


def _utf8_flag(flag: str, text: str) -> str:
    """A flag's text, refused by the flag's name when it holds an undecodable byte (Python passes one on)."""
    from .tokenizer import utf8_text

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
    from .serve.local import chat_loop, load_session

    if args.max_new_tokens < 1:  # every reply would be empty (generate takes 0: it scores the prompt)
        raise ValueError(f"--max-new-tokens must be at least 1 for chat, got {args.max_new_tokens}")
    if args.system is not None:
        _utf8_flag("--system", args.system)
    params = _sampling(args)  # checked before the model loads
    engine, tokenizer = load_session(args.model, dtype=args.dtype, quantize=args.quantize,
                                     speculative=args.speculative, device=args.device)
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
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0..65535, got {port}")
    return port


def _run_serve(args: argparse.Namespace) -> None:
    from .infer.engine import EngineConfig
    try:
        from .serve.server import serve
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
    if args.model_name is not None and not args.model_name.strip():  # was replaced by the directory's name unsaid
        sys.exit("longcat serve: --model-name is empty; leave it out to serve the model as its directory's name")
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, dtype=args.dtype,
          quantize=args.quantize, engine_config=engine, model_name=args.model_name, device=args.device,
          max_body_bytes=int(args.max_request_mb * 2**20), client_timeout_s=args.client_timeout,
          max_connections=args.max_connections)


COMMANDS += [_add_init, _add_generate, _add_chat, _add_serve]


# ---- data -----------------------------------------------------------------------------------------------

def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="make data sets locally (tools: synthetic tool-use conversations)")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    t = data_sub.add_parser("tools", help="synthetic tool-use conversations as OpenAI messages + tools JSONL "
                                          "(docs/tool_data.md)")
    t.add_argument("--out", required=True, help="JSONL file to write (.jsonl, or .jsonl.gz gzip-compressed; its "
                                                "directory must exist); - for standard output")
    t.add_argument("--n", type=int, required=True, help="number of conversations")
    t.add_argument("--seed", type=seed, default=0)
    t.add_argument("--tools-per-conversation", type=int, default=3, help="tools offered per conversation")
    t.add_argument("--split", default="train", choices=["train", "heldout"],
                   help="pool of tool names, parameter names and phrasings (disjoint between the two)")
    t.add_argument("--force", action="store_true", help="overwrite --out when it exists")
    t.set_defaults(run=_run_data_tools)


def _run_data_tools(args: argparse.Namespace) -> None:
    from .data.tool_dialogues import write_conversations

    if not args.out:
        raise ValueError("--out is empty; name the JSONL file to write, or - for standard output")
    if Path(args.out).is_file() and not args.force:
        raise FileExistsError(f"--out {args.out} exists; pass --force to overwrite it")
    out = write_conversations(sys.stdout if args.out == "-" else args.out, args.n, args.seed, args.split,
                              args.tools_per_conversation)
    print(f"wrote {args.n} {args.split} conversations -> {out or 'standard output'}",
          file=sys.stderr if out is None else sys.stdout)


COMMANDS += [_add_data]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longcat", description="LongCat-Flash: train, run and serve")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    parser.set_defaults(subcommands=sub.choices)  # so an unknown flag is reported with its command's usage
    return parser


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # the shell's status for the signal, after the cleanup a raise runs


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line; under torchrun a usage error (or --help) is printed by rank 0 alone (every rank has the
    same one), the other ranks exit with the same status quietly."""
    quiet = launched() and int(os.environ.get("RANK", "0")) != 0
    with contextlib.ExitStack() as silenced:
        if quiet:
            silenced.enter_context(contextlib.redirect_stderr(io.StringIO()))
            silenced.enter_context(contextlib.redirect_stdout(io.StringIO()))
        args, unknown = build_parser().parse_known_args(argv)
        if unknown:
            args.subcommands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.command != "serve":  # one-shot commands reuse their large blocks; serve tunes its engine process only
        tune_cpu_allocator()
    # SIGTERM (`timeout`, `kill`) ends a one-process command as Ctrl-C does, through its cleanup: a half-written
    # file's temporary name is removed. serve has its own shutdown; torchrun stops its workers itself.
    on_term = args.command != "serve" and not launched() and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if on_term else None
    try:
        _run(args)
    finally:
        if on_term:  # as it was (None: a handler not set from Python, taken as the default)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _run(args: argparse.Namespace) -> None:
    try:
        if launched() and args.command not in MULTI_PROCESS:  # N copies would each write the same files
            raise ValueError(f"runs in one process; start it without torchrun (only {' and '.join(MULTI_PROCESS)} "
                             "run under torchrun)")
        if launched() and int(os.environ.get("RANK", "0")):  # every rank reads the same files: rank 0 warns once
            logging.getLogger(__package__).setLevel(logging.ERROR)
        args.run(args)
    except DeviceError as err:  # a usage error, like a bad flag: status 2; each rank's own (its node's devices)
        rank = int(os.environ.get("RANK", "0"))
        print(f"longcat {args.command}{f' (rank {rank})' if rank else ''}: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: stop quietly with the shell's status for SIGINT
        print(file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader left (`longcat ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except RankZeroFailed:
        sys.exit(1)  # rank 0 prints what failed
    except RuntimeError as err:  # a collective failed: NCCL's and gloo's own errors, tracebacks from deep inside
        reason = peer_lost(err) if launched() else ""
        if not reason:
            raise
        sys.exit(f"longcat {args.command} (rank {os.environ.get('RANK', '0')}): lost contact with the other ranks "
                 f"({reason}): one of them stopped (torchrun's summary names it) or waited past --dist-timeout")
    except (ValueError, OSError, KeyError) as err:  # OSError: a read-only or full disk, a missing file, ...
        rank = int(os.environ.get("RANK", "0"))
        if rank and isinstance(err, (ValueError, KeyError)):
            sys.exit(1)  # settings and data are the same on every rank: rank 0 prints the one message
        message = err.args[0] if isinstance(err, KeyError) and err.args else err  # str(KeyError) adds quotes
        sys.exit(f"longcat {args.command}{f' (rank {rank})' if rank else ''}: {message}")


if __name__ == "__main__":
    main()
