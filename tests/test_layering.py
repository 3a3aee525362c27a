"""The package's import direction (docs/design.md §1): a module imports only from layers below its own."""
from __future__ import annotations

import ast
from pathlib import Path

import longcat_flash

PACKAGE = Path(longcat_flash.__file__).parent
LAYERS = {"config": 0, "presets": 0, "tokenizer": 0, "data": 0, "runtime": 0, "device": -1, "files": -1,
          "flag_types": -1, "chat_template": -1, "json_text": -2, "model": 1, "distributed": 2, "checkpoint": 3,
          "train": 4, "infer": 4, "serve": 5, "cli": 6, "__main__": 6}
FREE = {"analysis"}  # may import anything; the rest of the package never imports it (checked below)


def imported_units(path: Path) -> set[str]:
    """Top-level package units (`model`, `train`, ...) that a file imports, absolute or relative."""
    rel = path.relative_to(PACKAGE)
    units = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel.parts[:-1])[: max(len(rel.parts) - node.level, 0)]
                parts = base + (node.module.split(".") if node.module else [a.name for a in node.names][:1])
            elif node.module and node.module.startswith("longcat_flash."):
                parts = node.module.split(".")[1:]
            else:
                continue
            if parts:
                units.add(parts[0].removesuffix(".py"))
        elif isinstance(node, ast.Import):
            units |= {a.name.split(".")[1] for a in node.names if a.name.startswith("longcat_flash.")}
    return units


def test_no_import_points_up_or_sideways():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if unit in FREE or unit == "__init__":
            continue
        for other in imported_units(path) - {unit}:
            if other in FREE:
                if LAYERS[unit] < 6:
                    bad.append(f"{path.relative_to(PACKAGE)} imports {other} (only cli may)")
            elif LAYERS.get(other, -1) >= LAYERS[unit] and other != "config":  # config is the root leaf
                bad.append(f"{path.relative_to(PACKAGE)} (layer {LAYERS[unit]}) imports {other} "
                           f"(layer {LAYERS[other]})")
    assert not bad, "\n".join(bad)


def test_model_never_touches_torch_distributed():
    for path in (PACKAGE / "model").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("torch.distributed") for n in names), path
