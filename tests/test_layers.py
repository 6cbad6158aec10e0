"""The package's import graph: every import points down the layers, and no module imports itself back.

Read from the source with ``ast`` (every ``import`` counts, including those inside functions: a lower layer
importing a higher one lazily is a responsibility in the wrong place, not a way round a cycle). The layers, from
the bottom up, are ``LAYERS`` below; packages on one row are siblings that must not import each other. Imports
under ``if TYPE_CHECKING:`` name types for annotations and are never run: they are left out.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import pkgutil
from pathlib import Path

import pytest

import perft_qlora

PACKAGE = Path(perft_qlora.__file__).parent

LAYERS: list[tuple[str, ...]] = [
    ("errors", "_version"),  # error types and the version: import nothing of ours
    ("cli", "atomic", "kernels"),  # the error path and shared options, atomic files, the kernels
    ("quant",),  # families, loading, NF4 storage
    ("method",),  # PERFT and the shared adapter services
    ("formats",),  # data rows and prompt templates, shared by training and evaluation
    ("evaluation",),
    ("training", "analysis", "serving", "exporting"),
    ("plan", "bench"),
    ("commands",),  # the perft-qlora console script: maps subcommands to modules by name, imports only cli
    ("train", "evaluate", "analyze", "generate", "export", "app", "__init__", "__main__"),  # entry points, public API
]
"""Top-level module or sub-package of ``perft_qlora`` -> layer, bottom first."""


def _unit(module: str) -> str:
    """``perft_qlora.quant.arch`` -> ``quant``; ``perft_qlora`` (the package's ``__init__``) -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    parts = ("perft_qlora",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path) -> list[tuple[str, int]]:
    """``(imported perft_qlora module, line)`` for every import in the file, relative ones resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: never imported at run time
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "perft_qlora" or target.startswith("perft_qlora."):
                if target == "perft_qlora" or not node.module:  # `from .. import x`: x may be a module
                    found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
                else:
                    found.append((target, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.startswith("perft_qlora")]
    return found


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _layer_of() -> dict[str, int]:
    return {unit: level for level, row in enumerate(LAYERS) for unit in row}


def test_every_module_has_a_layer():
    layer_of = _layer_of()
    units = {_unit(_module_name(p)) for p in _sources()}
    assert units - set(layer_of) == set(), "add the new module or package to LAYERS"


def test_imports_point_down_the_layers():
    layer_of = _layer_of()
    bad = []
    for path in _sources():
        here = _unit(_module_name(path))
        for target, line in imports_of(path):
            there = _unit(target)
            if there == here:
                continue
            if there not in layer_of or layer_of[there] >= layer_of[here]:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({here}) imports {target} ({there})")
    assert not bad, "imports up or across the layers:\n" + "\n".join(bad)


def test_no_import_cycles_between_modules():
    graph: dict[str, set[str]] = {}
    for path in _sources():
        graph[_module_name(path)] = {t for t, _ in imports_of(path)}
    modules = set(graph)
    edges = {m: {t for t in ts if t in modules and t != m} for m, ts in graph.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in edges[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_the_graph_reader_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """The checks above can fail: a lazy upward import inside a function is found and named."""
    fake = tmp_path / "perft_qlora"
    (fake / "quant").mkdir(parents=True)
    (fake / "quant" / "x.py").write_text("def f():\n    from ..training.train import run\n    from .. import cli\n"
                                         "if TYPE_CHECKING:\n    from ..method.config import PerftConfig\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert imports_of(fake / "quant" / "x.py") == [("perft_qlora.training.train", 2), ("perft_qlora.cli", 3)]
    with pytest.raises(AssertionError, match=r"quant/x.py:2 \(quant\) imports perft_qlora.training.train"):
        test_imports_point_down_the_layers()


def _package_modules() -> list[str]:
    names = [perft_qlora.__name__]
    for info in pkgutil.walk_packages(perft_qlora.__path__, prefix="perft_qlora."):
        if info.name.endswith("__main__") or ".kernels.triton" in info.name or info.name.endswith("compile_check"):
            continue  # __main__ runs a command on import; Triton kernels need triton (an extra)
        if info.name == "perft_qlora.app" and importlib.util.find_spec("gradio") is None:
            continue  # the app needs gradio (the [app] extra)
        names.append(info.name)
    return names


def test_every_error_of_the_package_derives_from_the_one_base():
    from perft_qlora.errors import PerftQloraError

    strays = []
    for name in _package_modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, Exception) and value.__module__ == name:
                if not issubclass(value, PerftQloraError):
                    strays.append(f"{name}.{attr}")
    assert not strays, f"errors outside the PerftQloraError family (cli.error_path would show a traceback): {strays}"


def test_no_error_line_is_raised_past_the_error_path():
    """``raise SystemExit("error: …")`` skips ``--debug`` and the error family: raise a PerftQloraError instead."""
    bad = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "SystemExit" and node.args:
                if not isinstance(node.args[0], ast.Constant) or not isinstance(node.args[0].value, int):
                    if not isinstance(node.args[0], ast.Call):  # SystemExit(main()) passes an exit status on
                        bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not bad, f"SystemExit with a message: {bad}"
