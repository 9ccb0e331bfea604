"""The dense MLP runs while remote experts compute: a layer's requests leave before the dense
MLP starts, the result is the same as the serial order's, and a failure on either side leaves
the client usable (its lock released, its connections in step)."""

from __future__ import annotations

import numpy as np
import pytest

from larql import models
from larql import protocol as P
from larql.client import connect_shards
from larql.demo import build_demo_vindex, demo_config
from larql.experts import LocalExperts, Pending
from larql.server import ExpertServer
from larql.vindex import open_vindex

E, L, H = 8, 2, 64


@pytest.fixture(scope="module")
def vindex(tmp_path_factory):
    folder = tmp_path_factory.mktemp("overlap")
    cfg = demo_config(num_layers=L, hidden=H, num_experts=E, top_k=2)
    return open_vindex(build_demo_vindex(folder / "v", quant="q4k", config=cfg))


@pytest.fixture(scope="module")
def servers(vindex):
    hs = [ExpertServer(open_vindex(vindex.path), experts=range(a, b + 1)).start_in_thread("127.0.0.1", 0)
          for a, b in ((0, 3), (4, 7))]
    yield f"0-3={hs[0].address},4-7={hs[1].address}"
    for h in hs:
        h.stop()


def test_requests_leave_before_the_dense_mlp(vindex, servers):
    rx = connect_shards(servers, vindex, api_key="")
    model = models.load(vindex, experts=rx)
    seen: list[int] = []
    dense = model.dense_mlp

    def watched(lw, h):
        seen.append(rx.round_trips)
        return dense(lw, h)

    model.dense_mlp = watched
    before = rx.round_trips
    model.forward([1, 5, 7], model.new_cache())         # a prefill: the general path
    model.forward([9], model.new_cache())                # one token: the C path
    # every layer's dense MLP started after that layer's requests went out
    assert len(seen) == 2 * L
    assert all(s > b for s, b in zip(seen, [before, *seen[:-1]], strict=False))
    assert rx.client.c_path_calls >= L
    rx.close()


def test_overlapped_equals_serial_and_in_process(vindex, servers):
    rx = connect_shards(servers, vindex, api_key="")
    remote = models.load(vindex, experts=rx)
    local = models.load(vindex)
    ca, cb = remote.new_cache(), local.new_cache()
    tok_a = tok_b = 3
    for _ in range(6):
        la, lb = remote.forward([tok_a], ca), local.forward([tok_b], cb)
        assert la.tobytes() == lb.tobytes()
        tok_a, tok_b = int(np.argmax(la)), int(np.argmax(lb))
    rx.close()


def test_a_failing_dense_mlp_leaves_the_client_usable(vindex, servers):
    rx = connect_shards(servers, vindex, api_key="")
    model = models.load(vindex, experts=rx)
    good = model.dense_mlp

    def broken(lw, h):
        raise RuntimeError("dense MLP failed")

    model.dense_mlp = broken
    with pytest.raises(RuntimeError, match="dense MLP failed"):
        model.forward([4], model.new_cache())
    model.dense_mlp = good
    # the replies of the failed layer were collected: the next call reads its own replies
    local = models.load(vindex)
    assert model.forward([4], model.new_cache()).tobytes() == local.forward([4], local.new_cache()).tobytes()
    rx.close()


def test_pending_keeps_its_result_or_error():
    calls = []
    p = Pending(lambda: calls.append(1) or np.ones(2))
    assert p.result() is p.result() and calls == [1]

    def fail():
        calls.append(2)
        raise ValueError("no")

    q = Pending(fail)
    for _ in range(2):
        with pytest.raises(ValueError, match="no"):
            q.result()
    assert calls == [1, 2]


def test_backends_without_start_still_run(vindex):
    """A backend with only `forward` (the Experts protocol's minimum) is called after the dense MLP."""

    class ForwardOnly:
        def __init__(self):
            self.inner = LocalExperts(vindex)

        def forward(self, *a):
            return self.inner.forward(*a)

        def forward_multi(self, work):
            return self.inner.forward_multi(work)

        def close(self):
            pass

    a, b = models.load(vindex, experts=ForwardOnly()), models.load(vindex)
    assert a.forward([2, 3], a.new_cache()).tobytes() == b.forward([2, 3], b.new_cache()).tobytes()


def test_an_uncollected_call_does_not_lock_the_client(vindex, servers):
    """A Ctrl-C between `start` and `result` (the call is never collected): the same thread
    can still compute and close (the old plain lock deadlocked `larql run`'s cleanup)."""
    import threading

    rx = connect_shards(servers, vindex, api_key="")
    h = np.random.default_rng(3).standard_normal((1, H)).astype(np.float32)
    ids, w = np.array([[1, 6]]), np.array([[0.5, 0.5]], np.float32)
    want = rx.forward(0, h, ids, w)
    done = threading.Event()

    def run():
        rx.start(0, h, ids, w)                        # dropped: never collected
        assert rx.forward(0, h, ids, w).tobytes() == want.tobytes()
        rx.close()
        done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(20)
    assert done.is_set()


@pytest.mark.parametrize("case", ["late reply", "half a frame", "half a frame over TLS"])
def test_a_signal_while_the_lane_waits_leaves_the_client_exact(vindex, case, tmp_path):
    """Ctrl-C while the lane waits for a slow shard (the other shard's reply already added):
    before any byte of its reply ("late reply", C waiting), or with half of its reply frame
    arrived and the rest 0.6 s away (C reading plain TCP, or Python's ssl reading TLS). The
    handler's exception reaches the caller at once (C returns to Python every 50 ms to let
    handlers run); a half frame stays buffered; the calls after it, which first meet the rest
    of that old reply, are exact, on the same connection."""
    import signal
    import time

    from standin import StandIn, make_certs

    from larql import transport

    class Interrupted(Exception):
        pass

    half, tls = case.startswith("half"), case.endswith("TLS")
    a = ExpertServer(vindex, experts=range(0, 4)).start_in_thread("127.0.0.1", 0)
    b = ExpertServer(vindex, experts=range(4, 8)).start_in_thread("127.0.0.1", 0)
    slow = {"on": False}

    def slow_now(req) -> bool:
        hit = slow["on"] and req.get("op") == "experts"
        slow["on"] = slow["on"] and not hit
        return hit

    def delay(req, rep):                    # the whole reply late
        if not half and slow_now(req):
            time.sleep(0.6)
        return rep

    def pause(req):                         # half the frame now, the rest late
        return 0.6 if half and slow_now(req) else 0.0

    certs = make_certs(tmp_path / "certs") if tls else None
    ctx = transport.server_tls_context(certs["server"], certs["server.key"]) if tls else None
    proxy = StandIn((b.host, b.port), mangle=delay, pause_mid_reply=pause, tls=ctx)
    local = LocalExperts(vindex)

    def interrupt(signum, frame):
        raise Interrupted

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        rx = connect_shards(f"0-3={a.address},4-7={proxy.address}", vindex, api_key="", accumulate="f64",
                            timeout=20, tls_ca=certs["ca"] if tls else None)
        rng = np.random.default_rng(7)
        work = [(i % 2, rng.standard_normal((1, H)).astype(np.float32), np.array([[1, 6]]),
                 rng.random((1, 2)).astype(np.float32)) for i in range(4)]
        assert rx.forward(*work[0]).tobytes() == local.forward(*work[0]).tobytes()
        assert rx.client.lane_calls == 1
        conn = rx.client.shards[1].replicas[0].conn
        slow["on"] = True
        signal.setitimer(signal.ITIMER_REAL, 0.25)
        t0 = time.monotonic()
        with pytest.raises(Interrupted):
            rx.forward(*work[1])
        assert time.monotonic() - t0 < 0.5                 # not held until the rest arrives
        if half:
            (length,) = P.HEADER.unpack(bytes(conn._buf[conn._start:conn._start + 4]))
            assert 0 < conn._end - conn._start < 4 + length     # half a frame is buffered
        for wk in work:
            assert rx.forward(*wk).tobytes() == local.forward(*wk).tobytes()
        assert rx.client.shards[1].replicas[0].conn is conn  # the same connection, still in step
        rx.close()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        proxy.stop()
        a.stop()
        b.stop()
