"""bench/gpu_check.py, the script a GPU session runs once, stays runnable: its CPU quick mode runs every section
(ours and transformers) here, so a GPU's few minutes are never spent on a broken script."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_quick_mode_runs_every_section_and_writes_its_figures(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (tmp_path / "gpu_check.txt").read_text().strip()
    assert report["passed"] is True
    assert set(report["sections"]) == {"environment", "train", "transformers_train", "decode"}


def test_the_device_to_measure_is_named(tmp_path, monkeypatch, capsys):
    """--device auto measured the CPU on a machine without a GPU and reported the check passed. (main() in this
    process: it refuses before it changes any process-wide setting.)"""
    assert gpu_check_module(monkeypatch).main(["--device", "auto", "--quick", "--out", str(tmp_path)]) == 2
    assert "--device auto: name the device to measure" in capsys.readouterr().err
    assert gpu_check_module(monkeypatch).main(["--device", "tpu", "--quick", "--out", str(tmp_path)]) == 2
    assert "--device tpu: name the device to measure (cuda, cuda:N or cpu)" in capsys.readouterr().err
    assert not (tmp_path / "gpu_check.json").exists()


def test_one_new_token_is_refused_and_an_earlier_table_goes(tmp_path, monkeypatch, capsys):
    """--new-tokens 1 printed a decode rate of 0.0 and passed; a run stopped midway left the last complete run's
    gpu_check.txt beside its own partial JSON."""
    gpu_check = gpu_check_module(monkeypatch)
    try:
        gpu_check.parse_args(["--device", "cpu", "--quick", "--out", str(tmp_path), "--new-tokens", "1"])
    except SystemExit as stop:
        assert stop.code == 2
    assert "--new-tokens 1: decode speed needs at least 2 new tokens" in capsys.readouterr().err
    (tmp_path / "gpu_check.txt").write_text("an earlier run's table")

    def interrupted(ctx, rec):
        raise KeyboardInterrupt  # Ctrl-C in the first section

    monkeypatch.setitem(gpu_check.RUNNERS, "environment", interrupted)
    for process_wide in ("deterministic_mode", "tune_cpu_allocator"):  # left as they are for the other tests
        monkeypatch.setattr(gpu_check, process_wide, lambda *args: None)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    assert not (tmp_path / "gpu_check.txt").exists()


def gpu_check_module(monkeypatch):
    """bench/gpu_check.py imported as the module `gpu_check`, for this test only."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # the script imports its sibling benchmarks
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # its dataclasses look their module up there
    spec.loader.exec_module(gpu_check)
    return gpu_check


def test_a_decode_too_fast_to_time_apart_from_its_prefill_has_no_rate(monkeypatch):
    """Decode rate = (N - 1) tokens over t(N) - t(1); when noise makes t(N) <= t(1), no figure, not 3e9 tok/s."""
    gpu_check = gpu_check_module(monkeypatch)
    assert gpu_check.decode_rate(2.0, 1.0, 65) == 64.0
    assert gpu_check.decode_rate(1.0, 1.0, 65) is None and gpu_check.decode_rate(0.9, 1.0, 65) is None
    assert gpu_check.ratio(None, 3.0) is None and gpu_check.ratio(6.0, 3.0) == 2.0
