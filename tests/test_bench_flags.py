"""The benchmark scripts refuse a bad flag value in one usage line naming the flag, before any work: a zero or
negative count was a traceback from deep inside (StatisticsError, a reshape, set_num_threads) or, worse, a run that
measured nothing and printed a ratio; a repeated list value ran a variant twice. Each script runs in this process
through runpy (they refuse before changing any process-wide setting)."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

from longcat_flash.checkpoint.fresh import init_checkpoint
from longcat_flash.cli import main as longcat
from longcat_flash.presets import tiny

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """A tiny checkpoint, a copy of it without its tokenizer, one without an MTP head."""
    root = tmp_path_factory.mktemp("bench_flags")
    longcat(["init", "--preset", "tiny", "--out", str(root / "tiny"), "--dtype", "float32"])
    init_checkpoint(tiny().replace(num_nextn_predict_layers=0), root / "no_mtp", dtype=torch.float32)
    (root / "weights_only").mkdir()
    for name in ("config.json", "model.safetensors"):
        (root / "weights_only" / name).write_bytes((root / "tiny" / name).read_bytes())
    (root / "config_only").mkdir()
    (root / "config_only" / "config.json").write_bytes((root / "tiny" / "config.json").read_bytes())
    return {"TINY": str(root / "tiny"), "NOTOK": str(root / "weights_only"), "NOWEIGHTS": str(root / "config_only"),
            "NOMTP": str(root / "no_mtp")}


CASES = [
    ("bench_serve.py", ["--threads", "0"], "argument --threads: must be > 0, got 0"),
    ("bench_serve.py", ["--repeats", "0"], "argument --repeats: must be > 0, got 0"),
    ("bench_serve.py", ["--preset", "bogus"], "argument --preset: invalid choice: 'bogus'"),
    ("bench_moe.py", ["--prefill", "0"], "argument --prefill: must be > 0, got 0"),
    ("bench_moe.py", ["--decode", "-1"], "argument --decode: must be > 0, got -1"),
    ("bench_int8_prefill.py", ["--rows", "-5"], "argument --rows: must be > 0, got -5"),
    ("bench_kernel_rows.py", ["--rows", "0"], "argument --rows: must be > 0, got 0"),
    ("bench_kernel_rows.py", ["--formats", "int8", "int8"], "--formats: int8 given more than once"),
    ("bench_tiles.py", ["--repeats", "nan"], "argument --repeats: not an integer: 'nan'"),
    ("bench_decode.py", ["--formats", "int4", "int4"], "--formats: int4 given more than once"),
    ("bench_decode.py", ["--speculative", "17"], "--speculative: at most 16 drafts per step, got 17"),
    ("bench_mtp.py", ["--model", "TINY", "--drafts", "1", "1"], "--drafts: 1 given more than once"),
    ("bench_mtp.py", ["--model", "TINY", "--drafts", "100"], "--drafts: at most 16 drafts per step, got 100"),
    ("bench_mtp.py", ["--model", "NOTOK"], "tokenizer file not found"),
    ("bench_quant.py", ["--model", "NOTOK"], "tokenizer file not found"),
    ("bench_serve.py", ["--model", "NOTOK"], "tokenizer file not found"),  # a traceback once the server was up
    # a folder without weights was a traceback after the benchmark's startup
    ("bench_decode.py", ["--model", "NOWEIGHTS"], "no model.safetensors or model.safetensors.index.json"),
    ("bench_decode.py", ["--model", "TINY", "--prefill", "512"], "--prefill + 1 = 513 tokens is past the model's"),
    ("bench_tiles.py", ["--threads", "100000"], "argument --threads: must be in [1, "),  # OpenMP segfaulted
    ("bench_grammar.py", ["--large-tokenizer", "FILE"], "--large-tokenizer FILE is a file"),  # after 2 min of BPE
    ("bench_grammar.py", ["--large-tokenizer", "/proc/longcat_bpe"], "cannot cache the BPE there"),  # likewise
    ("bench_serve.py", ["--preset", "longcat_flash"], "argument --preset: invalid choice: 'longcat_flash'"),
    ("bench_ep.py", ["--tokens", "700"], "--tokens 700: the training step takes rows of 256 tokens"),  # ran 512
    ("bench_ep.py", ["--tokens", "99999999999999999999"], "--tokens 99999999999999999999: the training step"),
    ("bench_ep.py", ["--ep", "3"], "--ep 3 does not divide the "),  # four ranks' tracebacks
    ("bench_mtp.py", ["--model", "TINY", "--prompts", "100000000"], "--prompts 100000000: the package's sources"),
    ("bench_train.py", ["--seq", "100000"], "--seq 100000 is past the model's context"),  # data.seq_len's error
    ("bench_decode.py", ["--threads", "100000"], "argument --threads: must be in [1, "),
    ("bench_quant.py", ["--model", "TINY", "--keep-top", "-1"], "argument --keep-top: must be >= 0, got -1"),
    ("bench_quant.py", ["--model", "TINY", "--keep-fraction", "0"], "error: --keep-fraction 0.0: in (0, 1]"),
    ("bench_quant.py", ["--model", "TINY", "--window", "64", "--tokens", "32"],  # each names its own flag
     "error: --tokens 32: at least --window 64 (whole windows are scored)"),
    ("bench_quant.py", ["--model", "TINY", "--tokens", "100000000", "--window", "128"],
     "--tokens 100000000: the held-out text has"),
    ("bench_mtp.py", ["--model", "TINY", "--new-tokens", "1"], "--new-tokens must be at least 2"),  # a TypeError
    ("bench_mtp.py", ["--model", "NOMTP"], "no_mtp has no MTP head (num_nextn_predict_layers=0"),  # a traceback
    ("bench_decode.py", ["--model", "NOMTP", "--speculative", "1"], "--speculative 1: "),  # after minutes of loading
    ("bench_int8_prefill.py", ["--rows", "16"], "--rows must be more than 16: up to that many rows"),  # another kernel
    ("bench_serve.py", ["--model", "TINY", "--new-tokens", "600"], "--new-tokens 600 after the longest prompt"),
    ("bench_mtp.py", ["--model", "TINY", "--new-tokens", "100000"], "is past the model's context (512)"),  # cut short
    ("gpu_check.py", ["--out", "FILE", "--quick"], "--out FILE is a file; name a directory"),
    ("gpu_check.py", ["--out", "OUT", "--steps", "0"], "argument --steps: must be > 0, got 0"),
    ("gpu_check.py", ["--out", "OUT", "--steps", "8", "--skip", "20"], "--skip 20 leaves none of --steps 8 timed"),
    ("gpu_check.py", ["--out", "OUT", "--peak-tflops", "0"], "argument --peak-tflops: must be > 0, got 0"),
    ("gpu_check.py", ["--out", "OUT", "--time-limit-s", "nan"], "argument --time-limit-s: must be a finite number, got nan"),
]


@pytest.mark.parametrize("script, argv, message", CASES, ids=[f"{s}:{' '.join(a)}" for s, a, _ in CASES])
def test_a_bad_flag_value_is_one_usage_line(script, argv, message, models, tmp_path, monkeypatch, capsys):
    (tmp_path / "FILE").write_text("")
    names = {**models, "FILE": str(tmp_path / "FILE"), "OUT": str(tmp_path / "out")}
    argv = [names.get(a, a) for a in argv]
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import their siblings
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(BENCH / script), run_name="__main__")
    said = capsys.readouterr().err if stopped.value.code == 2 else str(stopped.value.code)
    assert message.replace("FILE", names["FILE"]) in said, said
    assert "Traceback" not in said and not (tmp_path / "out").exists()


def test_a_decode_rate_lost_in_the_timing_noise_stops_bench_decode(monkeypatch):
    """N tokens timed no slower than 1 (tiny settings, a noisy host) printed negative tok/s and ratios."""
    monkeypatch.syspath_prepend(str(BENCH))
    bench = runpy.run_path(str(BENCH / "bench_decode.py"))
    rates = {name: bench["decode_rate"](t_n, 1.0, 4) for name, t_n in (("hf", 1.3), ("int4", 0.98), ("int8", 1.0))}
    assert rates == {"hf": pytest.approx(10.0), "int4": None, "int8": None}
    with pytest.raises(SystemExit, match=r"the decode of 4 streams of int4, 4 streams of int8 was lost in the timing "
                                         r"noise .*give more --new-tokens"):
        bench["measurable"](rates, "4 streams of {}")
    assert bench["measurable"]({"hf": 10.0}) == {"hf": 10.0}


def test_the_transformers_copies_of_two_checkpoints_of_one_name_both_stay(tmp_path, monkeypatch):
    """Converting one `run` deleted the cached copy of every other checkpoint whose folder was named `run*`."""
    monkeypatch.syspath_prepend(str(BENCH))
    import infer_common

    monkeypatch.setattr(infer_common, "DEFAULT_DIR", tmp_path / "cache")
    for where in ("a", "b"):
        init_checkpoint(tiny(), tmp_path / where / "run", dtype=torch.float32)
        infer_common.transformers_model(tmp_path / where / "run", torch.float32)
    assert len(list((tmp_path / "cache" / "transformers").iterdir())) == 2
    (tmp_path / "a" / "run" / "config.json").touch()  # a new state of a/run: its own earlier copy goes, b's stays
    infer_common.transformers_model(tmp_path / "a" / "run", torch.float32)
    assert len(list((tmp_path / "cache" / "transformers").iterdir())) == 2
