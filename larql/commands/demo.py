"""`larql demo`: the whole system on one machine, nothing downloaded (the logic is larql/demo.py)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    d = sub.add_parser(
        "demo",
        help="no download: build a random model, serve its experts from two local shards, generate",
        description="Builds a small random Gemma 4 vindex, starts two expert servers on loopback "
                    "(each owning half of the experts), generates through them and checks the tokens "
                    "equal in-process experts.",
    )
    d.add_argument("--prompt", default="The capital of France is", help="prompt text")
    d.add_argument("--max-tokens", type=int, default=24, help="tokens to generate (default 24)")
    d.add_argument("--shards", type=int, default=2, help="expert servers to start (default 2)")
    d.add_argument("--dispatch", choices=["exact", "batch"], default="exact",
                   help="exact: one round trip per layer; batch: one per token (approximate)")
    d.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature (0 = greedy; a random model's greedy text is dull)")
    d.add_argument("--seed", type=int, default=0, help="sampling seed (both runs use it)")
    d.add_argument("--keep", default="", metavar="DIR",
                   help="write the demo vindex to DIR and keep it (DIR must not exist unless --force)")
    d.add_argument("--force", action="store_true", help="with --keep: replace DIR if it exists")
    d.add_argument("--server-threads", type=int, default=0, metavar="N",
                   help="kernel threads per expert server (default: the cores divided among the "
                        "servers, at least 1: they share the machine with the client)")
    d.add_argument("--in-process", action="store_true",
                   help="run the servers as threads of this process instead of child processes")
    d.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    if args.server_threads < 0:
        raise ValueError(f"--server-threads {args.server_threads}: must be 0 (automatic) or more")
    if args.force and not args.keep:
        raise ValueError("--force only applies with --keep DIR")

    return run_demo(prompt=args.prompt, max_tokens=args.max_tokens, shards=args.shards,
                    dispatch=args.dispatch, temperature=args.temperature, seed=args.seed,
                    keep=args.keep or None, force=args.force, in_process=args.in_process,
                    server_threads=args.server_threads)
