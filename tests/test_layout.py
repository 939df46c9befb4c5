"""The layers: the core (`slmforge/`) stands alone. It imports no Prefect and nothing from the
orchestration (`tasks/`, `flows/`) or deployment (`deployments/`) layers, so it can be used from a
notebook or another orchestrator."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UPPER = ("prefect", "tasks", "flows", "deployments")

# Runs in a fresh interpreter: a finder that refuses the upper layers, then every core module.
PROBE = """
import importlib, sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {upper!r}:
            raise ImportError(f"the core imported {{name}}")
        return None

sys.meta_path.insert(0, Refuse())
for name in {modules!r}:
    importlib.import_module(name)
print("ok", len({modules!r}))
"""


def core_modules() -> list[str]:
    return ["slmforge"] + [f"slmforge.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "slmforge")])]


def test_the_core_imports_without_prefect_or_the_upper_layers():
    modules = core_modules()
    assert {"slmforge.storage", "slmforge.training", "slmforge.publishing"} <= set(modules)
    out = subprocess.run([sys.executable, "-c", PROBE.format(upper=UPPER, modules=modules)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-1000:]
    assert out.stdout.strip() == f"ok {len(modules)}"


def test_the_probe_catches_an_upward_import(tmp_path):
    """The check above can fail: a module that imports Prefect is refused."""
    (tmp_path / "leaky.py").write_text("import prefect\n")
    probe = PROBE.format(upper=UPPER, modules=["leaky"])
    out = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n{probe}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "the core imported prefect" in out.stderr


def upward_imports(path: Path) -> list[str]:
    """Every import of an upper layer in a file, at any depth (a lazy import inside a function too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        found += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in UPPER]
    return found


def test_no_core_file_imports_an_upper_layer_even_lazily(tmp_path):
    assert [hit for p in sorted((ROOT / "slmforge").glob("*.py")) for hit in upward_imports(p)] == []
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def f():\n    from prefect.blocks.system import Secret\n")
    assert upward_imports(lazy) == ["lazy.py:2 prefect.blocks.system"]
