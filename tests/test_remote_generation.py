"""Whole-model generation with the experts on loopback servers.

Against the same shard partition computed in process the tokens and logits are bit-identical
(the wire is lossless and partial sums are added in the same order); against unsharded
in-process experts they agree up to float summation order, and at f32 the first logits match
`transformers`. Batch dispatch costs one round trip per shard per token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from larql.client import connect_shards
from larql.experts import LocalExperts
from larql.models.gemma4 import Gemma4Model
from larql.server import ExpertServer
from larql.shardmap import split_work
from larql.vindex import open_vindex
from larql.vindex.extract import extract

PROMPT = [2, 17, 99, 4, 250, 31, 77, 8, 120, 5, 64, 300, 11]   # longer than the sliding window (8)
STEPS = 12


@pytest.fixture(scope="module", params=["f32", "q4k"])
def tiny(request, tiny_checkpoint, tmp_path_factory):
    model, ckpt = tiny_checkpoint("small", 0)
    out = tmp_path_factory.mktemp(f"remote-gen-{request.param}") / "m.vindex"
    return model, open_vindex(extract(ckpt, out, quant=request.param, progress=False))


class ShardedLocal:
    """In-process experts split like the servers: f64 partials added in shard order, rounded once
    (what the client does with servers that announce f64 accumulators)."""

    def __init__(self, vindex, ranges):
        self.parts = [((a, b), LocalExperts(vindex, experts=list(range(a, b + 1)))) for a, b in ranges]

    def forward(self, layer, h, ids, weights):
        h = np.atleast_2d(h)
        out = np.zeros(h.shape, dtype=np.float64)
        for (a, b), le in self.parts:
            part = split_work(ids, weights, a, b)
            if part is not None:
                rows, i_s, w_s = part
                out[rows] += le.forward(layer, h[rows], i_s, w_s, acc="f64")
        return out.astype(np.float32)

    def forward_multi(self, work):
        return [self.forward(*w) for w in work]

    def close(self):
        pass


def run(model: Gemma4Model, steps: int = STEPS):
    cache = model.new_cache()
    logits = [model.forward(PROMPT, cache)]
    tokens = []
    for _ in range(steps):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(model.forward([tokens[-1]], cache))
    return tokens, np.stack(logits)


def ranges_for(num_experts, shards):
    n = num_experts // shards
    return [(i * n, (i + 1) * n - 1) for i in range(shards)]


def start_shards(vindex, ranges):
    """In-thread expert servers on loopback, one per (first, last) range; (handles, --moe-shards)."""
    servers = [ExpertServer(open_vindex(vindex.path), experts=range(a, b + 1)).start_in_thread("127.0.0.1", 0)
               for a, b in ranges]
    return servers, ",".join(f"{a}-{b}={s.address}" for (a, b), s in zip(ranges, servers, strict=True))


@pytest.mark.parametrize("shards", [2, 4])
def test_remote_generation_matches_in_process(tiny, shards):
    torch_model, vindex = tiny
    ranges = ranges_for(vindex.config.num_experts, shards)
    servers, spec = start_shards(vindex, ranges)
    try:
        remote = connect_shards(spec, vindex, timeout=30)
        try:
            model = Gemma4Model(vindex, experts=remote)
            cache = model.new_cache()
            model.forward(PROMPT, cache)
            # prefill: all prompt tokens in one request per shard per layer
            assert remote.round_trips <= shards * vindex.config.num_layers
            tokens, logits = run(model)
            acc = remote.accumulator
        finally:
            remote.close()
        # with f64 partial sums the reference is the unsharded in-process model, else the partition
        exact_ref = None if acc == "f64" else ShardedLocal(vindex, ranges)
        ref_tokens, ref_logits = run(Gemma4Model(vindex, experts=exact_ref))
        assert tokens == ref_tokens
        np.testing.assert_array_equal(logits, ref_logits)            # bit-exact
        un_tokens, un_logits = run(Gemma4Model(vindex))                   # unsharded in-process
        assert tokens == un_tokens
        np.testing.assert_allclose(logits, un_logits, rtol=1e-4, atol=1e-4)
        if vindex.quant == "f32":
            with torch.no_grad():
                want = torch_model(torch.tensor([PROMPT])).logits[0, -1].numpy()
            np.testing.assert_allclose(logits[0], want, rtol=1e-4, atol=1e-4)
    finally:
        for s in servers:
            s.stop()


def test_batch_dispatch_is_one_round_trip_per_shard_per_token(tiny):
    _, vindex = tiny
    ranges = ranges_for(vindex.config.num_experts, 2)
    servers, spec = start_shards(vindex, ranges)
    try:
        remote = connect_shards(spec, vindex, timeout=30)
        try:
            model = Gemma4Model(vindex, experts=remote, dispatch="batch")
            cache = model.new_cache()
            model.forward(PROMPT, cache)
            before = remote.round_trips
            model.forward([5], cache)
            assert remote.round_trips - before <= 2          # one `multi` per shard
            tokens, logits = run(Gemma4Model(vindex, experts=remote, dispatch="batch"))
        finally:
            remote.close()
        sharded = ShardedLocal(vindex, ranges)
        ref_tokens, ref_logits = run(Gemma4Model(vindex, experts=sharded, dispatch="batch"))
        assert tokens == ref_tokens
        np.testing.assert_array_equal(logits, ref_logits)
        exact_tokens, _ = run(Gemma4Model(vindex))
        agree = np.mean(np.array(tokens) == np.array(exact_tokens))
        print(f"batch dispatch greedy agreement with exact ({vindex.quant}): {agree:.0%}")
    finally:
        for s in servers:
            s.stop()
