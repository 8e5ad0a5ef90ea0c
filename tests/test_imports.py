"""The package's import discipline: no module uses another module's private (``_name``) helpers, in the package,
the benchmarks or the experiments (tests may reach into what they test). A helper that another module needs is
public in its module, or moves."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("fedbpt_jax", "benchmarks", "experiments")
#: Modules whose private names are the standard library's own business (os._exit, sys._getframe, ...).
FOREIGN = {"os", "sys", "_thread", "jax", "np", "jnp", "numpy"}


def _private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module or '.'} import {a.name}")
                else:
                    modules.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            modules.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            if getattr(node.value.func, "attr", "") == "import_module":
                modules.update(t.id for t in node.targets if isinstance(t, ast.Name))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            v = node.value
            if isinstance(v, ast.Name) and v.id in modules and v.id not in FOREIGN:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {v.id}.{node.attr}")
    return found


def test_no_module_uses_another_module_s_private_names():
    found = [u for d in SCANNED for f in sorted((ROOT / d).rglob("*.py")) for u in _private_uses(f)]
    assert not found, "cross-module private uses:\n  " + "\n  ".join(found)


def _import_graph() -> dict[str, set[str]]:
    """``module -> modules of the package it imports``, every import counted (also those inside functions,
    which only defer a cycle). A submodule's import of its own package (``from . import x``) is an edge to
    ``x``, not to the package's ``__init__``."""
    pkg = ROOT / "fedbpt_jax"
    mods = {}
    for f in pkg.rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {}
    for name, f in mods.items():
        here = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = here.split(".")[: len(here.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                for a in node.names:
                    full = f"{target}.{a.name}"
                    deps.add(full if full in mods else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in mods and d != name and not name.startswith(d + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check can fail
    graph = _import_graph()
    assert "fedbpt_jax.federated.driver" in graph["fedbpt_jax.federated.lanes"]  # it sees imports
    assert not _cycles(graph), f"import cycles: {_cycles(graph)}"


def test_no_function_shares_its_module_s_name():
    """``fedbpt_jax.federated.run`` is the function; no attribute of a package hides a module of it."""
    found = []
    for f in sorted((ROOT / "fedbpt_jax").rglob("*.py")):
        tree = ast.parse(f.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == f.stem:
                found.append(f"{f.relative_to(ROOT)}: {node.name}")
            if f.name == "__init__.py" and isinstance(node, ast.ImportFrom):
                for a in node.names:
                    if (f.parent / f"{a.asname or a.name}.py").exists() and node.module != (a.asname or a.name):
                        if node.module is not None:
                            found.append(f"{f.relative_to(ROOT)}: {a.asname or a.name} (from .{node.module})")
    assert not found, found
