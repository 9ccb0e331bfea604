"""A corrupted reply never reaches the model: non-finite or wrong-sized `y` from a hostile
stand-in shard is an error naming the shard, or a failover to an honest replica. Expert ids
out of range are refused before anything is sent. f64 partial sums are added in f64 and
rounded once; --on-shard-failure renormalize rescales the surviving router weights."""

from __future__ import annotations

import numpy as np
import pytest
from standin import StandIn

from larql.client import BadReply, ShardError, connect_shards
from larql.client.core import ModelIdentity, Planner, choose_accumulator
from larql.demo import build_demo_vindex, demo_config
from larql.experts import LocalExperts
from larql.server import ExpertServer
from larql.shardmap import ShardSpecError, parse_shards, split_work
from larql.vindex import open_vindex

E, L, H, TOPK = 8, 2, 64, 3


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = build_demo_vindex(tmp_path_factory.mktemp("integrity") / "v",
                             config=demo_config(num_layers=L, hidden=H, num_experts=E, top_k=TOPK))
    srv = ExpertServer(open_vindex(path)).start_in_thread("127.0.0.1", 0)
    try:
        yield open_vindex(path), srv
    finally:
        srv.stop()


def work(seed=0, T=2):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((T, H)).astype(np.float32) * 3
    ids = np.stack([rng.choice(E, TOPK, replace=False) for _ in range(T)]).astype(np.int32)
    return h, ids, rng.random((T, TOPK)).astype(np.float32)


def reply_dtype(req) -> str:
    """The reply's float type: f64 partial sums when the client asked for them (`acc`)."""
    return "<f8" if req.get("acc") == "f64" else "<f4"


def nan_y(req, rep):
    if "y" in rep:
        y = np.frombuffer(rep["y"], dtype=reply_dtype(req)).copy()
        y[len(y) // 2] = np.nan
        rep["y"] = y.tobytes()
    return rep


def short_y(req, rep):
    if "y" in rep:
        rep["y"] = rep["y"][:-4]
    return rep


def inf_ys(req, rep):
    if "ys" in rep:
        dt = np.dtype(reply_dtype(req))
        rep["ys"] = [np.full(len(b) // dt.itemsize, np.inf, dtype=dt).tobytes() for b in rep["ys"]]
    return rep


@pytest.mark.parametrize("mangle, needle", [(nan_y, "non-finite"), (short_y, "expected"),
                                            (inf_ys, "non-finite")])
def test_hostile_shard_is_named_and_never_reaches_the_model(served, mangle, needle):
    vindex, srv = served
    bad = StandIn((srv.host, srv.port), mangle=mangle)
    try:
        h, ids, w = work(1)
        with connect_shards(f"0-7={bad.address}", vindex, timeout=3, api_key="") as rx:
            with pytest.raises(ShardError, match=f"shard 0-7 at 127.0.0.1:{bad.port}: .*{needle}"):
                if mangle is inf_ys:
                    rx.forward_multi([(0, h, ids, w), (1, h, ids, w)])
                else:
                    rx.forward(0, h, ids, w)
        # with an honest replica beside it, the work fails over and the answer is exact
        ref = LocalExperts(vindex).forward(0, h, ids, w)
        with connect_shards(f"0-7={bad.address}|{srv.address}", vindex, timeout=5, api_key="") as rx:
            for _ in range(4):                  # load sharing sends some of these to the bad one
                if mangle is inf_ys:
                    ys = rx.forward_multi([(0, h, ids, w)])
                    np.testing.assert_array_equal(ys[0], ref)
                else:
                    np.testing.assert_array_equal(rx.forward(0, h, ids, w), ref)
            assert rx.client.retries >= 1 and bad.forwarded >= 1
    finally:
        bad.stop()


def test_expert_ids_out_of_range_raise_before_sending(served):
    vindex, srv = served
    with connect_shards(f"0-7={srv.address}", vindex, timeout=5, api_key="") as rx:
        before = rx.round_trips
        h, ids, w = work(2)
        for bad in (E, E + 100, -2):
            ids2 = ids.copy()
            ids2[1, 0] = bad
            with pytest.raises(ValueError, match=r"expert ids \[-?\d+\] out of range \[0, 7\]"):
                rx.forward(0, h, ids2, w)
        with pytest.raises(ValueError, match="out of range"):
            rx.forward(0, h, np.array([[0, 1, 2**40], [0, 1, 2]]), w)   # no wrap-around into range
        assert rx.round_trips == before


def f32_only_standin(srv):
    """A shard that does not offer f64 partial sums (an older server): hides them from hello."""
    def mangle(req, rep):
        if req.get("op") == "hello":
            rep["accumulators"] = ["f32"]
        return rep

    return StandIn((srv.host, srv.port), mangle=mangle)


def test_f64_partials_are_summed_in_f64_and_rounded_once(served):
    vindex, _ = served
    ranges = [(0, 1), (2, 3), (4, 5), (6, 7)]
    servers = [ExpertServer(open_vindex(vindex.path), experts=range(a, b + 1)).start_in_thread("127.0.0.1", 0)
               for a, b in ranges]
    old = f32_only_standin(servers[1])
    try:
        spec = ",".join(f"{a}-{b}={s.address}" for (a, b), s in zip(ranges, servers, strict=True))
        with connect_shards(spec, vindex, timeout=5, api_key="") as rx:
            assert rx.accumulator == "f64"
            differs = 0
            for seed in range(6):
                h, ids, w = work(10 + seed, T=16)
                got = rx.forward(1, h, ids, w)
                want64 = np.zeros((16, H), dtype=np.float64)
                want32 = np.zeros((16, H), dtype=np.float32)
                for a, b in ranges:
                    part = split_work(ids, w, a, b)
                    if part is None:
                        continue
                    rows, i_s, w_s = part
                    shard = LocalExperts(vindex, experts=list(range(a, b + 1)))
                    want64[rows] += shard.forward(1, h[rows], i_s, w_s, acc="f64")
                    want32[rows] += shard.forward(1, h[rows], i_s, w_s)
                np.testing.assert_array_equal(got, want64.astype(np.float32))   # rounded once
                differs += int((want32 != want64.astype(np.float32)).sum())
            assert differs > 0     # a sum of f32 partials would have been different somewhere
        # a shard map mixing servers with and without f64 falls back to f32 sums everywhere
        mixed = f"0-1={servers[0].address},2-3={old.address},4-5={servers[2].address}," \
                f"6-7={servers[3].address}"
        with connect_shards(mixed, vindex, timeout=5, api_key="") as rx:
            assert rx.accumulator == "f32"
        with pytest.raises(ShardSpecError, match="f64"):
            connect_shards(mixed, vindex, timeout=5, api_key="", accumulate="f64")
    finally:
        old.stop()
        for s in servers:
            s.stop()


def test_one_shard_per_layer_takes_f32_replies_and_stays_exact(served):
    """No layer's experts split: each server's f32 reply is already the in-process result (it
    rounds its double sum once), so "auto" asks for f32 and half the bytes; an explicit "f64"
    still gets f64."""
    vindex, _ = served
    whole = ExpertServer(open_vindex(vindex.path)).start_in_thread("127.0.0.1", 0)
    try:
        local = LocalExperts(vindex)
        by_layers = f"0-7@0-0={whole.address},0-7@1-{L - 1}={whole.address}"
        for spec, acc, want in ((f"0-7={whole.address}", "auto", "f32"), (by_layers, "auto", "f32"),
                                (f"0-7={whole.address}", "f64", "f64")):
            with connect_shards(spec, vindex, timeout=5, api_key="", accumulate=acc) as rx:
                assert rx.accumulator == want, spec
                for seed in range(3):
                    h, ids, w = work(30 + seed, T=1 + 7 * seed)
                    for layer in range(L):
                        got = rx.forward(layer, h, ids, w)
                        assert got.tobytes() == local.forward(layer, h, ids, w).tobytes()
    finally:
        whole.stop()


def test_choose_accumulator():
    f64 = {"accumulators": ["f32", "f64"]}
    assert choose_accumulator("auto", [f64, f64]) == "f64"
    assert choose_accumulator("auto", [f64, f64], split=False) == "f32"    # one shard per layer: exact
    assert choose_accumulator("f64", [f64, f64], split=False) == "f64"     # asked for
    assert choose_accumulator("auto", [f64, {}]) == "f32"
    assert choose_accumulator("f32", [f64]) == "f32"
    with pytest.raises(ShardSpecError):
        choose_accumulator("f64", [{"accumulators": "f64"}])


def test_renormalize_drops_a_lost_shard_and_rescales_the_rest(served):
    """Pure arithmetic of Planner.combine with one shard's result missing."""
    vindex, _ = served
    shards = parse_shards("0-3=a:1,4-7=b:1", E)
    planner = Planner(shards, ModelIdentity(H, E, L), "f32")
    h, ids, w = work(5, T=6)
    ids[0] = [4, 5, 6]          # token 0 has every expert on the lost shard
    plan = planner.plan([(0, h, ids, w)], multi=False, budget=lambda si: (1 << 20, 1 << 20, 1 << 20))
    assert [j.shard for j in plan.jobs] == [0, 1]
    local_a = LocalExperts(vindex, experts=[0, 1, 2, 3])
    rows, i_s, w_s = split_work(ids, w, 0, 3)
    ya = local_a.forward(0, h[rows], i_s, w_s)
    (got,) = planner.combine(plan, [[ya], None])
    assert planner.degraded_layers == 1
    total = w.sum(axis=1)
    kept = np.where(ids <= 3, w, 0).sum(axis=1)
    want = np.zeros((6, H), dtype=np.float32)
    want[rows] = ya
    scale = np.divide(total, kept, out=np.zeros_like(total), where=kept > 0)
    np.testing.assert_allclose(got, want * scale[:, None], rtol=1e-6)
    assert not got[0].any()     # nothing left for token 0: no MoE output, never NaN
    # equal to computing the surviving experts with renormalised weights
    w_re = np.where(ids <= 3, w * scale[:, None], 0).astype(np.float32)
    survivors = LocalExperts(vindex).forward(0, h, np.where(ids <= 3, ids, -1), w_re)
    np.testing.assert_allclose(got[1:], survivors[1:], rtol=1e-4, atol=1e-5)


def test_a_shard_error_is_a_larql_error():
    import larql

    assert issubclass(ShardError, larql.LarqlError) and issubclass(BadReply, ShardError)
