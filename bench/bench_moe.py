"""MoE layer microbenchmark on the `bench` preset (issue: model core, item 7).

Side by side in one run, identical weights:
  1. our grouped MoE vs transformers' LongcatFlashMoE, prefill-sized and decode-sized batches;
  2. our MoE with 0%, 50% and 100% of the top-k slots forced onto zero experts (through the selection bias):
     time should shrink roughly in proportion to the FFN slots used, since zero experts never reach a GEMM.
Prints a table and one JSON line with the ratios.

    python bench/bench_moe.py [--dtype bfloat16|float32] [--prefill 1024] [--decode 1] [--repeats 10]
"""
from __future__ import annotations

import argparse
import json

import torch
from infer_common import interleaved

from longcat_flash.flag_types import positive_int
from longcat_flash.model.moe import MoE
from longcat_flash.presets import bench
from longcat_flash.runtime import tune_cpu_allocator


def transformers_moe(ours: MoE, cfg, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' LongcatFlashMoE holding exactly our weights, on the experts path a loaded model takes (a
    standalone module's config names none, and it fell back to the per-expert Python loop)."""
    from transformers import LongcatFlashConfig, LongcatFlashForCausalLM
    from transformers.models.longcat_flash.modeling_longcat_flash import LongcatFlashMoE

    hf_cfg = LongcatFlashConfig(**{k: v for k, v in cfg.to_dict().items() if k in LongcatFlashConfig.__annotations__})
    with torch.device("meta"):  # the model's __init__ picks the experts implementation, as from_pretrained does
        hf_cfg = LongcatFlashForCausalLM(hf_cfg).config
    theirs = LongcatFlashMoE(hf_cfg)
    with torch.no_grad():
        theirs.router.classifier.weight.copy_(ours.router.classifier.weight)
        theirs.router.e_score_correction_bias.copy_(ours.router.e_score_correction_bias)
        theirs.experts.gate_up_proj.zero_()[: cfg.n_routed_experts].copy_(ours.experts.gate_up_proj)
        theirs.experts.down_proj.copy_(ours.experts.down_proj)
    return theirs.to(dtype).eval()


def force_zero_share(moe: MoE, share: float) -> None:
    """Make `share` of each token's top-k slots land on zero experts: a few zero experts win for sure."""
    E, K = moe.n_ffn, moe.router.top_k
    n_zero = round(share * K)
    bias = moe.router.e_score_correction_bias
    bias.zero_()
    bias[E:] = -10.0
    bias[E:E + n_zero] = 10.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--prefill", type=positive_int, default=1024, help="tokens in the prefill-sized batch")
    parser.add_argument("--decode", type=positive_int, default=1, help="tokens in the decode-sized batch")
    parser.add_argument("--repeats", type=positive_int, default=10)
    args = parser.parse_args()
    tune_cpu_allocator()  # process-wide: both sides of the comparison get it
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    cfg = bench()
    ours = MoE(cfg)
    torch.nn.init.normal_(ours.router.classifier.weight, 0.0, 0.02)
    for p in ours.experts.parameters():
        torch.nn.init.normal_(p, 0.0, 0.02)
    theirs = transformers_moe(ours, cfg, dtype)
    ours = ours.to(dtype).eval()
    rows, result = [], {"preset": "bench", "dtype": args.dtype, "threads": torch.get_num_threads()}
    with torch.inference_mode():
        for label, tokens in (("prefill", args.prefill), ("decode", args.decode)):
            x = torch.randn(1, tokens, cfg.hidden_size, dtype=dtype)
            torch.testing.assert_close(ours(x)[0].float(), theirs(x).float(), atol=2e-2, rtol=2e-2)
            seconds = interleaved({"ours": lambda: ours(x), "hf": lambda: theirs(x)}, args.repeats)
            t_ours, t_hf = seconds["ours"] * 1e3, seconds["hf"] * 1e3
            rows.append((f"{label} T={tokens}", t_hf, t_ours, t_hf / t_ours))
            result[f"{label}_speedup_vs_transformers"] = round(t_hf / t_ours, 2)
        x = torch.randn(1, args.prefill, cfg.hidden_size, dtype=dtype)
        by_share = {}
        for share in (0.0, 0.5, 1.0):
            force_zero_share(ours, share)
            by_share[share] = interleaved({"ours": lambda: ours(x)}, args.repeats)["ours"] * 1e3
            result[f"ms_zero_share_{int(share * 100)}"] = round(by_share[share], 2)
    result["time_ratio_50_vs_0"] = round(by_share[0.5] / by_share[0.0], 3)
    result["time_ratio_100_vs_0"] = round(by_share[1.0] / by_share[0.0], 3)
    print(f"{'case':<18}{'transformers ms':>17}{'ours ms':>10}{'speed-up':>10}")
    for name, hf, mine, ratio in rows:
        print(f"{name:<18}{hf:>17.2f}{mine:>10.2f}{ratio:>9.2f}x")
    print(f"\nours, T={args.prefill}, share of top-k slots on zero experts:")
    for share, ms in by_share.items():
        print(f"  {share:>4.0%}: {ms:8.2f} ms  ({ms / by_share[0.0]:.2f} of the 0% time)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
