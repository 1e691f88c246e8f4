"""The package's shape, read with `ast`: layers import only downwards, torch internals stay behind one seam.

    _torch < core < ops < rules < capture < analysis < passes < runtime < compiler < drivers

(drivers: api, dryrun, verify, testing, cli, viz, checkpoint, planner and the package
itself). A module may import its own layer or lower ones, imports inside
functions included; the whole import graph has no cycle; private torch names
appear only in fxpar/_torch/; no module is over 600 lines; at most 5 imports
of fxpar modules sit inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "fxpar"
LAYERS = ["_torch", "core", "ops", "rules", "capture", "analysis", "passes", "runtime", "compiler"]
DRIVER = len(LAYERS)
MAX_LINES = 600
MAX_FUNCTION_IMPORTS = 5
# The one private attribute of a torch object fxpar code would reach for outside the seam.
PRIVATE_ATTRS = {"_codegen", "_execution_engine", "_loss_fn", "_num_stages", "_get_pipeline_order"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return DRIVER


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    return {_module_name(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(ROOT.rglob("*.py"))}


def _fxpar_imports(module: str, tree: ast.Module, is_package: bool):
    """(imported module, line, inside a function) for every import of an fxpar module."""
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, in_function) for a in child.names if a.name.split(".")[0] == "fxpar")
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = module.split(".") if is_package else module.split(".")[:-1]
                    base = ".".join(pkg[: len(pkg) - child.level + 1] + ([base] if base else []))
                if base.split(".")[0] == "fxpar":
                    for a in child.names:
                        # `from fxpar.x import y` imports fxpar.x.y when y is a module, else fxpar.x
                        out.append((f"{base}.{a.name}", child.lineno, in_function))
            visit(child, inside)

    visit(tree, False)
    return out


def _resolve(name: str, modules) -> str:
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _graph():
    modules = _modules()
    edges: dict[str, list[tuple[str, int, bool]]] = {}
    for name, (path, tree) in modules.items():
        edges[name] = [(_resolve(t, modules), line, fn)
                       for t, line, fn in _fxpar_imports(name, tree, path.name == "__init__.py")]
    return modules, edges


def test_imports_go_downwards_only():
    modules, edges = _graph()
    bad = [f"{modules[m][0].relative_to(ROOT.parent)}:{line}: {m} ({LAYERS[_layer(m)] if _layer(m) < DRIVER else 'driver'})"
           f" imports {t} ({LAYERS[_layer(t)] if _layer(t) < DRIVER else 'driver'})"
           for m, targets in edges.items() for t, line, _ in targets if _layer(t) > _layer(m)]
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_import_graph_has_no_cycle():
    modules, edges = _graph()
    graph = {m: sorted({t for t, _, _ in ts if t != m and not m.startswith(t + ".")}) for m, ts in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in graph.get(m, ()):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                dfs(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_few_imports_inside_functions():
    modules, edges = _graph()
    inside = [f"{modules[m][0].relative_to(ROOT.parent)}:{line}: {t}"
              for m, ts in edges.items() for t, line, fn in ts if fn]
    assert len(inside) <= MAX_FUNCTION_IMPORTS, \
        f"{len(inside)} imports of fxpar modules inside functions (at most {MAX_FUNCTION_IMPORTS}):\n" + "\n".join(inside)


def _private_torch_uses(tree: ast.Module) -> list[tuple[int, str]]:
    out = []
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}  # report whole chains once
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) in inner and node.attr not in PRIVATE_ATTRS:
            continue
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            parts = node.module.split(".") + [a.name for a in node.names]
            if any(p.startswith("_") and not p.startswith("__") for p in parts):
                out.append((node.lineno, f"from {node.module} import {', '.join(a.name for a in node.names)}"))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "torch" and any(p.startswith("_") for p in a.name.split(".")):
                    out.append((node.lineno, f"import {a.name}"))
        elif isinstance(node, ast.Attribute):
            chain, cur = [node.attr], node.value
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if node.attr in PRIVATE_ATTRS:
                out.append((node.lineno, f".{node.attr}"))
            elif isinstance(cur, ast.Name) and cur.id == "torch" and \
                    any(p.startswith("_") and not p.startswith("__") for p in chain):
                out.append((node.lineno, "torch." + ".".join(reversed(chain))))
    return out


def test_torch_private_names_only_behind_the_seam():
    bad = []
    for name, (path, tree) in _modules().items():
        if name.startswith("fxpar._torch"):
            continue
        bad += [f"{path.relative_to(ROOT.parent)}:{line}: {what}" for line, what in _private_torch_uses(tree)]
    assert not bad, "torch private names outside fxpar/_torch/ (add a wrapper there):\n" + "\n".join(sorted(set(bad)))


def test_the_seam_notes_what_it_waits_for():
    for path in sorted((ROOT / "_torch").glob("*.py")):
        if path.name != "__init__.py":
            assert "Waits for" in path.read_text(), f"{path.name}: name the public API each private use waits for"


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_module_size(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT.parent)} has {n} lines (at most {MAX_LINES}): split it"


def test_the_checker_sees_a_violation(tmp_path):
    tree = ast.parse("import torch\nfrom torch.distributed._functional_collectives import x\n"
                     "def f(g):\n    from fxpar.runtime import pipeline\n    return torch._C.foo, g.graph._codegen\n")
    assert len(_private_torch_uses(tree)) == 3
    assert _fxpar_imports("fxpar.core.spec", tree, False) == [("fxpar.runtime.pipeline", 4, True)]
    assert _layer("fxpar.runtime.pipeline") > _layer("fxpar.core.spec")
