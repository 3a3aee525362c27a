"""Run real code on the CPU "as if the model lived on an accelerator", and fail where a GPU would fail.

The "meta" device stands in for the accelerator. A meta tensor has shape and dtype but no data, so every meta
storage made under the harness gets a real CPU *shadow* storage holding its data, and `PlacementMode` runs each
op that touches a meta tensor on the shadows and wraps the results back into meta tensors. Shadows are keyed by
storage, not by tensor object, so they survive everything that shares a storage without the dispatcher seeing
it: views, `.data`, `nn.Parameter(...)`, `param.data = ...` in `Module._apply`.

What fails (AssertionError naming the op):
  * an op mixes meta tensors with CPU tensors of dim > 0 (0-dim CPU tensors pass: CUDA takes them as scalars);
    explicit transfers (`.to(...)`, `.cpu()`, `copy_`) pass, and so do `.item()` / `.tolist()`;
  * an op on meta tensors draws from a CPU torch.Generator, or a CPU op draws from the accelerator's.
Meta has no generators: inside `fake_accelerator()`, `torch.Generator(device="meta")` makes an
`AcceleratorGenerator`, a CPU generator that reports device meta, the only kind ops on meta tensors may use.
Random streams are thus the CPU's, and a correct run reproduces a CPU run's seeded results exactly.

To the code under test the stand-in looks like a real device: `.device` is meta but `.is_meta` is False (models
skip initialising meta-built weights), and autocast is reported off for it (the tests run float32).

Limits: stricter than CUDA for advanced indexing with CPU index tensors (CUDA copies them over silently, a hidden
synchronous transfer); looser for 0-dim CPU tensors in ops that reject them on CUDA (index_select ...). Tensors
that C++ builds from Python data below the dispatcher are covered for `torch.tensor`, `torch.as_tensor`,
`Tensor.new_tensor` and list indices; anything else raises "has no data". Code that uses the meta device itself
(a model laid out on meta first) gets real CPU memory and initialisation under the harness.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest.mock import patch

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

ACCELERATOR = torch.device("meta")
CPU = torch.device("cpu")
aten = torch.ops.aten
MOVES = (aten._to_copy, aten.to)  # `.to(...)`, `.cpu()`: the ops whose output device is an argument
TRANSFERS = (*MOVES, aten.copy_, aten._copy_from, aten._copy_from_and_resize)  # may read one device, write another
_Generator = torch.Generator  # the real class, for isinstance while `torch.Generator` is patched
_is_autocast_enabled = torch.is_autocast_enabled
_IS_META = torch.Tensor.is_meta.__get__

# ---------------------------------------------------------------------------------------------- shadows

# meta StorageImpl address -> (weak ref to that meta storage, its CPU shadow storage). The weak ref keeps the
# address from being reused while the entry exists; entries of dead meta storages are purged as the dict grows.
_shadows: dict[int, tuple[StorageWeakRef, torch.UntypedStorage]] = {}
_purge_at = 1024


def _register(meta: torch.UntypedStorage, cpu: torch.UntypedStorage) -> None:
    global _purge_at
    if len(_shadows) >= _purge_at:
        for key in [k for k, (ref, _) in _shadows.items() if ref.expired()]:
            del _shadows[key]
        _purge_at = max(1024, 2 * len(_shadows))
    _shadows[meta._cdata] = (StorageWeakRef(meta), cpu)


def _view(t: torch.Tensor, storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    """A tensor with t's dtype, offset, shape and strides over `storage`."""
    return torch.empty(0, dtype=t.dtype, device=device).set_(storage, t.storage_offset(), t.shape, t.stride())


def shadow(t: torch.Tensor) -> torch.Tensor:
    """The CPU tensor holding a meta tensor's data (a view of its shadow storage, so writes go through)."""
    entry = _shadows.get(t.untyped_storage()._cdata)
    if entry is None or entry[0].expired():
        raise AssertionError(f"a meta tensor of shape {tuple(t.shape)} has no data: it was made outside the fake "
                             "accelerator or by a constructor it does not see")
    return _view(t, entry[1], CPU)


def wrap(cpu: torch.Tensor) -> torch.Tensor:
    """A meta tensor whose shadow is `cpu`'s storage (no copy).

    Always a normal tensor, never an inference tensor: under inference_mode the autograd layer above sets a view's
    version counter from its base, which an inference tensor refuses (and views of normal tensors are normal).
    """
    with _disable_current_modes(), torch._C.DisableTorchFunction(), torch.inference_mode(False):
        meta = torch.UntypedStorage(cpu.untyped_storage().nbytes(), device=ACCELERATOR)
        _register(meta, cpu.untyped_storage())
        return _view(cpu, meta, ACCELERATOR)


def to_accelerator(module: torch.nn.Module) -> torch.nn.Module:
    """Move a module's parameters and buffers to the stand-in, in place like `Module.to` (the data is copied)."""
    with torch._C.DisableTorchFunction():  # t.is_meta must tell the truth here
        return module._apply(lambda t: t if t.is_meta else wrap(t.detach().clone()))


# ---------------------------------------------------------------------------------------------- generators

def _device(spec: Any) -> Any:
    """A `device=` argument given to Python-level code (a string or torch.device) as a torch.device."""
    return torch.device(spec) if isinstance(spec, str) else spec


def _is_accelerator(device: Any) -> bool:
    return isinstance(device, torch.device) and device == ACCELERATOR


_accelerator_generators: weakref.WeakValueDictionary[int, AcceleratorGenerator] = weakref.WeakValueDictionary()


class AcceleratorGenerator(_Generator):
    """`torch.Generator(device="meta")` under the harness: a CPU generator that says it is on the stand-in.

    Ops receive a generator as a fresh wrapper of the same C++ object, so they are recognised by `_cdata`.
    """

    def __new__(cls, device: Any = None) -> _Generator:
        if not _is_accelerator(_device(device)):
            return _Generator(device or CPU)
        generator = super().__new__(cls)
        _accelerator_generators[generator._cdata] = generator
        return generator

    @property
    def device(self) -> torch.device:
        return ACCELERATOR


def _check_generators(func: Any, leaves: list, on_device: bool) -> None:
    for g in leaves:
        if isinstance(g, _Generator) and (g._cdata in _accelerator_generators) != on_device:
            what = ("draws from a CPU torch.Generator for tensors on the model's device" if on_device else
                    "draws from the model device's generator for a CPU tensor")
            raise AssertionError(f"op {func} {what}: create generator and tensor on the model's device")


# ---------------------------------------------------------------------------------------------- the modes

def _check_placement(func: Any, tensors: list[torch.Tensor]) -> None:
    cpu = [tuple(t.shape) for t in tensors if not t.is_meta and t.dim() > 0]
    if cpu and func.overloadpacket not in TRANSFERS:
        raise AssertionError(f"op {func} mixes the model's device with CPU tensors of shapes {cpu}: create them "
                             "with device=<model device> (or move them with .to(device))")


def _move_target(func: Any, leaves: list) -> torch.device | None:
    """The device a `.to(...)` sends its output to; None for every other op (and for a `.to(dtype)`)."""
    if func.overloadpacket in MOVES:
        return next((d for d in leaves if isinstance(d, torch.device)), None)
    return None


def _sync(meta: torch.Tensor, cpu: torch.Tensor) -> torch.Tensor:
    """After an in-place or out= op: give the meta tensor its shadow's (possibly resized) metadata."""
    if (meta.shape, meta.stride(), meta.storage_offset()) != (cpu.shape, cpu.stride(), cpu.storage_offset()):
        meta.untyped_storage().resize_(cpu.untyped_storage().nbytes())
        meta.set_(meta.untyped_storage(), cpu.storage_offset(), cpu.shape, cpu.stride())
    return meta


class PlacementMode(TorchDispatchMode):
    """Runs ops on meta tensors on their CPU shadows, after checking devices and generators."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunction():  # the harness's own tensor calls skip FrontMode
            return self._run(func, args, kwargs or {})

    def _run(self, func: Any, args: tuple, kwargs: dict) -> Any:
        leaves, _ = tree_flatten((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        on_device = any(t.is_meta for t in tensors) or _is_accelerator(kwargs.get("device"))
        _check_generators(func, leaves, on_device)
        if not on_device:
            return func(*args, **kwargs)
        _check_placement(func, tensors)
        originals: dict[int, torch.Tensor] = {}  # id(tensor handed to func) -> the caller's tensor

        def substitute(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                y = shadow(x) if x.is_meta else x
                originals[id(y)] = x
                return y
            return CPU if _is_accelerator(x) else x

        out = func(*tree_map(substitute, args), **tree_map(substitute, kwargs))
        target = _move_target(func, leaves)
        to_host, to_device = target == CPU, _is_accelerator(target)

        def rewrap(y: Any) -> Any:
            if not isinstance(y, torch.Tensor):
                return y
            if id(y) in originals:  # in-place, out= or a `.to` that changed nothing: hand back the caller's tensor
                x = originals[id(y)]
                if not (to_host if x.is_meta else to_device):
                    return _sync(x, y) if x.is_meta else x
                y = y.clone()  # `to` returned its input, but a tensor on the other device must not alias it
            return y if to_host else wrap(y)

        return tree_map(rewrap, out)


def _meta_lists(index: Any) -> Any:
    """Python-list indices into a meta tensor become shadowed meta index tensors (as CUDA makes them)."""
    if isinstance(index, list):
        return wrap(torch.tensor(index))
    return tuple(_meta_lists(i) for i in index) if isinstance(index, tuple) else index


class FrontMode(TorchFunctionMode):
    """What the dispatcher never sees: tensors C++ builds from Python data (built on the CPU, then wrapped here),
    and `.is_meta`, which reports False for the stand-in as it would for a real device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == _IS_META:
            return False
        if func is torch.Tensor.new_tensor and args[0].is_meta:  # new_tensor(data): self's dtype and device
            kwargs = {"dtype": args[0].dtype, "device": ACCELERATOR, **kwargs}
            func, args = torch.tensor, args[1:]
        if func in (torch.tensor, torch.as_tensor) and _is_accelerator(_device(kwargs.get("device"))):
            return wrap(func(*args, **{**kwargs, "device": CPU}))
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and args[0].is_meta:
            args = (args[0], _meta_lists(args[1]), *args[2:])
        return func(*args, **kwargs)


def _no_autocast_on_the_stand_in(device_type: str | None = None) -> bool:
    """torch.is_autocast_enabled("meta") raises (meta has no autocast); the stand-in reports it off."""
    if device_type is None:
        return _is_autocast_enabled()
    return device_type != ACCELERATOR.type and _is_autocast_enabled(device_type)


@contextmanager
def fake_accelerator() -> Iterator[torch.device]:
    """The body runs with the checks on, `torch.Generator` patched; yields the stand-in device."""
    with (patch.object(torch, "Generator", AcceleratorGenerator),
          patch.object(torch, "is_autocast_enabled", _no_autocast_on_the_stand_in),
          FrontMode(), PlacementMode()):
        yield ACCELERATOR
