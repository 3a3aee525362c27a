"""csrc/avx512_on_avx2.h, the AVX-512 intrinsics of the compiled kernels on AVX2 + FMA CPUs: every one it gives,
lane by lane, against a scalar reference written from the instruction's pseudo-code (tests/avx512_on_avx2_check.cpp,
built here with -mavx2, so it runs on AVX-512 CPUs too)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from longcat_flash.infer import extension

CHECK = Path(__file__).with_name("avx512_on_avx2_check.cpp")


def test_emulated_intrinsics_equal_the_instructions(tmp_path):
    capability = torch.backends.cpu.get_cpu_capability().lower()
    if "avx512" not in capability and capability != "avx2":
        pytest.skip("needs a CPU with AVX2")
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("needs a C++ compiler")
    exe = tmp_path / "check"
    subprocess.run([cxx, "-std=c++17", "-O2", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off",
                    f"-I{extension.CSRC}", str(CHECK), "-o", str(exe)], check=True)
    run = subprocess.run([str(exe), "20000"], check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout
    assert run.stdout.strip().endswith(" 0 failures")
