"""Remote experts against real servers on loopback: exact results, sharding, pipelining,
grouping, encodings, and every way a shard can be wrong, dead or silent."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import numpy as np
import pytest

from larql import protocol as P
from larql.client import (
    AsyncExpertClient,
    ModelIdentity,
    ShardError,
    connect_shards,
)
from larql.demo import build_demo_vindex, demo_config
from larql.experts import LocalExperts
from larql.processes import free_port
from larql.server import ExpertServer
from larql.shardmap import ShardSpecError, parse_shards, split_work
from larql.vindex import open_vindex

E, L, H, TOPK = 8, 2, 64, 3


@pytest.fixture(scope="module", params=["f32", "q4k"])
def vindex(request, tmp_path_factory):
    cfg = demo_config(num_layers=L, hidden=H, num_experts=E, top_k=TOPK)
    path = build_demo_vindex(tmp_path_factory.mktemp(f"remote-{request.param}") / "v",
                             quant=request.param, config=cfg)
    return open_vindex(path)


def read_replies(sock: socket.socket, count: int) -> dict[int, dict]:
    """Read reply frames from a raw socket until `count` have arrived; keyed by request id."""
    reader, replies = P.FrameReader(), {}
    while len(replies) < count:
        data = sock.recv(1 << 20)
        assert data, f"connection closed after {len(replies)} of {count} replies"
        for body in reader.feed(data):
            rep = P.decode_body(body)
            replies[rep["id"]] = rep
    return replies


class Shards:
    """Servers for a shard layout; `spec` is the --moe-shards string."""

    def __init__(self, vindex, ranges, **kw):
        self.handles = [ExpertServer(open_vindex(vindex.path), experts=range(a, b + 1), **kw)
                        .start_in_thread("127.0.0.1", 0) for a, b in ranges]
        self.ranges = ranges
        pairs = zip(self.ranges, self.handles, strict=True)
        self.spec = ",".join(f"{a}-{b}={h.address}" for (a, b), h in pairs)

    def stop(self):
        for h in self.handles:
            h.stop()


def routing(T, seed=0, K=TOPK):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((T, H)).astype(np.float32) * 3
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)
    w = rng.random((T, K)).astype(np.float32)
    return h, ids, w


def sharded_local(vindex, ranges, layer, h, ids, w):
    """The same partition computed in process: f64 partials added in shard order, rounded once
    (what the client does with servers that announce f64 accumulators)."""
    out = np.zeros(h.shape, dtype=np.float64)
    for a, b in ranges:
        part = split_work(ids, w, a, b)
        if part is None:
            continue
        rows, i_s, w_s = part
        out[rows] += LocalExperts(vindex, experts=list(range(a, b + 1))).forward(layer, h[rows], i_s, w_s,
                                                                                acc="f64")
    return out.astype(np.float32)


@pytest.mark.parametrize("ranges", [[(0, 7)], [(0, 3), (4, 7)], [(0, 1), (2, 3), (4, 5), (6, 7)]],
                         ids=["1shard", "2shards", "4shards"])
def test_remote_equals_in_process(vindex, ranges):
    shards = Shards(vindex, ranges)
    try:
        with connect_shards(shards.spec, vindex, timeout=20) as rx:
            local = LocalExperts(vindex)
            for T, seed in ((1, 1), (1, 2), (9, 3)):   # decode steps and a prefill
                for layer in range(L):
                    h, ids, w = routing(T, seed + layer)
                    got = rx.forward(layer, h, ids, w)
                    assert got.dtype == np.float32 and got.shape == (T, H)
                    # bit-exact against the same partition in process (with f64 partial sums: against
                    # the unsharded experts, whose kernel rounds its double sum once) ...
                    exact = (local.forward(layer, h, ids, w) if rx.accumulator == "f64"
                             else sharded_local(vindex, ranges, layer, h, ids, w))
                    np.testing.assert_array_equal(got, exact)
                    # ... and equal up to summation order to the unsharded experts
                    np.testing.assert_allclose(got, local.forward(layer, h, ids, w), rtol=1e-5, atol=1e-6)
            # one request per shard per layer, whatever T is
            assert rx.round_trips <= 3 * L * len(ranges)
            multi = [(layer, *routing(2, 40 + layer)) for layer in range(L)]
            before = rx.round_trips
            ys = rx.forward_multi(multi)
            assert rx.round_trips - before <= len(ranges)            # one `multi` per shard
            for (layer, h, ids, w), y in zip(multi, ys, strict=True):
                np.testing.assert_array_equal(y, rx.forward(layer, h, ids, w))
    finally:
        shards.stop()


def test_encodings_f16_and_q8k(vindex):
    shards = Shards(vindex, [(0, 3), (4, 7)])
    try:
        h, ids, w = routing(5, 7)
        ref = LocalExperts(vindex).forward(1, h, ids, w)
        scale = float(np.abs(ref).max())
        for enc, tol in (("f16", 2e-3 if vindex.quant == "f32" else 2e-2), ("q8k", 2e-2)):
            with connect_shards(shards.spec, vindex, timeout=20, encoding=enc) as rx:
                got = rx.forward(1, h, ids, w)
            err = np.abs(got - ref).max() / scale
            if enc == "q8k" and vindex.quant == "q4k":
                # the kernel quantises x to the same Q8_K blocks itself, and f64 partials make the
                # shard split exact: nothing is lost at all
                assert err == 0, (enc, err)
            else:
                assert 0 < err <= tol, (enc, err)   # lossy, but close
    finally:
        shards.stop()


def test_grouped_requests_read_experts_once_and_stay_exact(vindex):
    """A burst of pipelined single-token requests for one layer is fused into few kernel calls."""
    srv = ExpertServer(open_vindex(vindex.path), workers=1)
    h_ = srv.start_in_thread("127.0.0.1", 0)
    try:
        local = LocalExperts(vindex)
        works = [routing(1, 100 + i) for i in range(40)]
        s = socket.create_connection((h_.host, h_.port), timeout=10)
        s.sendall(P.encode_frame({"op": "hello", "id": 0, "version": P.PROTOCOL_VERSION}))
        burst = b"".join(P.encode_frame({"op": "experts", "id": i + 1, **P.encode_work(0, *wk)})
                         for i, wk in enumerate(works))
        s.sendall(burst)
        replies = read_replies(s, len(works) + 1)
        s.close()
        for i, (h, ids, w) in enumerate(works):
            y = P.decode_result(P.check_reply(replies[i + 1]), 1, H)
            np.testing.assert_array_equal(y, local.forward(0, h, ids, w))
        st = srv.stats.snapshot()
        assert st["expert_requests"] == len(works)
        assert st["kernel_calls"] < len(works)     # fused
    finally:
        h_.stop()


def test_lone_decode_request_skips_the_worker_threads(vindex):
    """With nothing else to do, a one-token request is computed on the event loop thread (no
    two thread hand-offs, ~300 us on a 2-vCPU VM); a prefill still goes to the worker pool."""
    srv = ExpertServer(open_vindex(vindex.path), workers=2)
    h_ = srv.start_in_thread("127.0.0.1", 0)
    threads: list[str] = []
    compute = srv.batcher._compute

    def recording(key, works):
        threads.append(threading.current_thread().name)
        return compute(key, works)

    srv.batcher._compute = recording
    try:
        local = LocalExperts(vindex)
        with connect_shards(f"0-{E - 1}={h_.address}", vindex, timeout=20) as rx:
            for T in (1, 5):
                h, ids, w = routing(T, 300 + T)
                np.testing.assert_array_equal(rx.forward(1, h, ids, w), local.forward(1, h, ids, w))
        assert threads[0] == h_.thread.name              # inline, on the loop thread
        assert threads[1].startswith("larql-experts")     # the worker pool
    finally:
        h_.stop()


def test_pipelined_out_of_order_replies_are_matched(vindex):
    """Many concurrent forwards on one connection; a big prefill overtaken by small decodes."""
    shards = Shards(vindex, [(0, 7)], workers=2)
    try:
        local = LocalExperts(vindex)

        async def run():
            client = AsyncExpertClient(parse_shards(shards.spec, E), ModelIdentity.from_vindex(vindex),
                                       timeout=20)
            await client.connect()
            jobs = [(0, *routing(600, 5))] + [(1, *routing(1, 200 + i)) for i in range(20)]
            outs = await asyncio.gather(*(client.forward(*j) for j in jobs))
            conn = client.shards[0].replicas[0].conn
            await client.close()
            return jobs, outs, conn

        jobs, outs, conn = asyncio.run(run())
        assert not conn.pending
        for (layer, h, ids, w), y in zip(jobs, outs, strict=True):
            np.testing.assert_array_equal(y, local.forward(layer, h, ids, w))
    finally:
        shards.stop()


def test_hello_checks_refuse_wrong_shards(vindex, tmp_path):
    other = build_demo_vindex(tmp_path / "other", quant="f32",
                              config=demo_config(num_layers=L, hidden=H, num_experts=E, top_k=TOPK), seed=9)
    wrong_model = ExpertServer(open_vindex(other)).start_in_thread("127.0.0.1", 0)
    half = ExpertServer(open_vindex(vindex.path), experts=range(0, 4)).start_in_thread("127.0.0.1", 0)
    one_layer = ExpertServer(open_vindex(vindex.path), layers=[0]).start_in_thread("127.0.0.1", 0)
    try:
        with pytest.raises(ShardSpecError, match="different expert weights"):
            connect_shards(f"0-7={wrong_model.address}", vindex, timeout=5)
        with pytest.raises(ShardSpecError, match="does not hold experts 4-7"):
            connect_shards(f"0-7={half.address}", vindex, timeout=5)
        with pytest.raises(ShardSpecError, match="does not hold layers 1"):
            connect_shards(f"0-7={one_layer.address}", vindex, timeout=5)
        with pytest.raises(ShardSpecError, match="unserved"):
            connect_shards(f"0-3={half.address}", vindex, timeout=5)
        # a misconfigured replica is fatal even when another replica of the range is fine
        with pytest.raises(ShardSpecError, match="does not hold layers 1"):
            connect_shards(f"0-3={half.address}|{one_layer.address},4-7={one_layer.address}", vindex,
                           timeout=5)
    finally:
        for s in (wrong_model, half, one_layer):
            s.stop()


def test_ownership_error_from_server_names_what_it_owns(vindex):
    half = ExpertServer(open_vindex(vindex.path), experts=range(0, 4)).start_in_thread("127.0.0.1", 0)
    try:
        s = socket.create_connection((half.host, half.port), timeout=10)
        s.sendall(P.encode_frame({"op": "hello", "id": 0, "version": P.PROTOCOL_VERSION}))
        h, ids, w = routing(2, 1)
        ids[:] = [[0, 6, 1], [2, 3, 7]]
        s.sendall(P.encode_frame({"op": "experts", "id": 1, **P.encode_work(0, h, ids, w)}))
        reader, reps = P.FrameReader(), []
        while len(reps) < 2:
            reps += [P.decode_body(b) for b in reader.feed(s.recv(65536))]
        s.close()
        err = reps[1]
        assert err["ok"] is False and err["error"]["code"] == P.E_NOT_OWNED
        assert "6-7" in err["error"]["message"] and "owns experts 0-3" in err["error"]["message"]
        assert "y" not in err       # never a partial sum
    finally:
        half.stop()


class SilentServer:
    """Accepts connections and reads forever, never answering (a hung process)."""

    def __init__(self, answer_hello_from: ExpertServer | None = None):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.info = answer_hello_from.info() if answer_hello_from else None
        self.conns = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        reader = P.FrameReader()
        try:
            while data := c.recv(65536):
                for body in reader.feed(data):
                    msg = P.decode_body(body)
                    if msg.get("op") == "hello" and self.info:
                        c.sendall(P.encode_frame({"id": msg["id"], "ok": True, **self.info}))
        except OSError:
            pass

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def test_dead_and_hung_servers_are_clear_errors_within_timeout(vindex):
    dead = free_port()
    t0 = time.monotonic()
    with pytest.raises(ShardError, match=f"127.0.0.1:{dead}.*cannot connect"):
        connect_shards(f"0-7=127.0.0.1:{dead}", vindex, timeout=2, connect_timeout=2)
    assert time.monotonic() - t0 < 10

    silent = SilentServer()
    try:
        t0 = time.monotonic()
        with pytest.raises(ShardError, match="no reply to 'hello' within 1s"):
            connect_shards(f"0-7=127.0.0.1:{silent.port}", vindex, timeout=1, connect_timeout=1)
        assert time.monotonic() - t0 < 10
    finally:
        silent.close()

    # answers hello correctly, then never computes: the forward raises instead of hanging
    real = ExpertServer(open_vindex(vindex.path))
    stall = SilentServer(answer_hello_from=real)
    try:
        with connect_shards(f"0-7=127.0.0.1:{stall.port}", vindex, timeout=1, connect_timeout=2) as rx:
            h, ids, w = routing(1)
            t0 = time.monotonic()
            with pytest.raises(ShardError, match="no answer.*refusing to continue without experts 0-7"):
                rx.forward(0, h, ids, w)
            assert time.monotonic() - t0 < 10
    finally:
        stall.close()


def test_failover_to_replica_and_no_silent_zeros(vindex):
    a = ExpertServer(open_vindex(vindex.path)).start_in_thread("127.0.0.1", 0)
    b = ExpertServer(open_vindex(vindex.path)).start_in_thread("127.0.0.1", 0)
    dead = free_port()
    try:
        local = LocalExperts(vindex)
        h, ids, w = routing(2, 3)
        ref = local.forward(1, h, ids, w)
        # a dead replica listed first is skipped at connect time
        with connect_shards(f"0-7=127.0.0.1:{dead}|{a.address}", vindex, timeout=5, connect_timeout=1) as rx:
            np.testing.assert_array_equal(rx.forward(1, h, ids, w), ref)
        with connect_shards(f"0-3={a.address}|{b.address},4-7={b.address}", vindex, timeout=5) as rx:
            ref2 = sharded_local(vindex, [(0, 3), (4, 7)], 1, h, ids, w)
            np.testing.assert_array_equal(rx.forward(1, h, ids, w), ref2)
            a.stop()                       # a replica of 0-3 dies mid-session
            for _ in range(2):             # replicas share the load: one of these meets the dead one
                got = rx.forward(1, h, ids, w)   # retried on b
                np.testing.assert_array_equal(got, ref2)
            assert rx.client.retries >= 1
            b.stop()                       # now nothing serves any range
            with pytest.raises(ShardError, match="no answer"):
                rx.forward(1, h, ids, w)
    finally:
        a.stop()
        b.stop()


def test_graceful_shutdown_finishes_in_flight_work(vindex):
    srv = ExpertServer(open_vindex(vindex.path))
    h_ = srv.start_in_thread("127.0.0.1", 0)
    s = socket.create_connection((h_.host, h_.port), timeout=20)
    s.sendall(P.encode_frame({"op": "hello", "id": 0, "version": P.PROTOCOL_VERSION}))
    h, ids, w = routing(2000, 11)
    s.sendall(P.encode_frame({"op": "experts", "id": 1, **P.encode_work(0, h, ids, w)}))
    time.sleep(0.05)
    stopper = threading.Thread(target=h_.stop)
    stopper.start()
    reader, reps = P.FrameReader(), {}
    while 1 not in reps:
        data = s.recv(1 << 20)
        assert data, "connection closed before the in-flight reply"
        for body in reader.feed(data):
            rep = P.decode_body(body)
            reps[rep["id"]] = rep
    stopper.join(30)
    s.close()
    y = P.decode_result(P.check_reply(reps[1]), 2000, H)
    np.testing.assert_array_equal(y, LocalExperts(vindex).forward(0, h, ids, w))
    with pytest.raises(OSError):
        socket.create_connection((h_.host, h_.port), timeout=2)


def test_server_needs_only_norms_manifests_and_layers(vindex, tmp_path):
    """An expert-only slice (no embeddings, attention, dense MLP, tokenizer) serves fine."""
    import shutil

    slim = tmp_path / "slim"
    slim.mkdir()
    for name in ("index.json", "weight_manifest.json", "norms.bin"):
        shutil.copy(vindex.path / name, slim / name)
    shutil.copytree(vindex.path / "layers", slim / "layers")
    srv = ExpertServer(open_vindex(slim)).start_in_thread("127.0.0.1", 0)
    try:
        with connect_shards(f"0-7={srv.address}", vindex, timeout=10) as rx:
            h, ids, w = routing(3, 8)
            want = LocalExperts(vindex).forward(1, h, ids, w)
            np.testing.assert_array_equal(rx.forward(1, h, ids, w), want)
    finally:
        srv.stop()


def test_large_work_is_split_to_fit_the_servers_frame_limit(vindex):
    """A server announcing a small max_frame gets a long prefill (and a batch) in several
    requests, each within its limit; the result is unchanged."""
    srv = ExpertServer(open_vindex(vindex.path), max_frame=16384).start_in_thread("127.0.0.1", 0)
    try:
        local = LocalExperts(vindex)
        with connect_shards(f"0-7={srv.address}", vindex, timeout=20) as rx:
            h, ids, w = routing(200, 4)
            y = rx.forward(0, h, ids, w)
            assert rx.round_trips >= 200 * (H * 4 + 8 * TOPK) // 16384 + 1
            np.testing.assert_array_equal(y, local.forward(0, h, ids, w))
            work = [(layer, *routing(150, 10 + layer)) for layer in range(L)]
            before = rx.round_trips
            ys = rx.forward_multi(work)
            assert rx.round_trips - before > 1
            for (layer, h, ids, w), y in zip(work, ys, strict=True):
                np.testing.assert_array_equal(y, local.forward(layer, h, ids, w))
        assert srv.server.stats.snapshot()["errors"] == 0
    finally:
        srv.stop()


def test_work_is_split_to_the_servers_token_and_item_limits(vindex):
    """A server announcing max_tokens/max_items in hello gets a long prefill and a batch cut to
    those limits (never refused for its size), and the sums are unchanged."""
    from larql.protocol import ServerLimits

    limits = ServerLimits(max_tokens=16, max_items=2)
    srv = ExpertServer(open_vindex(vindex.path), limits=limits).start_in_thread("127.0.0.1", 0)
    try:
        local = LocalExperts(vindex)
        with connect_shards(f"0-7={srv.address}", vindex, timeout=20) as rx:
            h, ids, w = routing(50, 7)
            before = rx.round_trips
            y = rx.forward(0, h, ids, w)
            assert rx.round_trips - before >= 4   # 50 tokens in items of at most 16
            np.testing.assert_array_equal(y, local.forward(0, h, ids, w))
            work = [(layer, *routing(3, 20 + layer)) for layer in range(L)]
            before = rx.round_trips
            ys = rx.forward_multi(work)
            assert rx.round_trips - before >= -(-L // 2)   # at most 2 items per multi
            for (layer, h, ids, w), y in zip(work, ys, strict=True):
                np.testing.assert_array_equal(y, local.forward(layer, h, ids, w))
        assert srv.server.stats.snapshot()["errors"] == 0
    finally:
        srv.stop()


def test_client_that_does_not_read_replies_is_throttled_not_fatal(tmp_path):
    # transport behaviour: one weight format is enough
    vindex = open_vindex(build_demo_vindex(tmp_path / "v", quant="f32",
                                       config=demo_config(num_layers=L, hidden=H, num_experts=E, top_k=TOPK)))
    srv = ExpertServer(open_vindex(vindex.path))
    h_ = srv.start_in_thread("127.0.0.1", 0)
    try:
        s = socket.create_connection((h_.host, h_.port), timeout=30)
        s.sendall(P.encode_frame({"op": "hello", "id": 0, "version": P.PROTOCOL_VERSION}))
        h, ids, w = routing(512, 21)         # 128 KiB replies: 24 MiB in all, beyond socket buffers
        frame = b"".join(P.encode_frame({"op": "experts", "id": i, **P.encode_work(0, h, ids, w)})
                         for i in range(1, 193))
        sender = threading.Thread(target=s.sendall, args=(frame,))
        sender.start()
        deadline = time.monotonic() + 60      # not reading until the server pushes back
        while srv.stats.backpressure == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.stats.backpressure >= 1     # it stopped reading the greedy client ...
        with connect_shards(f"0-7={h_.address}", vindex, timeout=10) as rx:   # ... and serves others
            rx.forward(1, *routing(1, 3))
        ref = LocalExperts(vindex).forward(0, h, ids, w)
        reader, got = P.FrameReader(), set()
        while len(got) < 193:
            for body in reader.feed(s.recv(1 << 20)):
                rep = P.decode_body(body)
                if rep["id"]:
                    np.testing.assert_array_equal(P.decode_result(P.check_reply(rep), 512, H), ref)
                got.add(rep["id"])
        sender.join(10)
        s.close()
    finally:
        h_.stop()


def test_sync_client_works_inside_a_running_event_loop(vindex):
    """Called from asyncio code, the sync API hops to a helper thread instead of failing."""
    srv = ExpertServer(open_vindex(vindex.path)).start_in_thread("127.0.0.1", 0)
    try:
        rx = connect_shards(f"0-7={srv.address}", vindex, timeout=10)
        h, ids, w = routing(2, 6)

        async def inside():
            return rx.forward(1, h, ids, w)

        try:
            y = asyncio.run(inside())
            np.testing.assert_array_equal(y, rx.forward(1, h, ids, w))
        finally:
            rx.close()
        with pytest.raises(ShardError, match="closed"):
            rx.forward(1, h, ids, w)
    finally:
        srv.stop()


def test_layer_split_shards(vindex):
    """Servers started with --layers, named with EXPERTS@LAYERS in the shard map."""
    def start(**kw):
        return ExpertServer(open_vindex(vindex.path), **kw).start_in_thread("127.0.0.1", 0)

    l0_lo, l0_hi, l1 = start(experts=range(0, 4), layers=[0]), start(experts=range(4, 8), layers=[0]), \
        start(layers=[1])
    try:
        spec = f"0-3@0={l0_lo.address},4-7@0-0={l0_hi.address},0-7@1={l1.address}"
        with connect_shards(spec, vindex, timeout=10) as rx:
            for layer, ranges in ((0, [(0, 3), (4, 7)]), (1, [(0, 7)])):
                h, ids, w = routing(5, 30 + layer)
                np.testing.assert_array_equal(rx.forward(layer, h, ids, w),
                                              sharded_local(vindex, ranges, layer, h, ids, w))
            work = [(layer, *routing(2, 50 + layer)) for layer in range(L)]
            ys = rx.forward_multi(work)
            for (layer, h, ids, w), y in zip(work, ys, strict=True):
                np.testing.assert_array_equal(y, rx.forward(layer, h, ids, w))
        for s in (l0_lo, l0_hi, l1):            # each server only ever saw its own layer
            assert s.server.stats.snapshot()["errors"] == 0
        with pytest.raises(ShardSpecError, match="unserved at layer 1"):
            connect_shards(f"0-3@0={l0_lo.address},4-7@0={l0_hi.address}", vindex, timeout=5)
        with pytest.raises(ShardSpecError, match="does not hold layers 0"):
            connect_shards(f"0-7@0-1={l1.address}", vindex, timeout=5)
    finally:
        for s in (l0_lo, l0_hi, l1):
            s.stop()


def test_a_failing_request_does_not_fail_the_requests_fused_with_it(vindex, monkeypatch):
    """Fault injection: the kernel call fails whenever a 3-token request is in it. Fused with
    others, the server retries them one by one: only the 3-token request gets an error."""
    from larql.server import LayerBatcher

    real = LayerBatcher._compute
    fused_failures = []

    def flaky(self, key, works):
        if any(wk.tokens == 3 for wk in works):
            fused_failures.append(len(works))
            raise RuntimeError("injected kernel failure")
        return real(self, key, works)

    monkeypatch.setattr(LayerBatcher, "_compute", flaky)
    srv = ExpertServer(open_vindex(vindex.path), workers=1)
    h_ = srv.start_in_thread("127.0.0.1", 0)
    try:
        local = LocalExperts(vindex)
        works = {i: routing(3 if i == 5 else 1, 300 + i) for i in range(1, 21)}
        s = socket.create_connection((h_.host, h_.port), timeout=10)
        s.sendall(P.encode_frame({"op": "hello", "id": 0, "version": P.PROTOCOL_VERSION}) + b"".join(
            P.encode_frame({"op": "experts", "id": i, **P.encode_work(0, *wk)}) for i, wk in works.items()))
        reps = read_replies(s, len(works) + 1)
        s.close()
        assert reps[5]["ok"] is False and "injected" in reps[5]["error"]["message"]
        assert max(fused_failures) > 1          # it really was fused with others, then retried alone
        for i, (h, ids, w) in works.items():
            if i != 5:
                y = P.decode_result(P.check_reply(reps[i]), 1, H)
                np.testing.assert_array_equal(y, local.forward(0, h, ids, w))
    finally:
        h_.stop()


def test_default_encoding_is_q8k_for_kquant_experts_and_exact(vindex):
    """`encoding="auto"` (the default): Q8_K blocks for a Q4_K vindex, whose servers compute on
    them as sent, so the result is the f32 encoding's bit for bit in under a third of the bytes;
    f32 for float experts, where Q8_K would round."""
    shards = Shards(vindex, [(0, 3), (4, 7)])

    def bytes_in() -> int:
        return sum(s.server.stats.bytes_in for s in shards.handles)

    try:
        h, ids, w = routing(1, 21)
        L = vindex.config.num_layers
        got = {}
        for enc in ("auto", "f32"):
            with connect_shards(shards.spec, vindex, timeout=20, encoding=enc) as rx:
                before = bytes_in()
                got[enc] = [rx.forward(layer, h, ids, w).tobytes() for layer in range(L)]
                got[enc + " bytes"] = bytes_in() - before
                got[enc + " encoding"] = rx.client.options.encoding
                got[enc + " requests"] = rx.round_trips
                assert rx.client.c_path_calls == L
        assert got["auto"] == got["f32"]
        if vindex.quant == "q4k":
            assert got["auto encoding"] == "q8k"
            # each request's x is 292 bytes per 256 values instead of 1024 (at H = 64: one padded
            # block against 256 bytes; at 2816, 3212 against 11264); nothing else differs
            n = got["auto requests"]
            assert n == got["f32 requests"] and n >= L
            saved = P.x_bytes("f32", 1, H) - P.x_bytes("q8k", 1, H)
            assert got["f32 bytes"] - got["auto bytes"] == n * saved
        else:
            assert got["auto encoding"] == "f32" and got["auto bytes"] == got["f32 bytes"]
    finally:
        shards.stop()
