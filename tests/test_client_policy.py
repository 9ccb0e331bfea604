"""The failover policy alone (sans-IO: every call takes the time), and the asyncio client
driving it against real servers: failover, all replicas down, renormalize."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from larql.client import ShardError, async_client
from larql.client.policy import BACKOFF_FIRST, BACKOFF_MAX, ShardPolicy
from larql.demo import build_demo_vindex, demo_config
from larql.experts import LocalExperts
from larql.processes import free_port
from larql.server import ExpertServer
from larql.shardmap import Endpoint
from larql.vindex import open_vindex


def policy(n=2):
    return ShardPolicy("0-7", [Endpoint("h", i + 1) for i in range(n)])


def test_up_replicas_share_the_load_least_busy_first():
    p = policy(3)
    picks = [p.choose(0.0).endpoint.port for _ in range(6)]
    assert sorted(picks) == [1, 1, 2, 2, 3, 3]           # round-robin among equals
    p.replicas[0].inflight = 2
    p.replicas[1].inflight = 1
    assert {p.choose(0.0).endpoint.port for _ in range(3)} == {3}   # least in flight


def test_backoff_doubles_and_is_capped_and_success_resets():
    p = policy(1)
    r = p.replicas[0]
    downs = []
    for _ in range(8):
        p.failed(r, "reset", 100.0)
        downs.append(r.down_until - 100.0)
    assert downs[0] == pytest.approx(BACKOFF_FIRST) and downs[1] == pytest.approx(2 * BACKOFF_FIRST)
    assert max(downs) == pytest.approx(BACKOFF_MAX)
    assert p.choose(100.0) is None and p.choose(100.0 + BACKOFF_MAX) is r   # tried again when due
    p.succeeded(r)
    assert r.up() and r.down_until == 0.0


def test_attempt_fails_over_then_waits_then_gives_up_at_the_deadline():
    p = policy(2)
    a = p.attempt(deadline=10.0)
    s1 = a.next(0.0)
    assert s1.replica is not None and s1.budget == pytest.approx(5.0)     # half: another can take over
    a.failed(s1.replica, "timeout", 5.0)
    s2 = a.next(5.0)
    assert s2.replica is not None and s2.replica is not s1.replica and s2.budget == pytest.approx(5.0)
    a.failed(s2.replica, "reset", 5.0)
    s3 = a.next(5.0)                        # both down: wait for the first backoff to expire
    assert s3.replica is None and 0 < s3.wait <= BACKOFF_FIRST + 1e-9
    s4 = a.next(5.0 + s3.wait)
    assert s4.replica is s1.replica          # reconnection attempt
    a.failed(s4.replica, "refused", 9.99)
    a.failed(s2.replica, "refused", 9.99)
    gave_up = a.next(10.0)
    assert gave_up.replica is None and gave_up.wait == 0
    assert "shard 0-7: no answer" in gave_up.reason and "h:1" in gave_up.reason and "h:2" in gave_up.reason


def test_renormalize_attempts_do_not_wait_and_corrupt_replicas_are_not_retried():
    p = policy(2)
    a = p.attempt(10.0, wait=False)
    for _ in range(2):
        s = a.next(0.0)
        a.failed(s.replica, "bad reply", 0.0, corrupt=True)
    s = a.next(0.0)
    assert s.replica is None and s.wait == 0 and "unusable data" in s.reason


def test_background_probes_only_while_another_replica_is_up():
    p = policy(2)
    a, b = p.replicas
    p.failed(a, "reset", 0.0)
    assert p.due_probes(0.0) == []                      # its backoff has not expired
    assert p.due_probes(1.0) == [a] and a.probing
    assert p.due_probes(1.0) == []                      # one probe at a time
    assert p.choose(1.0) is b                           # the decode path never waits on a
    p.probe_done(a, None, 1.5)
    assert a.up() and not a.probing
    p.failed(a, "reset", 2.0)
    p.failed(b, "reset", 2.0)
    assert p.due_probes(5.0) == []                      # none up: requests retry themselves


E, H, TOPK = 8, 64, 3


@pytest.fixture(scope="module")
def vindex(tmp_path_factory):
    path = build_demo_vindex(tmp_path_factory.mktemp("policy") / "v",
                             config=demo_config(num_layers=2, hidden=H, num_experts=E, top_k=TOPK))
    return open_vindex(path)


def work(seed):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((3, H)).astype(np.float32)
    ids = np.stack([rng.choice(E, TOPK, replace=False) for _ in range(3)]).astype(np.int32)
    return h, ids, rng.random((3, TOPK)).astype(np.float32)


def test_asyncio_client_fails_over_and_names_the_shard_when_all_are_down(vindex):
    a = ExpertServer(open_vindex(vindex.path)).start_in_thread("127.0.0.1", 0)
    b = ExpertServer(open_vindex(vindex.path)).start_in_thread("127.0.0.1", 0)
    local = LocalExperts(vindex)

    async def run():
        client = await async_client(f"0-7={a.address}|{b.address}", vindex, timeout=2, api_key="").connect()
        try:
            a.stop()
            for seed in range(4):
                h, ids, w = work(seed)
                np.testing.assert_array_equal(await client.forward(1, h, ids, w), local.forward(1, h, ids, w))
            assert client.retries >= 1
            b.stop()
            with pytest.raises(ShardError, match="shard 0-7: no answer"):
                await client.forward(1, *work(9))
        finally:
            await client.close()

    try:
        asyncio.run(run())
    finally:
        a.stop()
        b.stop()


def test_asyncio_client_renormalizes_when_asked(vindex):
    a = ExpertServer(open_vindex(vindex.path), experts=range(0, 4)).start_in_thread("127.0.0.1", 0)
    b = ExpertServer(open_vindex(vindex.path), experts=range(4, 8)).start_in_thread("127.0.0.1", 0)

    async def run():
        client = await async_client(f"0-3={a.address},4-7={b.address}", vindex, timeout=2, api_key="",
                                    on_shard_failure="renormalize").connect()
        try:
            b.stop()
            y = await client.forward(0, *work(3))
            assert np.isfinite(y).all() and client.degraded_layers == 1
        finally:
            await client.close()

    try:
        asyncio.run(run())
    finally:
        a.stop()
        b.stop()


def test_unreachable_at_connect_is_named(vindex):
    port = free_port()

    async def run():
        client = async_client(f"0-7=127.0.0.1:{port}", vindex, timeout=1, connect_timeout=1, api_key="")
        await client.connect()

    with pytest.raises(ShardError, match=f"shard 0-7: no replica reachable: 127.0.0.1:{port}: cannot conn"):
        asyncio.run(run())
