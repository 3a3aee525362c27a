"""The benchmark scripts refuse a bad flag value in one usage line naming the flag, before any work: a zero or
negative count was a traceback from deep inside (StatisticsError, a reshape, set_num_threads) or, worse, a run that
measured nothing and printed a ratio; a repeated list value ran a variant twice. Each script runs in this process
through runpy (they refuse before changing any process-wide setting)."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from longcat_flash.cli import main as longcat

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """A tiny checkpoint, and a copy of it without its tokenizer."""
    root = tmp_path_factory.mktemp("bench_flags")
    longcat(["init", "--preset", "tiny", "--out", str(root / "tiny"), "--dtype", "float32"])
    (root / "weights_only").mkdir()
    for name in ("config.json", "model.safetensors"):
        (root / "weights_only" / name).write_bytes((root / "tiny" / name).read_bytes())
    (root / "config_only").mkdir()
    (root / "config_only" / "config.json").write_bytes((root / "tiny" / "config.json").read_bytes())
    return {"TINY": str(root / "tiny"), "NOTOK": str(root / "weights_only"), "NOWEIGHTS": str(root / "config_only")}


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
