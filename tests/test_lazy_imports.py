"""Every ``from pdx... import name`` resolves, including the lazy ones inside functions.

Heavy and optional packages are imported where used (``import pdx`` stays light), so a
renamed module or class can break a code path that no other test runs (a benchmark's
baseline, an optional backend). This reads every import of a pdx module in the code and
checks that the module has each imported name.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"pdx": "pdx", "transports": "pdx.transports", "kernels": "pdx.kernels"}


def package_of(path: Path) -> str:
    """The installed package a file belongs to (``transports/nixl.py`` -> ``pdx.transports``)."""
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    return ".".join([FOLDERS[folder], *rest][:-1])


def pdx_imports() -> dict[str, set[str]]:
    """module -> names imported from it, over every file of pdx, transports and kernels."""
    wanted: dict[str, set[str]] = {}
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            pkg = package_of(path)
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.ImportFrom):
                    continue
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if module == "pdx" or module.startswith("pdx."):
                    wanted.setdefault(module, set()).update(a.name for a in node.names)
    return wanted


IMPORTS = pdx_imports()


@pytest.mark.parametrize("module", sorted(IMPORTS))
def test_imported_names_exist(module: str) -> None:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and not exc.name.startswith("pdx"):
            pytest.skip(f"optional dependency {exc.name} is not installed")
        raise
    missing = []
    for name in sorted(IMPORTS[module]):
        if name == "*" or hasattr(mod, name):
            continue
        try:  # a submodule: from pdx.router import policies
            importlib.import_module(f"{module}.{name}")
        except ModuleNotFoundError:
            missing.append(name)
    assert not missing, f"{module} has no {missing}"
