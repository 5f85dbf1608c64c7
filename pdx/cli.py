"""The ``pdx`` command. Each subcommand lives in its own module, imported only when run.

Subcommands register here as ``name -> "module:function"``; the function takes
``argv`` (the remaining arguments) and returns an exit code.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    # name: ("module:function", one-line help)
    "bench": ("pdx.bench.cli:main", "run a microbenchmark: transport, kernels, pd, router, serve"),
    "route": ("pdx.router.cli:route_main", "serve the PD router for a topology"),
    "check": ("pdx.config.cli:check_main", "validate a topology file"),
    "launch": ("pdx.launch:main", "start the local engines of a topology, then the router"),
    "demo": ("pdx.demo:main", "the main job: launch a local 1P1D fleet and send a request"),
    "make-tiny-model": ("pdx.models.tiny:main", "build the built-in tiny model offline"),
    "store": ("pdx.storage.cli:main", "serve the node-shared KV store"),
}


def _usage() -> str:
    lines = ["usage: pdx COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from pdx import __version__

        print(f"pdx {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"pdx: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _, func_name = COMMANDS[name][0].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("pdx"):
            print(f"pdx: command {name!r} is not available in this build", file=sys.stderr)
            return 2
        raise
    return int(getattr(module, func_name)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
