"""What a user installs: one top-level package, ``pdx``, that shadows no other distribution.

The repository keeps the data plane in top-level folders (``transports/``, ``kernels/``),
installed as ``pdx.transports`` and ``pdx.kernels`` (setup.py). Hugging Face's ``kernels``
package (which transformers probes for at import) must import beside pdx unharmed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # built from a copy of the checkout's files: a build/ folder left in the checkout would
    # carry modules that no longer exist into the wheel
    src = tmp_path_factory.mktemp("src") / "pdx"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "out"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(src)],
        check=True, capture_output=True, text=True,
    )
    (path,) = out.glob("pdx_kv-*.whl")
    return path


def test_wheel_installs_only_pdx(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"pdx"}
    assert "pdx/transports/tcp.py" in names and "pdx/kernels/reference.py" in names
    # every package folder of the repository made it in (setup.py's package map)
    for folder in ("pdx", "transports", "kernels"):
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.relative_to(ROOT).as_posix()
            if folder != "pdx":
                rel = "pdx/" + rel
            assert rel in names, f"{rel} is missing from the wheel"


@pytest.mark.slow
def test_installs_beside_huggingface_kernels(wheel: Path, tmp_path: Path) -> None:
    """A clean venv with pdx and Hugging Face's ``kernels``: both import, neither shadows the other."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", str(wheel), "kernels"],
        check=True, capture_output=True, text=True, env=env, timeout=600,
    )
    code = (
        "import kernels, pdx, pdx.kernels, pdx.transports, pdx.transports.tcp\n"
        "from importlib.metadata import distribution\n"
        "assert hasattr(kernels, 'get_kernel'), kernels.__file__\n"
        "assert 'site-packages/kernels/' in kernels.__file__, kernels.__file__\n"
        "assert pdx.kernels.__file__.endswith('site-packages/pdx/kernels/__init__.py')\n"
        "assert pdx.transports.create_transport('loopback') is not None\n"
        "print(distribution('pdx-kv').version)\n"
    )
    # run from tmp_path, not the repository: the checkout's folders must not be on sys.path
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.1.0"
