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
