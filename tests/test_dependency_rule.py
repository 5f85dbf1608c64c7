"""The dependency rule: the data plane and the kernels import nothing from the control plane.

``transports/`` (installed as ``pdx.transports``) and ``kernels/`` (``pdx.kernels``) reach
their own modules with relative imports only; nothing anywhere imports them under their
folder names, which would load a second copy of every class (and shadow other
distributions' ``transports``/``kernels`` once installed).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_PLANE = ("transports", "kernels")


def imports(path: Path) -> list[tuple[int, str, int]]:
    """(line, module, level) of every import in a file; ``level`` > 0 for relative imports."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, node.module or "", node.level))
    return out


@pytest.mark.parametrize("folder", DATA_PLANE)
def test_data_plane_imports_nothing_from_the_control_plane(folder: str) -> None:
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, module, level in imports(path):
            top = module.split(".")[0]
            if level == 0 and top in ("pdx", *DATA_PLANE):
                bad.append(f"{path.relative_to(ROOT)}:{line}: import {module}")
            if level > 1:  # would climb out of the package into pdx
                bad.append(f"{path.relative_to(ROOT)}:{line}: relative import of level {level}")
    assert not bad, "the data plane must not import pdx's control plane:\n" + "\n".join(bad)


def test_kernels_import_nothing_from_transports() -> None:
    for path in (ROOT / "kernels").rglob("*.py"):
        for line, module, _ in imports(path):
            assert "transports" not in module.split("."), f"{path}:{line}"


def test_nothing_imports_the_data_plane_by_its_folder_name() -> None:
    bad = []
    for folder in ("pdx", "tests", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, module, level in imports(path):
                if level == 0 and module.split(".")[0] in DATA_PLANE:
                    bad.append(f"{path.relative_to(ROOT)}:{line}: import {module}")
    assert not bad, "import pdx.transports / pdx.kernels instead:\n" + "\n".join(bad)
