"""The compiled CPU kernels of csrc/ (quantized GEMV, a MoE layer's routed experts, dequantization and the AMX
tile GEMMs: kernels.py; RMSNorm, SwiGLU, RoPE, the absorbed attention and whole decode blocks: decode_ops.py),
built with torch.utils.cpp_extension on first use (a minute or more, then cached in LONGCAT_KERNEL_CACHE, default
$XDG_CACHE_HOME/longcat-flash/kernels, that is ~/.cache/longcat-flash/kernels). They are written with AVX-512
intrinsics; on a CPU with AVX2 + FMA but no AVX-512 (as torch.backends.cpu reports it) the same code builds on pairs
of AVX2 vectors (csrc/avx512_on_avx2.h), with the same results, and the AMX tile GEMMs are off. Without a compiler
or ninja, without AVX2, or with LONGCAT_KERNELS=0 there is no module and every caller takes its plain PyTorch path.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import torch

from ..files import cache_home

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("simd.h", "avx512_on_avx2.h", "weights.h", "hits.h",  # headers first
           "quant_kernels.cpp", "dequantize.cpp", "tile_gemm.cpp", "decode_ops.cpp",
           "decode_blocks.cpp")
FUNCTIONS = ["block_experts", "group_experts", "dense_experts", "moe_experts", "block_dequantize",
             "group_dequantize", "amx_available", "block_experts_tiles", "group_experts_tiles", "dense_experts_tiles",
             "rms_norm", "swiglu", "rope", "absorbed_attention", "mla_project", "mla_attend", "mlp",
             "layer_plan", "decode_layer", "mtp_head"]


NAME = "longcat_cpu_kernels"  # the module's, and its .so's in the build directory
FAILED_LOG = "build_failed.log"  # in the build directory: the compiler a build failed with, then its log
KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # what the kernels compute in


def takes(t: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether the kernels can read `t`: on the CPU, in one of KERNEL_DTYPES (`dtype`: the one the call computes
    in, where that is not t's own). Cheap attributes only: decode asks ~100 times a token."""
    return t.is_cpu and (t.dtype if dtype is None else dtype) in KERNEL_DTYPES


@functools.lru_cache(maxsize=1)
def compiled():
    """The compiled module, or None (no compiler, no AVX2, disabled, or the build failed)."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    if os.environ.get("LONGCAT_KERNELS", "1") == "0" or ("avx512" not in capability and capability != "avx2"):
        return None
    try:
        cache = kernel_cache()
        _ninja_on_path()
        if "avx512" in capability:
            vnni = ["-mavx512vnni"] if getattr(torch.cpu, "_is_vnni_supported", lambda: False)() else []
            bf16 = ["-mavx512bf16"] if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() else []
            isa = ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", *vnni, *bf16, "-mfma"]
        else:  # AVX2: csrc/avx512_on_avx2.h stands in for the AVX-512 intrinsics
            isa = ["-mavx2", "-mfma", "-mf16c"]
        # The headers' text goes in too, so that a change to one changes the build's hash and rebuilds.
        sources = [(CSRC / name).read_text() for name in SOURCES]
        flags = ["-O3", *isa, "-ffp-contract=off", "-fopenmp"]
        build = build_directory(cache, sources, flags)
        build.mkdir(parents=True, exist_ok=True)
        with build_lock(build):
            return _load_built(build) or _built(build, sources, flags)
    except Exception as err:  # noqa: BLE001  (any other problem: fall back, loudly once)
        log.warning("compiled CPU kernels unavailable (%s); using the PyTorch paths", err)
        return None


def _built(build: Path, sources: list[str], flags: list[str]) -> types.ModuleType | None:
    """The kernels built into `build`, or None (warned) without a compiler or when the compiler refuses them. Its
    refusal (an `error:` in the log) is remembered with the compiler (FAILED_LOG): each try compiles for a minute
    or more before it fails, and every command that runs a model would pay it again."""
    from torch.utils.cpp_extension import load_inline

    compiler = os.environ.get("CXX") or "c++"  # torch.utils.cpp_extension's choice
    if shutil.which(compiler) is None:  # torch printed its banner and 2 KB of failed build log
        log.warning("compiled CPU kernels unavailable: no C++ compiler %r to build them (CXX names one); "
                    "using the PyTorch paths", compiler)
        return None
    failed, identity = build / FAILED_LOG, compiler_identity(compiler)
    if failed.is_file() and failed.read_text(errors="replace").partition("\n")[0] == identity:
        log.warning("compiled CPU kernels unavailable: their build with this compiler failed before (its log: %s; "
                    "delete it to build again); using the PyTorch paths", failed)
        return None
    slow = (f"building the compiled CPU kernels in {build} (once after an install: a minute or more; "
            "LONGCAT_KERNELS=0 skips them)")
    try:
        with announced_if_slow(slow, done="compiled CPU kernels built"):
            return load_inline(NAME, cpp_sources=sources, functions=FUNCTIONS, extra_cflags=flags,
                               extra_include_paths=[str(CSRC)], extra_ldflags=["-fopenmp"],
                               build_directory=str(build), verbose=False)
    except Exception as err:  # noqa: BLE001  (not Ctrl-C: a build stopped halfway is tried again)
        first = first_error(str(err))
        if "error:" not in first.lower():  # not the compiler's verdict on the sources (a killed compiler, a full
            raise  # disk, a missing tool): tried again next time
        try:
            failed.write_text(f"{identity}\n{err}\n")
        except OSError:  # a cache this process cannot write: nothing to remember the failure by
            raise err from None
        log.warning("compiled CPU kernels unavailable: their build failed (%s; the whole log: %s; later commands do "
                    "not build them again with this compiler while it is there); using the PyTorch paths",
                    first, failed)
        return None


def compiler_identity(compiler: str) -> str:
    """The compiler's resolved path, size and modification time: a build that failed is not tried again (each try
    compiles for a minute or more before it fails) until the compiler is another one, or the same one upgraded."""
    path = Path(shutil.which(compiler)).resolve()
    stat = path.stat()
    return f"compiler: {path} ({stat.st_size} bytes, modified {stat.st_mtime_ns} ns)"


def first_error(log_text: str) -> str:
    """The first line of a build log that reports an error (the log runs to kilobytes), else its first line."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()] or ["no log"]
    return next((line for line in lines if "error:" in line.lower()), lines[0])  # gcc, clang, ld: "...: error: ..."


def _load_built(build: Path) -> types.ModuleType | None:
    """The module a finished build left in `build`, imported as torch imports it after a build: a command that
    only loads the kernels needs no compiler (torch's load checked one, and printed its banner without). None when
    there is none, or when the file is not a loadable module (a link killed midway): removed, to be built again."""
    library = build / f"{NAME}.so"
    if not library.is_file():
        return None
    try:
        spec = importlib.util.spec_from_file_location(NAME, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError:
        library.unlink(missing_ok=True)
        return None
    return module


def kernel_cache() -> Path:
    """$LONGCAT_KERNEL_CACHE, else files.cache_home() / kernels."""
    return Path(os.environ.get("LONGCAT_KERNEL_CACHE") or cache_home() / "kernels")


def _ninja_on_path() -> None:
    """torch builds with the `ninja` it finds on PATH. The ninja package (a dependency) puts its binary in the
    environment's bin folder, which is not on PATH when `longcat` runs from a virtualenv that was not activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:  # torch's own message then says to install it
            return
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def build_directory(cache: Path, sources: list[str], flags: list[str]) -> Path:
    """One directory of `cache` per build: the sources, the flags, the csrc/ path the includes come from and the
    torch it links against. Two installs (a checkout and a wheel, two virtual environments) sharing the cache
    each rebuilt the kernels, a minute or more, every time the other had built them last."""
    key = hashlib.sha256("\0".join([*sources, *flags, str(CSRC), torch.__version__]).encode()).hexdigest()
    return cache / key[:16]


@contextlib.contextmanager
def build_lock(build: Path) -> Iterator[None]:
    """Held while the kernels are built or loaded from `build`. torch's own lock there (a file named `lock`) stays
    behind when a build is killed (Ctrl-C during the first, minute-long build), and every later process then waits
    for it forever. This lock is a flock, which dies with its process: whoever holds it knows that no build is
    running, so a `lock` file left there is stale and goes. In a cache it cannot write, a process only loads (a
    finished build baked into a read-only image fell back to the PyTorch paths: the lock could not be opened)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's lock alone
        yield
        return
    lock = build / "longcat_build.flock"
    try:
        handle = open(lock, "w")
    except OSError:  # a cache this process cannot write (read-only, in an image) or a lock another user made: a
        try:  # lock opened to read locks as well; where there is none, no build can run here to wait for
            handle = open(lock)
        except OSError:
            yield
            return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for another process to finish building the kernels in %s", build)
            fcntl.flock(handle, fcntl.LOCK_EX)
        stale = build / "lock"
        if stale.exists():
            log.warning("removing %s, left by a kernel build that was killed", stale)
            stale.unlink(missing_ok=True)
        yield


@contextlib.contextmanager
def announced_if_slow(message: str, done: str, after_s: float = 3.0) -> Iterator[None]:
    """Says `message` if the body is still running after `after_s`, and then `done` with the time it took. Loading
    cached kernels takes well under a second; a build takes a minute or more, and a command silent that long looks
    hung."""
    start = time.monotonic()
    said = threading.Event()

    def say() -> None:
        log.warning(message)
        said.set()

    timer = threading.Timer(after_s, say)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
    if said.is_set():  # not after a failure: the caller says what went wrong
        log.warning("%s after %.0f s", done, time.monotonic() - start)
