"""`longcat data`: data sets made locally."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..flag_types import seed, user_path


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="make data sets locally (tools: synthetic tool-use conversations)")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    t = data_sub.add_parser("tools", help="synthetic tool-use conversations as OpenAI messages + tools JSONL "
                                          "(docs/tool_data.md)")
    t.add_argument("--out", type=user_path,
                   required=True, help="JSONL file to write (.jsonl, or .jsonl.gz gzip-compressed; its "
                                       "directory must exist); - for standard output")
    t.add_argument("--n", type=int, required=True, help="number of conversations")
    t.add_argument("--seed", type=seed, default=0)
    t.add_argument("--tools-per-conversation", type=int, default=3, help="tools offered per conversation")
    t.add_argument("--split", default="train", choices=["train", "heldout"],
                   help="pool of tool names, parameter names and phrasings (disjoint between the two)")
    t.add_argument("--force", action="store_true", help="overwrite --out when it exists")
    t.set_defaults(run=_run_data_tools)


def _run_data_tools(args: argparse.Namespace) -> None:
    from ..data.tool_dialogues import write_conversations

    if not args.out:
        raise ValueError("--out is empty; name the JSONL file to write, or - for standard output")
    if Path(args.out).is_file() and not args.force:
        raise FileExistsError(f"--out {args.out} exists; pass --force to overwrite it")
    out = write_conversations(sys.stdout if args.out == "-" else args.out, args.n, args.seed, args.split,
                              args.tools_per_conversation)
    print(f"wrote {args.n} {args.split} conversations -> {out or 'standard output'}",
          file=sys.stderr if out is None else sys.stdout)


COMMANDS = [_add_data]
