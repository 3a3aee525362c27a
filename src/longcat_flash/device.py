"""Where a command runs: `--device auto|cpu|cuda|cuda:N` resolved to a torch.device, and the per-device settings.

`auto` is CUDA when it is available (under torchrun, the local rank's GPU), else the CPU. Asking for CUDA on a
machine without it is a DeviceError with one line naming the problem; the CLI turns it into exit status 2.
"""
from __future__ import annotations

import os
import re
from contextlib import AbstractContextManager, nullcontext

import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_CUDA = re.compile(r"^cuda(:(\d+))?$")


class DeviceError(ValueError):
    """A --device value that names no usable device on this machine."""


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch.device for `spec`; `cuda` alone means this process's GPU (LOCAL_RANK under torchrun)."""
    spec = "auto" if spec is None else str(spec).strip().lower()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if spec in ("cpu", "cpu:0"):  # torch's name for the one CPU device too
        return torch.device("cpu")
    if spec == "auto":
        return torch.device("cuda", _local_gpu(local, spec)) if torch.cuda.is_available() else torch.device("cpu")
    match = _CUDA.match(spec)
    if match is None:
        other = spec.partition(":")[0] in ("mps", "xpu", "hpu", "npu", "mtia")  # accelerators torch knows
        what = "an accelerator this project does not run on" if other else "not a device"
        raise DeviceError(f"--device {spec}: {what}; use {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {spec}: CUDA is not available on this machine (torch {torch.__version__}, "
                          f"built {'with' if torch.backends.cuda.is_built() else 'without'} CUDA); use --device cpu")
    if match.group(2) is None:
        return torch.device("cuda", _local_gpu(local, spec))
    if int(match.group(2)) >= torch.cuda.device_count():
        raise DeviceError(f"--device {spec}: this process sees {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", int(match.group(2)))


def _local_gpu(local: int, spec: str) -> int:
    """The GPU of the process with LOCAL_RANK `local`: that index, or 0 where the launcher shows each process
    only its own GPU (CUDA_VISIBLE_DEVICES per task, as SLURM may set it)."""
    count = torch.cuda.device_count()
    if count == 1:
        return 0
    if local >= count:
        raise DeviceError(f"--device {spec}: LOCAL_RANK is {local}, but this process sees {count} CUDA devices; "
                          "start at most one process per GPU on a node")
    return local


def use_device(device: torch.device) -> None:
    """Make `device` this process's current device and switch on its fast defaults (TF32 for fp32 matmuls)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def fast_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices at least about as fast as fp32 ones: a CUDA GPU with bf16, or a
    CPU whose oneDNN has bf16 GEMMs (AVX-512 or AMX). On a CPU with AVX2 only, ATen's bf16 matmul is a plain loop:
    on a 2-core AVX2 EPYC, (1024 x 256) @ (256 x 768) takes 334 ms in bf16 against 17 ms in fp32."""
    if device.type == "cuda":  # bf16 tensor cores from sm80 (Ampere); is_bf16_supported() is also True where
        return torch.cuda.get_device_capability(device) >= (8, 0)  # bf16 is only emulated (V100, T4)
    if device.type != "cpu":
        return False
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if supported is not None:
        return bool(supported())
    return "avx512" in torch.backends.cpu.get_cpu_capability().lower()


def compute_dtype(dtype: str, device: torch.device) -> str:
    """"auto" -> "bfloat16" where `device` has fast bf16 matmuls, else "float32"; any other value as given."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if fast_bf16(device) else "float32"


def autocast(device: torch.device, dtype: str) -> AbstractContextManager:
    """bf16 autocast on `device`'s type when dtype is (or "auto" resolves to) "bfloat16"; no context at all for
    "float32"."""
    if compute_dtype(dtype, device) == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def model_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (every parameter of a model lives on one device)."""
    return next(module.parameters()).device


def memory_bytes(device: torch.device) -> int:
    """The memory a model on `device` lives in: a GPU's own, or this machine's."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index if device.index is not None
                                                else torch.cuda.current_device()).total_memory
    return host_memory_bytes()


def host_memory_bytes() -> int:
    """This machine's physical memory: what a model built in host memory must fit in."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def out_of_memory(err: BaseException) -> str:
    """What failed, in a few words, when `err` is an allocation the memory could not serve (a GPU's, torch's CPU
    allocator, Python's own); "" for any other error."""
    if isinstance(err, torch.OutOfMemoryError):  # "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has ..."
        return ". ".join(str(err).split(". ")[:2])[:200]
    if isinstance(err, MemoryError):
        return "Python could not allocate memory"
    found = re.search(r"can't allocate memory: you tried to allocate \d+ bytes", str(err))
    return found.group(0) if found else ""
