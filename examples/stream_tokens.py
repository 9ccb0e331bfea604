#!/usr/bin/env python3
"""Embed larql: load a model whose experts live on expert servers and stream tokens.

    python3 examples/stream_tokens.py          # self-contained: random model, 2 local servers
    python3 examples/stream_tokens.py --vindex gemma4.vindex --shards "0-63=a:8080,64-127=b:8080"
    python3 examples/stream_tokens.py --vindex gemma4.vindex          # experts in process

Shows the synchronous iterator (`Model.stream`) and the asyncio one (`Model.astream`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
from pathlib import Path

import larql.api as lq


def local_demo_servers(tmp: str):
    """A random model and two expert servers on loopback (what `larql demo` does)."""
    from larql.demo import build_demo_vindex
    from larql.server import ExpertServer
    from larql.vindex import open_vindex

    path = build_demo_vindex(Path(tmp) / "demo.vindex")
    n = open_vindex(path).config.num_experts
    servers = [ExpertServer(open_vindex(path), experts=range(a, b)).start_in_thread("127.0.0.1", 0)
               for a, b in ((0, n // 2), (n // 2, n))]
    spec = f"0-{n // 2 - 1}={servers[0].address},{n // 2}-{n - 1}={servers[1].address}"
    return path, spec, servers


@contextlib.contextmanager
def vindex_and_shards(vindex: str | None, shards: str | None):
    """(vindex, shards) as given, or with no vindex a random demo model and its two local servers."""
    if vindex is not None:
        yield vindex, shards
        return
    with tempfile.TemporaryDirectory() as tmp:
        path, spec, servers = local_demo_servers(tmp)
        try:
            yield path, spec
        finally:
            for s in servers:
                s.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vindex", help="a vindex directory (default: build a random demo model)")
    ap.add_argument("--shards", help='expert servers, e.g. "0-63=host:8080,64-127=host:8081"')
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()

    with vindex_and_shards(args.vindex, args.shards) as (vindex, shards):
        # 1. synchronous streaming
        with lq.load(vindex, shards=shards) as model:
            print(f"experts: {'remote ' + shards if shards else 'in process'}")
            print(repr(args.prompt), "->", end=" ", flush=True)
            for piece in model.stream(args.prompt, max_tokens=args.max_tokens, temperature=0.8, seed=1):
                print(repr(piece)[1:-1], end="", flush=True)
            print()
            print("sync: ", model.last.stats.summary())
            sync_ids = model.last.tokens

            # 2. the same from asyncio: generation runs on a worker thread, the loop stays free
            async def run() -> list[str]:
                pieces = []
                async for piece in model.astream(args.prompt, max_tokens=args.max_tokens,
                                                 temperature=0.8, seed=1):
                    pieces.append(piece)
                return pieces

            asyncio.run(run())
            print("async:", model.last.stats.summary())
            assert model.last.tokens == sync_ids, "same seed, same tokens"
            for s in model.server_stats():
                print(f"server {s['shard']} at {s['address']}: {s['requests']} requests, "
                      f"p50 {s['p50_us']:.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
