"""bench/gpu_check.py, the script a GPU session runs once, stays runnable: its CPU quick mode runs every section
(ours and transformers) here, so a GPU's few minutes are never spent on a broken script."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
