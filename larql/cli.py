"""`larql` command line: the command modules of larql/commands/, in the order of `larql --help`.

Each module's `add_parser(subparsers)` adds its parsers with `func(args) -> int` set.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import LarqlError

# The C kernels run their own thread pool; a multi-threaded BLAS under numpy would fight it
# for the same cores on the small products the model leaves to numpy. Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

COMMANDS = [
    "larql.commands.vindex",   # extract, slice, pull, publish, info, verify
    "larql.commands.run",      # run
    "larql.commands.serve",    # serve (also larql-server)
    "larql.commands.demo",     # demo
    "larql.commands.bench",    # bench kernels|run|server|extract
    "larql.commands.chat",     # chat, api-server
    "larql.commands.health",   # health
    "larql.commands.boot",     # boot (the container entrypoint)
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="larql",
        description="Serve the experts of a Mixture-of-Experts model from CPU-only machines.",
    )
    parser.add_argument("--version", action="version", version=f"larql {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = bool(getattr(args, "debug", False) or os.environ.get("LARQL_DEBUG"))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"larql {args.command}: interrupted", file=sys.stderr)
        return 130
    except (LarqlError, ValueError, OSError) as e:
        # Every expected failure (bad input, a refusing or unreachable server, auth, TLS,
        # timeouts) is one line; a traceback means a bug, or --debug / LARQL_DEBUG=1.
        if debug:
            raise
        print(f"larql {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 1


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 2000 else text[:2000] + "…"


def server_main() -> int:
    """`larql-server ...` is `larql serve ...`."""
    return main(["serve", *sys.argv[1:]])


def run_main() -> int:
    """`larql-run ...` is `larql run ...`."""
    return main(["run", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
