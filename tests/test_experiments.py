"""Every experiment runs end to end in its --quick mode (real trainer, real corpus, seconds) and writes its JSON
and PNG. Their numbers mean nothing at this size; the full runs behind the README table are not tests."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
LIBRARIES = {"common.py", "budget_convergence.py"}  # a helper module; an analysis of an existing run directory
NAMES = sorted(p.stem for p in EXPERIMENTS.glob("*.py") if p.name not in LIBRARIES)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("experiments")  # one work root: the tokenizer and token shard are shared


def test_there_are_experiments():
    assert len(NAMES) >= 9, NAMES


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_quick_mode_writes_json_and_png(name: str, work: Path):
    out = work / "out"
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / f"{name}.py"), "--quick", "--out", str(out),
                           "--work", str(work / name)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    record = json.loads((out / f"{name}.json").read_text())
    assert record["experiment"] == name and record["quick"] is True
    assert record["claim"] and record["setup"] and record["verdict"] and record["results"]
    assert record["reproduced"] in (True, False, None)
    assert (out / f"{name}.png").stat().st_size > 1000
