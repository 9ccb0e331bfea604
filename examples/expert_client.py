#!/usr/bin/env python3
"""The low-level expert client: send one layer's routed work to a shard map, get the sum back.

This is what a runtime other than larql's (a different model loop, a C++ host via Python, a
research script) needs: you compute the router yourself, larql computes the experts remotely.

    python3 examples/expert_client.py                     # self-contained: random model, 2 local servers
    python3 examples/expert_client.py --vindex gemma4.vindex --shards "0-63=a:8080,64-127=b:8080"
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import numpy as np
from stream_tokens import vindex_and_shards

import larql.api as lq
from larql import kernels
from larql.experts import LocalExperts
from larql.vindex import open_vindex


def route(vindex, layer: int, h: np.ndarray):
    """Gemma 4's router on the raw residual: softmax over experts, top-k, renormalise, scale."""
    cfg = vindex.config
    r = kernels.rms_norm(h, None, cfg.rms_norm_eps) * vindex.norm(f"layers.{layer}.router.scale")
    logits = r @ vindex.norm(f"layers.{layer}.router.proj.weight").T
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ids = np.argsort(-p, axis=-1, kind="stable")[:, : cfg.top_k].astype(np.int32)
    w = np.take_along_axis(p, ids, -1)
    w = w / w.sum(-1, keepdims=True) * vindex.norm(f"layers.{layer}.router.per_expert_scale")[ids]
    return ids, w.astype(np.float32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vindex")
    ap.add_argument("--shards")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=4)
    args = ap.parse_args()

    with vindex_and_shards(args.vindex, args.shards) as (path, spec):
        vindex = open_vindex(path)
        cfg = vindex.config
        h = np.random.default_rng(0).standard_normal((args.tokens, cfg.hidden_size)).astype(np.float32)
        ids, w = route(vindex, args.layer, h)

        # synchronous: one request per shard, all shards at once, partial sums added
        with lq.expert_client(spec, vindex) as experts:
            y = experts.forward(args.layer, h, ids, w)
        # the caller applies the post-norm to the summed output (a shard never does)
        post_norm = vindex.norm(f"layers.{args.layer}.post_feedforward_layernorm_2.weight")
        moe = kernels.rms_norm(y, post_norm, cfg.rms_norm_eps)

        # asyncio: the same call, awaitable
        async def run():
            client = await lq.async_expert_client(spec, vindex)
            try:
                return await client.forward(args.layer, h, ids, w)
            finally:
                await client.close()

        y_async = asyncio.run(run())
        y_local = LocalExperts(vindex).forward(args.layer, h, ids, w)
        print(f"layer {args.layer}: {args.tokens} tokens x top-{cfg.top_k} of {cfg.num_experts} experts "
              f"via {spec}")
        print(f"  |remote - in-process| max = {np.abs(y - y_local).max():.2e} "
              f"(sum order only), async == sync: {np.array_equal(y, y_async)}")
        print(f"  post-normed MoE output, token 0, first values: {np.round(moe[0, :4], 4)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
