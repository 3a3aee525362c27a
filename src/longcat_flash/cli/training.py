"""`longcat train`, `sft` and `grow`: the training commands (the ones torchrun may launch)."""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from ..distributed.env import DIST_TIMEOUT_S, launched
from ..flag_types import positive_float, seed, user_path
from .common import add_device, new_or_directory


# CLI flag -> TrainConfig field; every other field is set with --set section.field=value.
_TRAIN_FLAGS = {"data": "data.source", "max_steps": "max_steps", "seed": "seed", "save_every": "checkpoint.save_every"}
_SFT_FLAGS = {"model": "init_from", "data": "sft.data", "val_data": "sft.val_data", "max_steps": "max_steps",
              "seed": "seed", "save_every": "checkpoint.save_every"}


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags `train` and `sft` share: one training loop, one set of controls."""
    p.add_argument("--out", type=user_path,
                   default=None, help="run directory (default runs/<preset> for train, runs/sft for sft; "
                                          "with --resume DIR, DIR)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=seed, default=None)
    p.add_argument("--save-every", type=int, default=None, help="steps between training checkpoints")
    p.add_argument("--resume", type=user_path, nargs="?", const=True, default=None, metavar="RUN_DIR",
                   help="continue the newest checkpoint of RUN_DIR (default: --out), bit-for-bit")
    p.add_argument("--auto-resume", action="store_true",
                   help="continue --out's newest checkpoint where it has one, else start a new run there: one "
                        "command for the first start and every restart (torchrun --max-restarts, a requeued job)")
    p.add_argument("--accept-changed-data", action="store_true",
                   help="with --resume / --auto-resume: go on although the data differs from the checkpoint's "
                        "(files added, removed or edited, or a newer version that tokenizes them differently); not "
                        "bit for bit")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config field, e.g. --set budget.rate=0.01 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print every config field and value, then exit")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars: a line as each long phase starts and ends (metrics.jsonl is still written)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel ranks (under torchrun; divides the "
                                                         "experts; default: world / dp, or 1)")
    p.add_argument("--dp", type=int, default=None, help="data-parallel groups of --ep ranks (default: world / ep)")
    p.add_argument("--no-overlap", action="store_true", help="block on each all-to-all instead of hiding it "
                                                             "behind the dense path (with --ep > 1; for measurements)")
    p.add_argument("--dist-timeout", type=positive_float, default=None, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others, to start and in each collective "
                        f"(default {DIST_TIMEOUT_S:g})")
    add_device(p)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", allow_abbrev=False,
                       help="train a LongCat-Flash model (default: the small preset on the Python stdlib)",
                       description="Train a tokenizer, tokenize the corpus and train; OUT ends as an HF checkpoint "
                                   "with metrics.jsonl, training checkpoints and sample.txt. Any config field: "
                                   "--set section.field=value (list them with --print-config).")
    p.add_argument("--preset", default=None, help="model + recipe: tiny, small (default), bench")
    p.add_argument("--data", type=user_path, default=None,
                   help="corpus: 'stdlib' (default), a directory, a quoted glob, a text file, .jsonl, .parquet")
    _add_run_flags(p)
    p.set_defaults(run=_run_train, preset_name=None, flag_fields=_TRAIN_FLAGS)


def _add_sft(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sft", allow_abbrev=False,
                       help="supervised fine-tuning on chat / tool-use conversations (docs/sft.md)",
                       description="Fine-tune the HF model in --model on OpenAI-format conversations (loss on the "
                                   "assistant tokens, conversations packed with document masking); OUT ends as an "
                                   "HF checkpoint with its tokenizer, metrics.jsonl, training checkpoints and "
                                   "sample.txt. Any config field: --set section.field=value (--print-config).")
    p.add_argument("--model", type=user_path,
                   default=None, help="HF model directory to start from (config.json, safetensors, "
                                      "tokenizer.json)")
    p.add_argument("--data", type=user_path, default=None,
                   help="conversations: .jsonl, .json, .parquet, .arrow (a directory or a quoted glob of them), "
                        "one {messages, tools} per row (or TRL prompt-completion, ShareGPT, Alpaca rows: docs/sft.md)")
    p.add_argument("--val-data", type=user_path,
                   default=None, help="held-out conversations (default: data.val_fraction of --data)")
    _add_run_flags(p)
    p.set_defaults(run=_run_train, preset_name="sft", flag_fields=_SFT_FLAGS)


def _checked_run_flags(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """Refuses flags that contradict each other, before any config is built. Returns the run directory and the
    settings the flags make (`key=value`, the dedicated flags' first, then --set's)."""
    from ..checkpoint import hf
    from ..train.config import RECIPES
    from ..train.overrides import override_keys

    if args.auto_resume:
        _auto_resume(args)
    out = args.resume if isinstance(args.resume, str) else args.out
    same = args.out is None or os.path.realpath(args.out) == os.path.realpath(str(args.resume))  # base/ is ./base
    if isinstance(args.resume, str) and not same:
        raise ValueError(f"--resume {args.resume} continues in its own directory; drop --out {args.out}")
    if args.resume is not None and out is None:
        raise ValueError("--resume needs a run directory: --resume RUN_DIR or --out RUN_DIR")
    if args.accept_changed_data and args.resume is None and not args.auto_resume:
        raise ValueError("--accept-changed-data only applies when a run is resumed: add --resume or --auto-resume")
    if args.command == "sft" and not (args.resume or args.print_config) and (args.model is None or args.data is None):
        raise ValueError("longcat sft needs --model DIR and --data FILE (or --resume RUN_DIR)")
    flags = {key: f"{key}={getattr(args, name)}" for name, key in args.flag_fields.items()
             if getattr(args, name) is not None}
    flag_of = {key: name for name, key in args.flag_fields.items()}
    for override in args.overrides:
        if clash := sorted(override_keys(override) & flags.keys()):
            flag = f"--{flag_of[clash[0]].replace('_', '-')}"
            raise ValueError(f"{flag} and --set {override} both set {clash[0]}; give one of them")
    if args.command == "sft" and args.model is not None:  # said by its flag, not as the init_from it becomes
        try:
            hf.model_directory(args.model)
        except (OSError, ValueError) as err:
            raise ValueError(f"--model {args.model}: {err}") from None
    if args.command == "train" and args.preset == "sft":
        raise ValueError("the sft recipe fine-tunes a model on conversations: longcat sft --model DIR --data FILE")
    if args.command == "train" and args.preset is not None and args.preset not in RECIPES:
        raise ValueError(f"--preset {args.preset}: no such recipe; choose one of "
                         f"{', '.join(p for p in RECIPES if p != 'sft')}")
    return out, [*flags.values(), *args.overrides]


def _run_train(args: argparse.Namespace) -> None:
    from .. import distributed
    from ..train.checkpoints import exactness_notice, resume_config, resumed_ep, schedule_notice, validation_notice
    from ..train.config import build_config, describe
    from ..train.trainer import TrainingStopped, train

    out, settings = _checked_run_flags(args)
    preset = args.preset if args.command == "train" else None if args.resume else args.preset_name
    saved = resume_config(out) if args.resume else None
    if saved is not None and (saved.sft.data is not None) != (args.command == "sft"):
        other = "sft" if saved.sft.data is not None else "train"
        raise ValueError(f"{out} is a `longcat {other}` run: continue it with longcat {other} --resume "
                         f"{shlex.quote(out)}")
    cfg = build_config(preset, settings, saved)
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
    new_or_directory(out)
    device = distributed.init(args.device, args.dist_timeout or DIST_TIMEOUT_S)  # a process group under torchrun
    if args.auto_resume:  # each rank decided from what it sees in --out: first, or it reads as another command line
        distributed.check_same_settings({"a checkpoint in --out": args.resume is not None}, (
            "with --auto-resume the ranks disagree on whether --out holds a checkpoint", "every rank needs --out on "
            "one shared filesystem (all nodes see the files rank 0 writes there)"))
    distributed.check_same_settings({**cfg.to_dict(), "--resume": args.resume is not None, "--dp": dp, "--ep": ep,
                                     "--no-overlap": args.no_overlap, "--accept-changed-data": args.accept_changed_data
                                     })  # --out: check_shared_directory, below
    mesh = distributed.build_mesh(dp, ep, device)
    notices = (layout_notice, schedule_notice(out, cfg), validation_notice(out, cfg),
               exactness_notice(out, cfg, device)) if saved is not None else ()
    for notice in notices:
        if notice:
            distributed.print0(notice)
    try:
        resume = "auto" if args.auto_resume else args.resume is not None
        summary = train(cfg, out or f"runs/{cfg.preset}", resume=resume,
                        progress=not args.no_progress, mesh=mesh, overlap=not args.no_overlap, device=device,
                        same_data=not args.accept_changed_data)
    except TrainingStopped as err:  # every rank stops on the same averaged losses: rank 0 says why
        sys.exit(f"longcat {args.command}: {err}" if distributed.is_main() else 1)
    distributed.print0(f"done: {summary['steps']} steps, {summary['tokens']} tokens -> {summary['out']}\n"
                       f"--- sample ---\n{summary['sample']}")
    distributed.teardown()


def _auto_resume(args: argparse.Namespace) -> None:
    """--auto-resume: --resume where --out holds a checkpoint (its saved config under the flags), a new run there
    otherwise."""
    from ..train.checkpoints import has_checkpoint

    if args.resume is not None:
        raise ValueError("--auto-resume and --resume both choose whether to continue; give one of them")
    if args.out is None:
        raise ValueError("--auto-resume needs --out RUN_DIR: the directory the run starts in or continues")
    new_or_directory(args.out)
    args.resume = True if has_checkpoint(args.out) else None  # train() decides again, and says so in its header


def _add_grow(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("grow", allow_abbrev=False,
                       help="model growth: stack a trained model r times in depth (report §3.1.2)",
                       description="SRC: a run directory (keeps optimizer, schedule, counters; continue with "
                                   "`longcat train --resume DST`) or an HF model directory (weights only).")
    p.add_argument("src", type=user_path, help="run directory, checkpoint directory, or HF model directory")
    p.add_argument("--out", type=user_path, required=True, help="new directory for the grown run or model")
    p.add_argument("--factor", type=int, default=2, help="r: how many times the layer stack is repeated")
    add_device(p)
    p.set_defaults(run=_run_grow)


def _run_grow(args: argparse.Namespace) -> None:
    from ..device import resolve_device
    from ..train.checkpoints import saved_train_config
    from ..train.config import CHECKPOINTS
    from ..train.growth import grow_run

    new_or_directory(args.out)
    grown = grow_run(args.src, args.out, args.factor, device=resolve_device(args.device))
    if grown.parent.name == CHECKPOINTS:
        command = "sft" if saved_train_config(grown).sft.data is not None else "train"
        print(f"grown x{args.factor}: {grown} (a run: continue it with longcat {command} --resume "
              f"{shlex.quote(args.out)})")
    else:
        print(f"grown x{args.factor}: {grown} (a model, weights only: {args.src} holds no training checkpoint; start "
              f"from it with longcat train --set init_from={shlex.quote(args.out)}, or longcat sft --model "
              f"{shlex.quote(args.out)})")


COMMANDS = [_add_train, _add_sft, _add_grow]
MULTI_PROCESS = ("train", "sft")  # the commands torchrun may launch
