"""The op library `pisa_jax` stands alone: nothing in it imports the model code."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_pisa_jax_sources_import_nothing_from_models():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _imported_modules(p)
                                                  if m == "models" or m.startswith("models."))
                 for p in (ROOT / "pisa_jax").rglob("*.py")}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"pisa_jax imports model code: {offenders}"


def test_importing_pisa_jax_loads_no_model_module():
    code = ("import sys, pisa_jax, pisa_jax.cli, pisa_jax.demo; "
            "print(sorted(m for m in sys.modules if m == 'models' or m.startswith('models.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.strip()
    assert out == "[]", out
