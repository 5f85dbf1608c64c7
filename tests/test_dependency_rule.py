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


def runtime_imports(path: Path) -> list[tuple[int, str]]:
    """Absolute imports that run when the module is imported (not under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text(), str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.append((node.lineno, node.module or ""))
    return out


def test_connector_core_is_engine_agnostic() -> None:
    """``pdx/connector`` never imports an engine (vLLM, SGLang) or an engine adapter, the router
    or the process harness; adapters in ``pdx/engines`` drive it."""
    forbidden = ("vllm", "sglang", "pdx.engines", "pdx.router", "pdx.harness", "pdx.testing")
    bad = []
    for path in sorted((ROOT / "pdx" / "connector").rglob("*.py")):
        for line, module in runtime_imports(path):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)}:{line}: import {module}")
    assert not bad, "the connector core must stay engine-agnostic:\n" + "\n".join(bad)
