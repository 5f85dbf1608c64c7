"""`import pdx/transports/kernels` must not pull heavy optional packages."""

import subprocess
import sys

HEAVY = ["torch", "vllm", "sglang", "nixl", "nixl_cu12", "ucxx", "triton", "redis", "prometheus_client"]


def test_top_level_imports_stay_light():
    code = (
        "import sys, pdx, pdx.transports, pdx.kernels, pdx.cli, pdx.transports.base, pdx.transports.errors, pdx.errors\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported by `import pdx`: {out.stdout.strip()}"


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "pdx.cli", "--help"], capture_output=True, text=True, check=True)
    assert "bench" in out.stdout and "route" in out.stdout
