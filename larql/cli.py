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


def build_parser(progs: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """`progs` renames commands in their usage lines: {"serve": "larql-server"}."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="larql",
        description="Serve the experts of a Mixture-of-Experts model from CPU-only machines.",
    )
    parser.add_argument("--version", action="version", version=f"larql {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    for command, prog in (progs or {}).items():
        sub.choices[command].prog = prog
    return parser


def _accept_stop_signals() -> None:
    """Unblock Ctrl-C and SIGTERM in this thread: a parent that had them blocked when it started
    us (a signal mask is inherited through exec) would otherwise leave us deaf to both."""
    import signal

    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def main(argv: list[str] | None = None, *, progs: dict[str, str] | None = None) -> int:
    _accept_stop_signals()
    try:
        parser = build_parser(progs)  # (some command modules import the kernels to list options)
    except LarqlError as e:
        print(f"larql: error: {e}", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = bool(getattr(args, "debug", False) or os.environ.get("LARQL_DEBUG"))
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that went away shows here, not in the interpreter's exit
        return rc
    except BrokenPipeError:
        return _stdout_closed()
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


def _stdout_closed() -> int:
    """The reader of our stdout exited (`larql run ... | head`): stop quietly, as coreutils do
    on SIGPIPE, with the shell's 128 + SIGPIPE status."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # Python's final flush must not raise again
    os.close(devnull)
    return 128 + 13


def server_main() -> int:
    """`larql-server ...` is `larql serve ...`."""
    return main(["serve", *sys.argv[1:]], progs={"serve": "larql-server"})


def run_main() -> int:
    """`larql-run ...` is `larql run ...`."""
    return main(["run", *sys.argv[1:]], progs={"run": "larql-run"})


if __name__ == "__main__":
    sys.exit(main())
