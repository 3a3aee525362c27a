"""`longcat info`, `cost` and `explain`: the analysis commands."""
from __future__ import annotations

import argparse

from ..flag_types import fraction, non_negative_int, positive_float, positive_int, user_path
from ..presets import PRESETS
from .common import add_device, new_or_directory


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameter counts, active parameters, KV-cache bytes and FLOPs per token")
    p.add_argument("target", type=user_path,
                   help=f"a preset ({', '.join(sorted(PRESETS))}), a model directory (the figures of its "
                         "config.json; the weights are not read), a run directory or one of its training checkpoints")
    p.add_argument("--ffn-experts", type=float, default=None, help="K_e for the average figure (default: a run's "
                   "budget.target, else 2/3 K)")
    p.add_argument("--context", type=non_negative_int, default=0, help="context length for attention FLOPs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> None:
    from ..analysis.info_target import config_of, run_budget_target
    from ..analysis.params import info_command

    k_e = args.ffn_experts if args.ffn_experts is not None else run_budget_target(args.target)
    print(info_command(config_of(args.target), ffn_experts_target=k_e, context=args.context, as_json=args.json))


# ---- cost -----------------------------------------------------------------------------------------------

def _add_cost(sub: argparse._SubParsersAction) -> None:
    from ..analysis.cost_model import MODELS

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
    from ..analysis.cost_model import cost_command

    print(cost_command(args.models, ep=args.ep, batch_per_device=args.batch, mtp_acceptance=args.acceptance,
                       a2a_bandwidth_gbps=args.bandwidth, context=args.context, as_json=args.json))


# ---- explain --------------------------------------------------------------------------------------------

def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="per-token view of the FFN experts each token used, per layer "
                                       "(HTML, PNG, JSON; report App. A.1)")
    p.add_argument("--model", type=user_path,
                   required=True, help="checkpoint directory with config.json, safetensors and "
                                       "tokenizer.json")
    p.add_argument("--text", required=True, help="the text to run through the model (one forward)")
    p.add_argument("--out", type=user_path,
                   default="explain", help="directory for explain.html, explain.png, explain.json "
                                            "(default: explain; files of those names there are replaced)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the summary table")
    add_device(p)
    p.set_defaults(run=_run_explain)


def _run_explain(args: argparse.Namespace) -> None:
    from ..analysis.explain import explain_command

    new_or_directory(args.out)
    print(explain_command(args.model, args.text, args.out, as_json=args.json, device=args.device))


COMMANDS = [_add_info, _add_cost, _add_explain]
