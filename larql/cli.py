"""`larql` command line: each concern's module registers its own subcommands.

A module in COMMAND_MODULES exposes `add_commands(subparsers)`, adding parsers whose
`func(args) -> int` runs the command. Modules keep heavy imports inside their functions so
`larql --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# The C kernels run their own thread pool; a multi-threaded BLAS under numpy would fight it
# for the same cores on the small products the model leaves to numpy. Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

COMMAND_MODULES = [
    "larql.vindex.commands",   # extract, slice, pull, publish, info, verify
    "larql.run",               # run
    "larql.server_cli",        # serve, demo
    "larql.benchmarks",        # bench kernels|run|server|extract
    "larql.health",            # health
    "larql.deploy",            # boot (the container entrypoint)
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="larql",
        description="Serve the experts of a Mixture-of-Experts model from CPU-only machines.",
    )
    parser.add_argument("--version", action="version", version=f"larql {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue  # not built yet
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"larql {args.command}: error: {e}", file=sys.stderr)
        return 1


def server_main() -> int:
    """`larql-server ...` is `larql serve ...`."""
    return main(["serve", *sys.argv[1:]])


def run_main() -> int:
    """`larql-run ...` is `larql run ...`."""
    return main(["run", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
