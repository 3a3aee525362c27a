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


# ---- cost -----------------------------------------------------------------------------------------------

def _add_cost(sub: argparse._SubParsersAction) -> None:
    from .analysis.cost_model import MODELS

    p = sub.add_parser("cost", help="the report's theoretical decode cost model (Table 7): TPOT and $/M tokens")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--ep", type=int, default=128, help="expert-parallel degree")
    p.add_argument("--batch", type=int, default=96, help="sequences per device")
    p.add_argument("--acceptance", type=float, default=0.8, help="MTP draft acceptance rate")
    p.add_argument("--bandwidth", type=float, default=40.0, help="all-to-all bandwidth, GB/s")
    p.add_argument("--context", type=int, default=5000, help="average context length")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    p.set_defaults(run=_run_cost)


def _run_cost(args: argparse.Namespace) -> None:
    from .analysis.cost_model import cost_command

    print(cost_command(args.models, ep=args.ep, batch_per_device=args.batch, mtp_acceptance=args.acceptance,
                       a2a_bandwidth_gbps=args.bandwidth, context=args.context, as_json=args.json))


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_info, _add_cost]


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
