"""Module replacement in place: the one walker behind the inference twins (fused.py), the hit-experts loop
(experts.py) and the quantized units (quant.py), so that all three visit and replace modules the same way."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

TwinOf = Callable[[str, nn.Module], "nn.Module | None"]  # (qualified name, module) -> replacement, or None
_generation = 0  # module replacements so far, in any model


def swap_generation() -> int:
    """Changes with every module swap_modules replaces: what a module keeps built from its children's tensors
    (FusedScMoELayer's decode plan) is stale once it has changed."""
    return _generation


def swap_modules(model: nn.Module, twin_of: TwinOf) -> list[str]:
    """Replace every submodule for which `twin_of(name, module)` returns a module; returns the names replaced.

    Parents are visited before their children, and a replaced module's insides are not visited: they belong to
    its twin now (which may keep them, as FusedMoE keeps its MoE), and their names no longer resolve.
    """
    global _generation
    swapped: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or any(name.startswith(done + ".") for done in swapped):
            continue
        twin = twin_of(name, module)
        if twin is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, twin)
            swapped.append(name)
            _generation += 1
    return swapped
