"""The theoretical decode model against report Table 7 (report §6.3.2), and its response to the knobs."""
from __future__ import annotations

import json
import math

import pytest

from longcat_flash.analysis.cost_model import (
    TABLE7,
    Scenario,
    cost_command,
    cost_table,
    format_cost_table,
    longcat_decode_shape,
)
from longcat_flash.cli import main
from longcat_flash.presets import longcat_flash, small

LONGCAT, DEEPSEEK, QWEN = "LongCat-Flash", "DeepSeek-V3", "Qwen3-235B-A22B"


def _rows(**kwargs) -> dict[str, dict]:
    return {r["model"]: r for r in cost_table(**kwargs)}


def _rel(got: float, want: float) -> float:
    return abs(got / want - 1)


@pytest.mark.parametrize("model", [LONGCAT, DEEPSEEK, QWEN])
def test_dispatch_and_combine_within_one_microsecond(model) -> None:
    row = _rows()[model]
    assert abs(row["dispatch_us"] - TABLE7[model]["dispatch_us"]) <= 1
    assert abs(row["combine_us"] - TABLE7[model]["combine_us"]) <= 1


def test_longcat_tpot_and_price_within_ten_percent() -> None:
    row = _rows()[LONGCAT]
    assert _rel(row["tpot_ms"], 16) < 0.10
    assert _rel(row["usd_per_m_tokens"], 0.09) < 0.10


@pytest.mark.parametrize("model", [LONGCAT, DEEPSEEK, QWEN])
@pytest.mark.parametrize("key", ["attention_us", "moe_us", "tpot_ms", "usd_per_m_tokens"])
def test_other_rows_within_fifteen_percent(model, key) -> None:
    assert _rel(_rows()[model][key], TABLE7[model][key]) < 0.15


def test_longcat_sbo_layer_is_the_reports_sum_at_report_settings() -> None:
    """Report: TPL = attention + dispatch + MoE + combine (communication dominates both overlap windows)."""
    row = _rows()[LONGCAT]
    assert row["layer_us"] == pytest.approx(row["attention_us"] + row["dispatch_us"] + row["moe_us"]
                                            + row["combine_us"])
    assert row["tpot_ms"] == pytest.approx(28 * row["layer_us"] / 1.8 / 1000)


def test_zero_experts_do_not_travel() -> None:
    """LongCat's all-to-all carries K_e = 8 experts per token, not top-12."""
    shape = longcat_decode_shape(longcat_flash(), ffn_experts_per_token=12)
    top12 = cost_table([shape])[0]
    assert top12["dispatch_us"] == pytest.approx(_rows()[LONGCAT]["dispatch_us"] * 12 / 8)


def test_the_fan_out_is_the_k_e_info_counts_and_one_a_token_can_reach() -> None:
    """With Z=2 of top-12 a token picks at least 10 FFN experts: the shape took 8 (what `info` never shows), and 50
    or -3 (a negative dispatch time) without a word."""
    from longcat_flash.analysis.params import param_report

    cfg = longcat_flash().replace(zero_expert_num=2)
    assert longcat_decode_shape(cfg).ffn_experts_per_token == param_report(cfg).ffn_experts_target == 10
    for unreachable in (50, -3, 9):
        with pytest.raises(ValueError, match=r"must be in \[10, 12\]"):
            longcat_decode_shape(cfg, ffn_experts_per_token=unreachable)


def test_smaller_ep_makes_moe_memory_bound_and_slower() -> None:
    base, narrow, wide = _rows(), _rows(ep=16), _rows(ep=256)
    for model in (LONGCAT, DEEPSEEK, QWEN):
        assert narrow[model]["moe_us"] > base[model]["moe_us"] >= wide[model]["moe_us"]
        assert narrow[model]["tpot_ms"] > base[model]["tpot_ms"]
        assert narrow[model]["dispatch_us"] == base[model]["dispatch_us"]  # set by per-device batch and fan-out


def test_on_one_device_nothing_travels() -> None:
    one = _rows(ep=1)
    assert all(row["dispatch_us"] == row["combine_us"] == 0 for row in one.values())
    assert all(row["dispatch_us"] > 0 for row in _rows(ep=2).values())


def test_more_bandwidth_shortens_communication_and_tpot() -> None:
    base, fast = _rows(), _rows(a2a_bandwidth_gbps=80)
    for model in (LONGCAT, DEEPSEEK, QWEN):
        assert fast[model]["dispatch_us"] == pytest.approx(base[model]["dispatch_us"] / 2)
        assert fast[model]["combine_us"] == pytest.approx(base[model]["combine_us"] / 2)
        assert fast[model]["tpot_ms"] < base[model]["tpot_ms"]


def test_batch_and_acceptance_move_the_right_way() -> None:
    base, big, sure = _rows(), _rows(batch_per_device=192), _rows(mtp_acceptance=1.0)
    for model in (LONGCAT, DEEPSEEK, QWEN):
        assert big[model]["dispatch_us"] == pytest.approx(2 * base[model]["dispatch_us"])
        assert big[model]["tpot_ms"] > base[model]["tpot_ms"]
        assert sure[model]["tpot_ms"] == pytest.approx(base[model]["tpot_ms"] * 1.8 / 2.0)


def test_without_speculation_one_token_per_forward() -> None:
    plain = _rows(draft_tokens=0)[LONGCAT]
    assert plain["dispatch_us"] == pytest.approx(_rows()[LONGCAT]["dispatch_us"] / 2)


def test_any_longcat_config_can_be_costed() -> None:
    row = cost_table([longcat_decode_shape(small(), name="small")], context=1024)[0]
    assert row["report"] is None and row["tpot_ms"] > 0
    with pytest.raises(ValueError, match="context 5000 is longer than a model serves \\(positions: small 4096\\)"):
        cost_table([longcat_decode_shape(small(), name="small")])  # the report's context, past small's


def test_bad_inputs_fail_early() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        cost_table(["GPT-5"])
    with pytest.raises(ValueError, match="mtp_acceptance"):
        Scenario(mtp_acceptance=1.5)
    with pytest.raises(ValueError, match="ep"):
        cost_table(ep=0)
    with pytest.raises(ValueError, match="a2a_bandwidth_gbps must be > 0 and finite"):
        cost_table(a2a_bandwidth_gbps=math.inf)  # it gave 0 us of communication
    with pytest.raises(ValueError, match=f"models: {LONGCAT} given more than once"):
        cost_table([LONGCAT, QWEN, LONGCAT])


def test_table_and_json_output() -> None:
    text = format_cost_table(cost_table())
    assert "(236)" in text and "SBO" in text and "context 5000" in text
    rows = json.loads(cost_command(as_json=True))
    assert [r["model"] for r in rows] == [DEEPSEEK, QWEN, LONGCAT]
    other = format_cost_table(cost_table(batch_per_device=1))  # not the report's setting: no figures of its beside
    assert "(236)" not in other and "(" not in other.split("\n")[5]
    short = format_cost_table(cost_table(context=0))  # the footnote said "context 5000", the report's figures beside
    assert "Ours: context 0," in short and "(236)" not in short and rows[0]["context"] == 5000


@pytest.mark.parametrize("flags, message", [
    (["--ep", "0"], "argument --ep: must be > 0, got 0"),  # was "Scenario.ep must be ..."
    (["--context", "-1"], "argument --context: must be >= 0, got -1"),  # was "Scenario.draft_tokens and ..."
    (["--acceptance", "1.5"], "argument --acceptance: must be in [0, 1], got 1.5"),
    (["--bandwidth", "nan"], "argument --bandwidth: must be a finite number, got nan"),
])
def test_a_bad_flag_is_named_as_typed(flags, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["cost", *flags])
    assert stopped.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--batch", "1" + "0" * 400], ["--bandwidth", "1e-320", "--json"]],
                         ids=["huge-batch", "tiny-bandwidth"])
def test_a_setting_beyond_floating_point_range_is_one_line(flags):
    """A 400-digit --batch was an OverflowError traceback (from the flag's own finiteness check, then from the
    times); --bandwidth 1e-320 printed `Infinity`, which is not JSON."""
    with pytest.raises(SystemExit, match="the figures at this setting are beyond floating-point range"):
        main(["cost", *flags])


def test_a_context_longer_than_a_model_serves_is_refused(capsys):
    """`info --context` refused a context past the model's; `cost` priced 10M-token contexts nobody serves."""
    with pytest.raises(SystemExit, match="context 131073 is longer than a model serves .*LongCat-Flash 131072"):
        main(["cost", "--context", "131073"])
    with pytest.raises(SystemExit, match=r"positions: Qwen3-235B-A22B 131072, LongCat-Flash 131072\)"):
        main(["cost", "--models", "DeepSeek-V3", "Qwen3-235B-A22B", "LongCat-Flash", "--context", "150000"])
    main(["cost", "--models", "DeepSeek-V3", "--context", "150000"])
    assert "context 150000" in capsys.readouterr().out
