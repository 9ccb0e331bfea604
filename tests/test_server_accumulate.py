"""f64 partial sums: the kernel accumulates a token's weighted expert outputs in double and
rounds once, shards can return those double sums (`acc: "f64"`), and the shards' sums added in
shard order and rounded once equal the in-process result bit for bit, for any split."""

from __future__ import annotations

import numpy as np
import pytest
from rawwire import connect, rt

from larql import protocol as P
from larql.demo import build_demo_vindex, demo_config
from larql.experts import LocalExperts
from larql.server import ExpertServer
from larql.vindex import open_vindex

E, K = 16, 4


@pytest.fixture(scope="module")
def vindex(tmp_path_factory):
    cfg = demo_config(num_layers=2, hidden=256, num_experts=E, top_k=K)
    return open_vindex(build_demo_vindex(tmp_path_factory.mktemp("acc") / "v", quant="q4k", config=cfg))


def routing(T, seed):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((T, 256)).astype(np.float32) * 3
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)
    w = rng.random((T, K)).astype(np.float32)
    return h, ids, w


def split_sum(vindex, parts, layer, h, ids, w):
    total = np.zeros(h.shape, dtype=np.float64)
    for a, b in parts:
        mine = (ids >= a) & (ids <= b)
        total += LocalExperts(vindex, experts=list(range(a, b + 1))).forward(
            layer, h, np.where(mine, ids, -1), np.where(mine, w, 0), acc="f64")
    return total.astype(np.float32)


@pytest.mark.parametrize("parts", [[(0, 7), (8, 15)], [(0, 3), (4, 7), (8, 11), (12, 15)]],
                         ids=["2shards", "4shards"])
def test_f64_partials_rounded_once_equal_in_process_over_1000_q4k_tokens(vindex, parts):
    local = LocalExperts(vindex)
    for layer in range(2):
        h, ids, w = routing(1000, 10 + layer)
        want = local.forward(layer, h, ids, w)
        np.testing.assert_array_equal(split_sum(vindex, parts, layer, h, ids, w), want)
        # the f32 sums of the same split are not (why f64 exists): a sanity check of the test
        f32 = sum(LocalExperts(vindex, experts=list(range(a, b + 1))).forward(
            layer, h, np.where((ids >= a) & (ids <= b), ids, -1), w) for a, b in parts)
        assert not np.array_equal(f32, want)


def test_f64_sums_round_to_the_f32_result(vindex):
    local = LocalExperts(vindex)
    h, ids, w = routing(7, 3)
    y64 = local.forward(1, h, ids, w, acc="f64")
    assert y64.dtype == np.float64
    np.testing.assert_array_equal(y64.astype(np.float32), local.forward(1, h, ids, w))
    with pytest.raises(ValueError, match="acc"):
        local.forward(1, h, ids, w, acc="f16")


def test_server_replies_f64_when_asked(vindex):
    h_ = ExpertServer(vindex, experts=range(8)).start_in_thread("127.0.0.1", 0)
    try:
        with connect(h_.host, h_.port, hello=False) as s:
            info = rt(s, {"op": "hello", "id": 1, "version": 1})
            assert info["accumulators"] == ["f32", "f64"]
            h, ids, w = routing(5, 4)
            ids = np.where(ids < 8, ids, -1)
            item = P.encode_work(0, h, ids, w)
            r64 = rt(s, {"op": "experts", "id": 2, **item, "acc": "f64"})
            r32 = rt(s, {"op": "experts", "id": 3, **item})
            rm = rt(s, {"op": "multi", "id": 4, "items": [{**item, "acc": "f64"}, item]})
            bad = rt(s, {"op": "experts", "id": 5, **item, "acc": "f128"})
        want = LocalExperts(vindex, experts=list(range(8))).forward(0, h, ids, w, acc="f64")
        assert r64["y"] == want.astype("<f8").tobytes()
        assert r32["y"] == want.astype("<f4").tobytes()
        assert rm["ys"] == [r64["y"], r32["y"]]
        assert bad["error"]["code"] == P.E_BAD_REQUEST and "'acc'" in bad["error"]["message"]
    finally:
        h_.stop()
