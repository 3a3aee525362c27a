"""`longcat` entry point: parse arguments, build objects, call one function. No logic lives here."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from .config import ModelConfig
from .presets import PRESETS, get_preset


def _config_from(target: str) -> ModelConfig:
    """A preset name or a checkpoint directory holding config.json."""
    if target in PRESETS:
        return get_preset(target)
    if Path(target).is_dir():
        return ModelConfig.from_json(target)
    raise SystemExit(f"longcat: {target!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                     "nor a directory with config.json")


# ---- info -----------------------------------------------------------------------------------------------

def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameter counts, active parameters, KV-cache bytes and FLOPs per token")
    p.add_argument("target", help=f"a preset ({', '.join(sorted(PRESETS))}) or a checkpoint directory")
    p.add_argument("--ffn-experts", type=float, default=None, help="K_e for the average figure (default 2/3 K)")
    p.add_argument("--context", type=int, default=0, help="context length for attention FLOPs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> None:
    from .analysis.params import format_report, param_report

    report = param_report(_config_from(args.target), ffn_experts_target=args.ffn_experts, context=args.context)
    print(json.dumps(report.to_dict()) if args.json else format_report(report))


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_info]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longcat", description="LongCat-Flash: train, run and serve")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        sys.exit(f"longcat {args.command}: {err}")


if __name__ == "__main__":
    main()
