"""`larql bench WHAT`: one subcommand per module in larql.benchmarks.BENCHES."""

from __future__ import annotations

import argparse
import importlib


def add_parser(sub) -> None:
    from ..benchmarks import BENCHES

    p = sub.add_parser("bench", help="run a benchmark and print ratios against a baseline")
    bench_sub = p.add_subparsers(dest="bench", metavar="WHAT")
    for name, (module_name, help_text) in BENCHES.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        bp = bench_sub.add_parser(name, help=help_text)
        module.add_arguments(bp)
        bp.set_defaults(func=module.main)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def main(args: argparse.Namespace) -> int:
    return int(args.func(args) or 0)
