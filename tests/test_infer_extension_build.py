"""The kernels' build: a lock file left by a killed build must not hang the next use, and a build (a minute or more)
says what it is doing instead of sitting silent."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from longcat_flash.infer.extension import announced_if_slow, build_lock

pytest.importorskip("fcntl")

HOLDER = """
import sys, time
from pathlib import Path
from longcat_flash.infer.extension import build_lock
build = Path(sys.argv[1])
with build_lock(build):
    (build / "lock").touch()  # a build in progress holds torch's lock too
    print("held", flush=True)
    time.sleep(2)
    if not (build / "lock").exists():
        sys.exit(3)  # someone removed the lock of a live build
    (build / "lock").unlink()
"""


def test_a_lock_left_by_a_killed_build_is_removed(tmp_path):
    (tmp_path / "lock").touch()  # what a build killed with Ctrl-C leaves; torch would wait for it forever
    with build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()


def test_a_live_build_is_waited_for_and_its_lock_left_alone(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    start = time.monotonic()
    with build_lock(tmp_path):  # waits until the holder is done
        waited = time.monotonic() - start
    assert holder.wait(timeout=30) == 0
    assert waited > 1.0
    assert "waiting for another process" in caplog.text


def test_a_slow_build_is_announced_and_its_end_reported(caplog):
    with announced_if_slow("building", done="built", after_s=0.1):
        time.sleep(0.5)
    assert [r.getMessage().split(" after ")[0] for r in caplog.records] == ["building", "built"]


def test_a_fast_load_says_nothing(caplog):
    with announced_if_slow("building", done="built", after_s=2.0):
        pass
    time.sleep(2.2)  # past the moment the message would have come
    assert caplog.records == []


def test_a_failed_build_is_not_reported_as_built(caplog):
    with pytest.raises(RuntimeError), announced_if_slow("building", done="built", after_s=0.1):
        time.sleep(0.3)
        raise RuntimeError("compiler error")
    assert [r.getMessage() for r in caplog.records] == ["building"]


def test_each_install_keeps_its_own_build(tmp_path, monkeypatch):
    """Two installs sharing the cache (a checkout and a wheel, two environments) built into one directory, so each
    rebuilt the kernels, a minute or more, whenever the other had built last."""
    from longcat_flash.infer import extension

    sources, flags = ["int f();"], ["-O3"]
    here = extension.build_directory(tmp_path, sources, flags)
    assert here.parent == tmp_path and extension.build_directory(tmp_path, sources, flags) == here  # reused
    assert extension.build_directory(tmp_path, ["int g();"], flags) != here  # a source change rebuilds
    assert extension.build_directory(tmp_path, sources, ["-O2"]) != here
    monkeypatch.setattr(extension, "CSRC", tmp_path / "another" / "csrc")
    assert extension.build_directory(tmp_path, sources, flags) != here


def test_without_a_compiler_one_line_says_so_and_the_pytorch_paths_run(tmp_path):
    """With no C++ compiler torch printed its compatibility banner and the whole failed build log (2 KB, seven
    lines) before the fallback; a build already in the cache still loads without one."""
    import os

    from longcat_flash.infer import extension

    capability = extension.torch.backends.cpu.get_cpu_capability().lower()
    if "avx512" not in capability and capability != "avx2":
        pytest.skip("the kernels build only on a CPU with AVX-512 or AVX2")
    code = "from longcat_flash.infer import extension; print(extension.compiled() is None)"
    env = {**os.environ, "CXX": str(tmp_path / "no-compiler"), "LONGCAT_KERNEL_CACHE": str(tmp_path / "cache")}
    env.pop("LONGCAT_KERNELS", None)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.stdout.strip() == "True"
    assert run.stderr.strip().splitlines() == [
        f"compiled CPU kernels unavailable: no C++ compiler {str(tmp_path / 'no-compiler')!r} to build them (CXX "
        "names one); using the PyTorch paths"], run.stderr


def test_a_finished_build_loads_without_a_compiler_and_without_a_word(tmp_path):
    """A cached build was loaded through torch's build path, which checked the compiler first and printed its
    "!! WARNING !!" banner where there was none (and with CXX naming a missing one, rebuilt and failed)."""
    import os

    from longcat_flash.infer import extension

    if extension.compiled() is None:  # builds into this process's cache first, where it can
        pytest.skip("the kernels cannot be built here")
    code = "from longcat_flash.infer import extension; print(extension.compiled() is not None)"
    env = {**os.environ, "CXX": str(tmp_path / "no-compiler"), "PATH": os.path.dirname(sys.executable)}
    env.pop("LONGCAT_KERNELS", None)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.stdout.strip() == "True" and run.stderr == "", run.stderr


FAILING_COMPILER = """#!/bin/sh
case "$1" in --version|-v|-dump*) exec c++ "$@";; esac
echo "$*" >> "$(dirname "$0")/compiles.log"
echo "main.cpp:1:1: error: this compiler cannot build the kernels" >&2
exit 1
"""


def test_a_failed_build_is_not_tried_again_with_the_same_compiler(tmp_path):
    """A build that fails compiles for a minute or more first (GCC goes on after an error), and every command that
    ran a model paid it again, with the whole build log in its warning. The failure is remembered with the compiler
    it came from: the next command skips the build with one line; another compiler (or this one upgraded) tries."""
    import os
    import shutil

    from longcat_flash.infer import extension

    capability = extension.torch.backends.cpu.get_cpu_capability().lower()
    if ("avx512" not in capability and capability != "avx2") or shutil.which("c++") is None:
        pytest.skip("the kernels build only on a CPU with AVX-512 or AVX2, with a C++ compiler")
    compiler = tmp_path / "bin" / "c++"
    compiler.parent.mkdir()
    compiler.write_text(FAILING_COMPILER)
    compiler.chmod(0o755)
    compiles = tmp_path / "bin" / "compiles.log"
    code = "from longcat_flash.infer import extension; print(extension.compiled() is None)"
    env = {**os.environ, "CXX": str(compiler), "LONGCAT_KERNEL_CACHE": str(tmp_path / "cache")}
    env.pop("LONGCAT_KERNELS", None)

    def run() -> tuple[list[str], int]:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.stdout.strip() == "True", done.stderr
        said = [line for line in done.stderr.splitlines() if "compiled CPU kernels unavailable" in line]
        return said, len(compiles.read_text().splitlines()) if compiles.exists() else 0

    said, tried = run()
    assert tried >= 1 and len(said) == 1 and "their build failed (main.cpp:1:1: error: this compiler" in said[0]
    failed_log = next((tmp_path / "cache").glob(f"*/{extension.FAILED_LOG}"))
    assert "cannot build the kernels" in failed_log.read_text() and str(failed_log) in said[0]

    said, tried_again = run()
    assert tried_again == tried, "the build was tried again with the compiler it failed with"
    assert len(said) == 1 and "failed before" in said[0] and str(failed_log) in said[0]

    compiler.write_text(FAILING_COMPILER + "# upgraded\n")
    said, tried_again = run()
    assert tried_again > tried and "their build failed" in said[0]


def test_a_finished_build_loads_from_a_cache_this_process_cannot_write(tmp_path):
    """A build baked into a read-only image (or another user's cache) fell back to the PyTorch paths, 10-20x slower
    at decode and with other tokens: the lock file could not be opened to write before the build was loaded."""
    import os
    import shutil

    from longcat_flash.infer import extension

    module = extension.compiled()
    if module is None:
        pytest.skip("the kernels cannot be built here")
    built = Path(module.__file__)
    copy = tmp_path / "cache" / built.parent.name  # the build's directory is named by its sources, not the cache
    copy.mkdir(parents=True)
    shutil.copy(built, copy / built.name)
    (copy / "longcat_build.flock").mkdir()  # cannot be opened to write, as in a read-only cache (root ignores modes)
    code = "from longcat_flash.infer import extension; print(extension.compiled() is not None)"
    env = {**os.environ, "CXX": str(tmp_path / "no-compiler"), "LONGCAT_KERNEL_CACHE": str(tmp_path / "cache")}
    env.pop("LONGCAT_KERNELS", None)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.stdout.strip() == "True" and run.stderr == "", run.stderr
