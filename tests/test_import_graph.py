"""The package's layers, read from its imports with ``ast`` (every import statement, also inside functions and
``TYPE_CHECKING`` blocks: a type is a dependency too).

Layers, bottom to top (an import may point down or sideways, never up):

0. ``utils`` (low-level helpers), ``tokenizers``, ``checkpoint`` (file formats)
1. ``losses``, ``data``, ``judges``, ``generation``
2. ``models``
3. ``algorithms`` (the loops)
4. ``recipes`` (run assembly), ``evaluation``
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nemo_aligner"

LAYERS = {
    "utils": 0,
    "tokenizers": 0,
    "checkpoint": 0,
    "losses": 1,
    "data": 1,
    "judges": 1,
    "generation": 1,
    "models": 2,
    "algorithms": 3,
    "recipes": 4,
    "evaluation": 4,
}

# Imports that point up, each with its reason. The test fails when one is added or removed without this list.
_NEMO_ALIGNER_NAMES = "NeMo-Aligner's import path of the run-assembly functions users call (thin re-exports)"
UPWARD_IMPORTS: dict[tuple[str, str], str] = {
    ("nemo_aligner.utils.train_script_utils", f"nemo_aligner.recipes.{name}"): _NEMO_ALIGNER_NAMES
    for name in ("common", "dpo", "sft", "spin")
}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports (``from pkg import module`` counts as importing that module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("nemo_aligner") and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> str:
    return module.split(".")[1] if "." in module else "nemo_aligner"


def test_every_package_module_has_a_layer():
    assert {_layer(m) for m in _graph()} - {"nemo_aligner"} <= set(LAYERS)


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_imports_point_down_the_layers_except_the_listed_ones():
    upward = {
        (module, target)
        for module, targets in _graph().items()
        for target in targets
        if _layer(module) in LAYERS and _layer(target) in LAYERS and LAYERS[_layer(target)] > LAYERS[_layer(module)]
    }
    assert upward == set(UPWARD_IMPORTS)


def test_utils_and_checkpoint_stay_at_the_bottom():
    """The issue's facts, stated directly: utils/ imports nothing from algorithms, models, recipes, data or
    generation; checkpoint/ does not import models/."""
    graph = _graph()
    for module, targets in graph.items():
        targets = {t for t in targets if (module, t) not in UPWARD_IMPORTS}
        if _layer(module) == "utils":
            assert not {_layer(t) for t in targets} & {"algorithms", "models", "recipes", "data", "generation"}, (
                module,
                targets,
            )
        if _layer(module) == "checkpoint":
            assert "models" not in {_layer(t) for t in targets}, (module, targets)
